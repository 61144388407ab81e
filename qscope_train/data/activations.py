"""Residual activations straight from the model, filtered, one chunk of sequences at a time.

Filters (each configurable and counted per layer): position 0 (the attention sink), right padding,
special tokens, and rows whose norm exceeds outlier_norm_factor × the layer's running median norm.
A chunk is the unit that the cache writer stores as one shard per layer and that live_chunks hands on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import InputError
from ..lm import LoadedLM, run_captured
from .config import DataConfig
from .tokens import Sequence as TokSeq
from .tokens import StreamState, batched, load_text_dataset, plan, special_token_ids, token_stream


@dataclass
class FilterCounts:
    """Activation rows seen and dropped, per reason, for one layer."""

    seen: int = 0
    dropped_position0: int = 0
    dropped_padding: int = 0
    dropped_special: int = 0
    dropped_outlier: int = 0
    kept: int = 0

    def add(self, other: FilterCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class RunningMedian:
    """Median of every norm seen so far, from a fixed log2 histogram (bins 0.8 % wide); exact to restore."""

    LO, HI, BINS = -24.0, 24.0, 6144

    def __init__(self, counts: dict | None = None) -> None:
        self.counts = torch.zeros(self.BINS, dtype=torch.long)
        for i, c in (counts or {}).items():
            self.counts[int(i)] = c

    def update(self, norms: Tensor) -> None:
        width = (self.HI - self.LO) / self.BINS
        idx = ((norms.float().clamp_min(2.0**self.LO).log2() - self.LO) / width).long().clamp_(0, self.BINS - 1)
        self.counts += torch.bincount(idx.cpu(), minlength=self.BINS)

    def median(self) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return math.inf
        i = int(torch.searchsorted(self.counts.cumsum(0), (total + 1) // 2))
        return 2.0 ** (self.LO + (i + 0.5) * (self.HI - self.LO) / self.BINS)

    def state(self) -> dict[str, int]:
        nz = self.counts.nonzero().flatten().tolist()
        return {str(i): int(self.counts[i]) for i in nz}


class ChunkRows(NamedTuple):
    """One chunk's kept rows per layer (in the cache dtype) and where each row came from."""

    rows: dict[int, Tensor]  # layer -> (N_layer, d_model)
    positions: dict[int, Tensor]  # layer -> (N_layer,) int32 index seq * context_len + t within the chunk
    input_ids: Tensor  # (S, context_len)
    counts: dict[int, FilterCounts]
    state: StreamState  # stream position after the chunk


@dataclass
class ActivationFilter:
    cfg: DataConfig
    special_ids: list[int]
    medians: dict[int, RunningMedian] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = self.special_ids if self.cfg.drop_special_tokens else []
        self.drop_ids = torch.tensor(sorted({*ids, *self.cfg.drop_token_ids}), dtype=torch.long)

    def token_mask(self, ids_BT: Tensor, attn_BT: Tensor) -> tuple[Tensor, FilterCounts]:
        """Rows kept before the norm filter, and the drop counts that do not depend on the layer."""
        c = FilterCounts(seen=ids_BT.numel())
        keep = torch.ones_like(ids_BT, dtype=torch.bool)
        if self.cfg.drop_first_position:
            keep[:, 0] = False
            c.dropped_position0 = ids_BT.shape[0]
        pad = keep & ~attn_BT
        c.dropped_padding = int(pad.sum())
        keep &= attn_BT
        if len(self.drop_ids):
            special = torch.isin(ids_BT, self.drop_ids.to(ids_BT.device)) & keep
            c.dropped_special = int(special.sum())
            keep &= ~special
        return keep, c

    def norm_mask(self, layer: int, x_ND: Tensor) -> Tensor:
        """Rows within outlier_norm_factor × the running median norm (the median includes these rows)."""
        if not self.cfg.outlier_norm_factor or x_ND.shape[0] == 0:
            return torch.ones(x_ND.shape[0], dtype=torch.bool, device=x_ND.device)
        norms = x_ND.float().norm(dim=-1)
        median = self.medians.setdefault(layer, RunningMedian())
        median.update(norms)
        return norms <= self.cfg.outlier_norm_factor * median.median()


def forward_chunk(
    lm: LoadedLM,
    layer_ids: Sequence[int],
    seqs: list[TokSeq],
    cfg: DataConfig,
    filt: ActivationFilter,
    device: torch.device | str,
    out_device: torch.device | str | None = None,
) -> ChunkRows:
    """Truncated forwards over one chunk of sequences; filtered rows per layer, in the cache dtype.

    With the model on a GPU and out_device the CPU, rows cross into page-locked memory without blocking,
    and the chunk waits for its copies once, at its end."""
    dtype = cfg.cache_dtype.torch
    to_host = out_device is not None and torch.device(out_device).type == "cpu" and torch.device(device).type == "cuda"

    def out(t: Tensor) -> Tensor:
        if not to_host:
            return t.to(out_device or t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    rows: dict[int, list[Tensor]] = {n: [] for n in layer_ids}
    pos: dict[int, list[Tensor]] = {n: [] for n in layer_ids}
    counts = {n: FilterCounts() for n in layer_ids}
    offset = 0
    for ids_BT, attn_BT in batched(seqs, cfg.forward_sequences):
        ids_BT, attn_BT = ids_BT.to(device), attn_BT.to(device)
        acts = run_captured(lm, layer_ids, ids_BT, attn_BT.long())
        keep_BT, base = filt.token_mask(ids_BT, attn_BT)
        flat_pos = torch.arange(offset, offset + ids_BT.numel(), device=device).view_as(ids_BT)[keep_BT]
        for n in layer_ids:
            x_ND = acts[n][keep_BT]
            ok = filt.norm_mask(n, x_ND)
            c = FilterCounts(**asdict(base))
            c.dropped_outlier = int((~ok).sum())
            c.kept = int(ok.sum())
            counts[n].add(c)
            rows[n].append(out(x_ND[ok].to(dtype)))
            pos[n].append(out(flat_pos[ok].to(torch.int32)))
        offset += ids_BT.numel()
    if to_host:
        torch.cuda.current_stream(torch.device(device)).synchronize()  # every copy of the chunk has landed
    return ChunkRows(
        {n: torch.cat(r) for n, r in rows.items()},
        {n: torch.cat(p) for n, p in pos.items()},
        torch.stack([s.input_ids for s in seqs]).to(out_device or "cpu"),
        counts,
        seqs[-1].state,
    )


def chunked(seqs: Iterator[TokSeq], size: int) -> Iterator[list[TokSeq]]:
    while True:
        chunk = [s for _, s in zip(range(size), seqs, strict=False)]
        if not chunk:
            return
        yield chunk


def make_filter(lm: LoadedLM, cfg: DataConfig, medians: dict[int, RunningMedian] | None = None) -> ActivationFilter:
    return ActivationFilter(cfg, special_token_ids(lm.tokenizer), medians if medians is not None else {})


START = {"epoch": 0, "chunk": 0, "stream": [0, 0], "medians": {}}
"""Where a live stream starts: epoch, the index of the next chunk, the token stream's position before it,
and the outlier filter's running medians ({layer: RunningMedian.state()}) at that point."""


def live_chunks(
    lm: LoadedLM,
    layers: Sequence[int],
    cfg: DataConfig,
    split: str,
    device,
    rank: int = 0,
    world: int = 1,
    epochs: int | None = 1,
) -> Iterator[ChunkRows]:
    """Run the model over one split's chunks (this rank's share), as the cache writer would, yielding
    each chunk's ChunkRows (rows per layer, positions, token ids and filter counts); nothing is stored."""
    for chunk, _ in positioned_live_chunks(lm, layers, cfg, split, device, rank, world, epochs):
        yield chunk


def positioned_live_chunks(
    lm: LoadedLM,
    layers: Sequence[int],
    cfg: DataConfig,
    split: str,
    device,
    rank: int = 0,
    world: int = 1,
    epochs: int | None = 1,
    start: dict | None = None,
    out_device=None,
) -> Iterator[tuple[ChunkRows, dict]]:
    """live_chunks from `start` (a position this function gave, or START), each chunk with the position
    after it. Restarting at a position re-reads the text before it only as far as the documents it
    skips, tokenizes from there, and runs the model over nothing it skips: the chunks that follow, and
    the filter's decisions on them, are those of an uninterrupted stream."""
    chunks = plan(cfg)[split]
    pos = START if start is None else start
    epoch, first = pos["epoch"], True
    while epochs is None or epoch < epochs:
        if first:
            medians = {int(n): RunningMedian(m) for n, m in pos["medians"].items()}
            at, c0 = StreamState(*pos["stream"]), pos["chunk"]
        else:
            medians, at, c0 = {}, StreamState(), 0  # fresh running medians each pass, as the cache does per split
        filt = make_filter(lm, cfg, medians)
        stream = token_stream(load_text_dataset(cfg), lm.tokenizer, cfg, at)
        produced = c0 > 0  # a resumed pass has produced already (positions follow this rank's own chunks)
        for c, seqs in enumerate(chunked(stream, cfg.shard_sequences), start=c0):
            if c >= chunks.stop:
                break
            if c < chunks.start or c % world != rank:
                continue
            produced = True
            chunk = forward_chunk(lm, layers, seqs, cfg, filt, device, out_device)
            medians_now = {str(n): m.state() for n, m in filt.medians.items()}
            yield chunk, {"epoch": epoch, "chunk": c + 1, "stream": list(seqs[-1].state), "medians": medians_now}
        if not produced:
            raise InputError(f"the live {split} split has no sequences for rank {rank}")
        epoch, first = epoch + 1, False
