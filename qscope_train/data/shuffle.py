"""The shuffle buffer shared by every batch source: blocks of rows in, shuffled fixed-size batches out,
with a small state that restarts it at the exact batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

Blocks = Iterator[tuple[Tensor, Any]]  # ((planes, rows, width) block, position after this block)


def generator(*seeds: int) -> torch.Generator:
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + s) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class ShuffledBatches:
    """Fill a buffer with at least buffer_rows rows from the blocks, permute it (seeded per fill), yield
    full batches, carry the remainder into the next fill. The state is (position at fill start, fill
    number, batches already yielded from this fill, rows carried in), which restarts it exactly.

    Blocks are (planes, rows, width) as Codec.decode_planes gives them; `finish` turns the gathered
    rows of one batch into values, so only rows that are used are ever converted.
    """

    def __init__(
        self,
        blocks_from: Callable[[Any], Blocks],
        start_pos: Any,
        batch_size: int,
        buffer_rows: int,
        seed: int,
        finish: Callable[[Tensor], Tensor],
    ) -> None:
        self.blocks_from, self.batch_size, self.buffer_rows = blocks_from, batch_size, max(buffer_rows, batch_size)
        self.seed, self.finish = seed, finish
        self.state: dict = {"pos": start_pos, "fill": 0, "batch": 0, "carry": None}

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)

    def state_dict(self) -> dict:
        return dict(self.state)

    def __iter__(self) -> Iterator[Tensor]:
        pos, fill, skip, carry = (self.state[k] for k in ("pos", "fill", "batch", "carry"))
        blocks = self.blocks_from(pos)
        exhausted = False
        while not exhausted:
            parts, n = ([carry] if carry is not None else []), (0 if carry is None else carry.shape[1])
            next_pos = pos
            for block, after in blocks:
                next_pos = after
                parts.append(block)
                n += block.shape[1]
                if n >= self.buffer_rows:
                    break
            else:
                exhausted = True
            if n == 0:
                return
            perm = torch.randperm(n, generator=generator(self.seed, fill)).to(parts[0].device)
            full = n // self.batch_size
            stop = full if not exhausted or full * self.batch_size == n else full + 1  # last partial batch
            for b in range(skip, stop):
                self.state = {"pos": pos, "fill": fill, "batch": b + 1, "carry": carry}
                yield self.finish(_gather(parts, perm[b * self.batch_size : (b + 1) * self.batch_size]))
            carry = _gather(parts, perm[full * self.batch_size :]) if not exhausted else None
            del parts
            pos, fill, skip = next_pos, fill + 1, 0
            self.state = {"pos": pos, "fill": fill, "batch": 0, "carry": carry}


def _gather(parts: list[Tensor], idx: Tensor) -> Tensor:
    """Rows idx of the blocks laid end to end along dim 1, without concatenating the blocks.

    The indices are sorted first, so each block's rows form one run (and memory is read in order);
    the order of rows inside a batch carries no meaning, and it stays deterministic.
    """
    idx = idx.sort().values
    if len(parts) == 1 or idx.numel() == 0:
        return parts[0].index_select(1, idx)
    pieces, start = [], 0
    cuts = torch.searchsorted(idx, torch.tensor([p.shape[1] for p in parts], device=idx.device).cumsum(0)).tolist()
    offset = 0
    for part, cut in zip(parts, cuts, strict=True):
        if cut > start:
            pieces.append(part.index_select(1, idx[start:cut] - offset))
        start, offset = cut, offset + part.shape[1]
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
