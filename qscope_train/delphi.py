"""The browse stage's activations in EleutherAI delphi's latent cache, so that delphi can explain and score
our features without running the model again.

Layout (checked against eai-delphi 0.1.3's LatentDataset, docs/BENCHMARKS.md, session 15):

    <out>/latents/layers.<n>/<start>_<end>.safetensors   one per split of the latents, `end` inclusive,
                                                         the bounds linspace(0, d_sae, splits + 1)
    <out>/latents/layers.<n>/config.json                 the caching settings and model_name

Each split holds `locations` (N, 3) [sequence, position, latent - start] (uint16 when the sequence and
latent columns fit, else uint32), ascending (sequence, position) within each latent; `activations` (N,)
float16, every code value with |a| > 1e-5 (delphi's own threshold); and `tokens`, the whole (sequences,
context) token matrix, in every split (delphi reads it from whichever split it opens first).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

THRESHOLD = 1e-5  # delphi keeps activations above this magnitude
ENTRY_BYTES = 14  # held per kept activation until written: sequence, position, latent (int32) and fp16


def hookpoint(layer: int) -> str:
    """delphi's name for the residual stream after decoder layer n (sparsify's hookpoint names)."""
    return f"layers.{layer}"


def split_bounds(width: int, splits: int) -> list[tuple[int, int]]:
    """(start, inclusive end) of each split, as delphi's cache computes them."""
    edges = torch.linspace(0, width, steps=splits + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)]


class LatentCache:
    """Collects, chunk by chunk, the token matrix and every layer's kept code values, then writes them."""

    def __init__(self, widths: dict[int, int]) -> None:
        self.widths = widths
        self.tokens: list[Tensor] = []
        self.sequences = 0
        self.parts: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {n: [] for n in widths}

    def add_tokens(self, input_ids_ST: Tensor) -> int:
        """Append a chunk's token matrix; returns the index of its first sequence."""
        if self.tokens and input_ids_ST.shape[1] != self.tokens[0].shape[1]:
            raise ValueError(f"chunk context {input_ids_ST.shape[1]} != {self.tokens[0].shape[1]}")
        first = self.sequences
        self.tokens.append(input_ids_ST.to("cpu", torch.int32))
        self.sequences += input_ids_ST.shape[0]
        return first

    def add_codes(self, layer: int, first_seq: int, context: int, positions_R: Tensor, idx_RK: Tensor, val_RK: Tensor):
        """A chunk's codes for one layer: row r is flat position positions_R[r] (sequence * context + t) of the
        chunk whose first sequence is first_seq."""
        val_RK, idx_RK, positions_R = val_RK.cpu(), idx_RK.cpu(), positions_R.cpu().long()
        keep = val_RK.abs() > THRESHOLD
        rows = keep.nonzero()[:, 0]  # row-major: (row, slot) ascending
        flat = positions_R[rows]
        seq = (flat // context + first_seq).to(torch.int32)
        pos = (flat % context).to(torch.int32)
        self.parts[layer].append((seq, pos, idx_RK[keep].to(torch.int32), val_RK[keep].to(torch.float16)))

    def write(self, out: Path, splits: int, config: dict) -> dict:
        """Write every layer's splits and config.json under out/latents; returns {layer: kept activations}."""
        if not self.tokens:
            raise ValueError("no tokens were added")
        tokens = torch.cat(self.tokens)
        written = {}
        for layer, parts in self.parts.items():
            seq, pos, lat, act = (torch.cat([p[i] for p in parts]) for i in range(4))
            # appended in (sequence, position) order; a stable sort by latent keeps it within each latent
            order = torch.sort(lat, stable=True).indices
            seq, pos, lat, act = seq[order], pos[order], lat[order], act[order]
            where = out / "latents" / hookpoint(layer)
            where.mkdir(parents=True, exist_ok=True)
            for stale in where.glob("*.safetensors"):  # a rerun with other splits must not leave old ranges
                stale.unlink()
            for start, end in split_bounds(self.widths[layer], splits):
                a, b = torch.searchsorted(lat, torch.tensor([start, end + 1], dtype=torch.int32)).tolist()
                loc = torch.stack([seq[a:b], pos[a:b], lat[a:b] - start], dim=1)
                small = b == a or (int(loc[:, 0].max()) < 2**16 and int(loc[:, 2].max()) < 2**16)
                save_file(
                    {
                        "locations": loc.to(torch.uint16 if small else torch.uint32).contiguous(),
                        "activations": act[a:b].contiguous(),
                        "tokens": tokens,
                    },
                    str(where / f"{start}_{end}.safetensors"),
                )
            (where / "config.json").write_text(
                json.dumps(
                    {
                        **config,
                        "cache_ctx_len": int(tokens.shape[1]),
                        "n_splits": splits,
                        "n_tokens": int(tokens.numel()),
                    },
                    indent=2,
                )
            )
            written[layer] = int(act.numel())
        return written


def read_split(path: Path) -> tuple[Tensor, Tensor, Tensor]:
    """One split as delphi's TensorBuffer.load reads it: (locations (N, 3) int64 with absolute latents,
    activations, tokens int64). Restated from delphi/latents/loader.py for the tests."""
    from safetensors.numpy import load_file

    data = load_file(str(path))
    start = int(Path(path).name.split("_")[0])
    locations = torch.from_numpy(data["locations"].astype("int64"))
    locations[:, 2] += start
    return locations, torch.from_numpy(data["activations"]), torch.from_numpy(data["tokens"].astype("int64"))
