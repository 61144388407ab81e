"""Residual activations from a model (live) or from the shard cache, filtered, as (B, d_model) batches.

Filters (each configurable and counted): position 0 (the attention sink), special tokens, and
rows whose norm exceeds outlier_norm_factor × the median norm of their forward batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import shards
from .config import DataConfig
from .lm import LoadedLM, run_captured
from .tokens import batched, iter_texts, load_text_dataset, packed_blocks, special_token_ids, split_blocks

CACHE_FORMAT = 1


@dataclass
class FilterCounts:
    """Activation rows seen and dropped, per reason, for one layer."""

    seen: int = 0
    dropped_position0: int = 0
    dropped_special: int = 0
    dropped_outlier: int = 0
    kept: int = 0


class TokenFilter:
    def __init__(self, cfg: DataConfig, special_ids: Sequence[int]) -> None:
        self.cfg = cfg
        self.special_ids = torch.tensor(sorted(special_ids), dtype=torch.long)

    def token_mask(self, input_ids_BT: Tensor) -> tuple[Tensor, int, int]:
        """(keep mask (B, T), rows dropped at position 0, rows dropped as special tokens)."""
        keep = torch.ones_like(input_ids_BT, dtype=torch.bool)
        n_pos0 = 0
        if self.cfg.drop_first_position:
            keep[:, 0] = False
            n_pos0 = input_ids_BT.shape[0]
        n_special = 0
        if self.cfg.drop_special_tokens and len(self.special_ids):
            special = torch.isin(input_ids_BT, self.special_ids.to(input_ids_BT.device)) & keep
            n_special = int(special.sum())
            keep &= ~special
        return keep, n_pos0, n_special

    def outlier_mask(self, x_ND: Tensor) -> Tensor:
        """Rows whose norm is at most outlier_norm_factor × the median row norm (all rows if disabled)."""
        if not self.cfg.outlier_norm_factor or x_ND.shape[0] == 0:
            return torch.ones(x_ND.shape[0], dtype=torch.bool, device=x_ND.device)
        norms = x_ND.float().norm(dim=-1)
        return norms <= self.cfg.outlier_norm_factor * norms.median()


def iter_live(
    lm: LoadedLM,
    layer_ids: Sequence[int],
    blocks: Iterable[Tensor],
    cfg: DataConfig,
    device: torch.device | str,
    counts: dict[int, FilterCounts],
    on_batch: Optional[Callable[[int], None]] = None,
) -> Iterator[dict[int, Tensor]]:
    """One truncated forward per batch of sequences; yields {layer: filtered rows (N, d_model)}."""
    filt = TokenFilter(cfg, special_token_ids(lm.tokenizer))
    for ids_BT in batched(blocks, cfg.forward_batch_size):
        ids_BT = ids_BT.to(device)
        acts = run_captured(lm, layer_ids, ids_BT)
        keep_BT, n_pos0, n_special = filt.token_mask(ids_BT)
        out = {}
        for n in layer_ids:
            x_ND = acts[n][keep_BT]
            ok = filt.outlier_mask(x_ND)
            c = counts[n]
            c.seen += ids_BT.numel()
            c.dropped_position0 += n_pos0
            c.dropped_special += n_special
            c.dropped_outlier += int((~ok).sum())
            c.kept += int(ok.sum())
            out[n] = x_ND[ok]
        if on_batch:
            on_batch(ids_BT.numel())
        yield out


def cache_fingerprint(lm_name: str, revision: Optional[str], layers: Sequence[int], cfg: DataConfig) -> dict:
    """Everything that determines the cached rows; a cache is reused only when this matches."""
    data = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()}
    return {"model": lm_name, "revision": revision, "layers": sorted(layers), "data": data}


def build_cache(
    lm: LoadedLM,
    layer_ids: Sequence[int],
    cfg: DataConfig,
    root: Path,
    device: torch.device | str,
    progress: Callable[..., object],
    revision: Optional[str] = None,
) -> dict:
    """Run the model over the held-out and training sequences and write per-layer shards + manifest."""
    fingerprint = cache_fingerprint(lm.name, revision, layer_ids, cfg)
    if (root / shards.MANIFEST).is_file():
        old = shards.read_manifest(root)
        if old.get("fingerprint") == fingerprint:
            return old
        raise ValueError(
            f"{root} already holds a cache made with other settings; delete it or choose another run_dir "
            f"(cached: {old.get('fingerprint')}, asked: {fingerprint})"
        )
    texts = iter_texts(load_text_dataset(cfg), cfg.text_field)
    blocks = packed_blocks(texts, lm.tokenizer, cfg.context_len)
    n_eval, n_train = math.ceil(cfg.eval_tokens / cfg.context_len), math.ceil(cfg.train_tokens / cfg.context_len)
    eval_blocks, train_blocks = split_blocks(blocks, n_eval, n_train)
    dtype = cfg.cache_dtype.value
    splits = {}
    with progress(total=(n_eval + n_train) * cfg.context_len, desc="cache", unit="tok") as bar:
        for split, split_blocks_ in (("eval", eval_blocks), ("train", train_blocks)):
            counts = {n: FilterCounts() for n in layer_ids}
            writers = {
                n: shards.ShardWriter(root, f"{split}/layer{n}", lm.d_model, dtype, cfg.shard_tokens) for n in layer_ids
            }
            for acts in iter_live(lm, layer_ids, split_blocks_, cfg, device, counts, on_batch=bar.update):
                for n, x_ND in acts.items():
                    writers[n].add(x_ND)
            splits[split] = {
                str(n): {"filters": asdict(counts[n]), "shards": shards.as_dicts(writers[n].finish())}
                for n in layer_ids
            }
    if splits["train"][str(layer_ids[0])]["filters"]["seen"] < cfg.train_tokens:
        seen = splits["train"][str(layer_ids[0])]["filters"]["seen"]
        print(f"note: the dataset ran out after {seen:,} training tokens (asked for {cfg.train_tokens:,})")
    manifest = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "model": lm.name,
        "revision": revision,
        "d_model": lm.d_model,
        "dtype": dtype,
        "layers": sorted(layer_ids),
        "context_len": cfg.context_len,
        "splits": splits,
    }
    shards.write_manifest(root, manifest)
    return manifest


def check_cache(manifest: dict, layer_ids: Sequence[int], root: Path) -> None:
    missing = sorted(set(layer_ids) - set(manifest["layers"]))
    if missing:
        raise ValueError(f"the cache at {root} has layers {manifest['layers']}, not {missing}: re-run the cache stage")


def split_records(manifest: dict, split: str, layer: int) -> list[shards.ShardRecord]:
    return shards.records(manifest["splits"][split][str(layer)]["shards"])


def split_rows(manifest: dict, split: str, layer: int) -> int:
    return sum(r.rows for r in split_records(manifest, split, layer))


def cached_train_batches(
    root: Path, manifest: dict, layer_ids: Sequence[int], batch_size: int, buffer_shards: int, seed: int
) -> Iterator[dict[int, Tensor]]:
    """Endless {layer: (batch_size, d_model) fp32} batches, shuffled independently per layer."""
    streams = {
        n: shards.iter_shuffled(
            root,
            split_records(manifest, "train", n),
            manifest["d_model"],
            manifest["dtype"],
            batch_size,
            buffer_shards,
            seed + n,
        )
        for n in layer_ids
    }
    while True:
        yield {n: next(s) for n, s in streams.items()}


def cached_eval_rows(root: Path, manifest: dict, layer: int, batch_size: int) -> Iterator[Tensor]:
    """The held-out rows of one layer, in order, as fp32 batches."""
    return shards.iter_rows(
        root, split_records(manifest, "eval", layer), manifest["d_model"], manifest["dtype"], batch_size
    )
