"""Activation batches for the trainer: {layer: (B, d_model)} dicts, from the cache or live from the model.

Both sources push per-layer blocks of rows (one cache shard, or one freshly computed chunk) through
the same ShuffledBatches buffer, so with shuffle_shards=False and the same seed they yield the same
batches. The cached reader reads ahead on threads and resumes exactly from its state_dict().
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import shards
from .activations import ChunkRows, chunked, forward_chunk, make_filter
from .cache import plan
from .config import DataConfig, OnCorrupt
from .errors import InputError
from .lm import LoadedLM
from .shards import Codec, CorruptShardError
from .tokens import load_text_dataset, token_stream

Blocks = Iterator[tuple[Tensor, Any]]  # ((planes, rows, width) block, position after this block)


def _generator(*seeds: int) -> torch.Generator:
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
            perm = torch.randperm(n, generator=_generator(self.seed, fill)).to(parts[0].device)
            full = n // self.batch_size
            stop = full if not exhausted or full * self.batch_size == n else full + 1  # last partial batch
            for b in range(skip, stop):
                self.state = {"pos": pos, "fill": fill, "batch": b + 1, "carry": carry}
                yield self.finish(_gather(parts, perm[b * self.batch_size : (b + 1) * self.batch_size]))
            carry = _gather(parts, perm[full * self.batch_size :]) if not exhausted else None
            del parts
            pos, fill, skip = next_pos, fill + 1, 0
            self.state = {"pos": pos, "fill": fill, "batch": 0, "carry": carry}


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.cpu()


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


class CachedBlocks:
    """One layer's shards of one split for one rank, in per-epoch order, decoded ahead on threads."""

    def __init__(
        self,
        root: Path,
        manifest: dict,
        split: str,
        layer: int,
        cfg: DataConfig,
        seed: int,
        rank: int = 0,
        world: int = 1,
        epochs: int | None = None,
    ) -> None:
        recs = shards.records(manifest["splits"][split]["layers"][str(layer)]["shards"])
        self.recs = recs[rank::world]
        if not self.recs:
            raise InputError(
                f"rank {rank} of {world} has no {split} shards of layer {layer} (the cache has {len(recs)})"
            )
        self.root, self.width, self.codec = root, manifest["d_model"], Codec(**manifest["codec"])
        self.cfg, self.seed, self.epochs = cfg, seed, epochs

    def order(self, epoch: int) -> list[int]:
        if not self.cfg.shuffle_shards:
            return list(range(len(self.recs)))
        return torch.randperm(len(self.recs), generator=_generator(self.seed, 7919, epoch)).tolist()

    def __call__(self, pos: tuple[int, int]) -> Blocks:
        epoch, index = pos
        ahead = self.cfg.reader_threads + 1
        with ThreadPoolExecutor(self.cfg.reader_threads, thread_name_prefix="qscope-reader") as pool:
            while self.epochs is None or epoch < self.epochs:
                order = self.order(epoch)
                todo, pending = deque(range(index, len(order))), deque()
                while todo or pending:
                    while todo and len(pending) < ahead:
                        i = todo.popleft()
                        pending.append((i, pool.submit(self._load, self.recs[order[i]])))
                    i, fut = pending.popleft()
                    block = self._result(fut)
                    if block is not None:
                        yield block, ((epoch, i + 1) if i + 1 < len(order) else (epoch + 1, 0))
                epoch, index = epoch + 1, 0

    def _load(self, rec: shards.ShardRecord) -> Tensor:
        """Runs on a reader thread: verify and decompress into byte planes. No torch compute happens here:
        torch ops on several Python threads at once fight over the intra-op pool and run slower."""
        return shards.read_shard_planes(self.root, rec, self.width, self.codec, self.cfg.verify_shards)

    def _result(self, fut) -> Tensor | None:
        try:
            return fut.result()
        except CorruptShardError as e:
            if self.cfg.on_corrupt is OnCorrupt.skip:
                warnings.warn(f"skipping {e}", stacklevel=2)
                return None
            raise


class LayerBatches:
    """{layer: batch} dicts from one ShuffledBatches per layer; state_dict() covers all of them
    (None when the source cannot seek, as live mode cannot)."""

    def __init__(self, buffers: dict[int, ShuffledBatches], seekable: bool = True) -> None:
        self.buffers, self.seekable = buffers, seekable

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        its = {n: iter(b) for n, b in self.buffers.items()}
        while True:
            try:
                yield {n: next(it) for n, it in its.items()}
            except StopIteration:
                return

    def state_dict(self) -> dict | None:
        if not self.seekable:
            return None
        states = {str(n): b.state_dict() for n, b in self.buffers.items()}
        return {n: {**st, "carry": _cpu(st["carry"])} for n, st in states.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, b in self.buffers.items():
            b.load_state_dict(state[str(n)])


def cached_batches(
    root: Path,
    manifest: dict,
    layers: Sequence[int],
    batch_size: int,
    cfg: DataConfig,
    seed: int,
    split: str = "train",
    rank: int = 0,
    world: int = 1,
    epochs: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> LayerBatches:
    """Shuffled batches of cached rows; endless unless `epochs` is given.

    Reader threads verify and decompress shards ahead of use; the shuffle buffer holds
    shuffle_buffer_tokens rows per layer in the stored dtype: that, not the cache size, sets the memory.
    """
    codec = Codec(**manifest["codec"])
    buffers = {
        n: ShuffledBatches(
            CachedBlocks(root, manifest, split, n, cfg, seed + n, rank, world, epochs),
            (0, 0),
            batch_size,
            cfg.shuffle_buffer_tokens,
            seed + n,
            lambda x: codec.to_values(x, out_dtype),
        )
        for n in layers
    }
    return LayerBatches(buffers)


def eval_rows(root: Path, manifest: dict, layer: int, batch_size: int) -> Iterator[Tensor]:
    """Every held-out row of one layer once, in stored order, as fp32 batches."""
    codec = Codec(**manifest["codec"])
    for entry in manifest["splits"]["eval"]["layers"][str(layer)]["shards"]:
        shard = shards.read_shard(root, shards.ShardRecord(**entry), manifest["d_model"], codec, torch.float32)
        yield from shard.split(batch_size)


def live_chunks(
    lm: LoadedLM,
    layers: Sequence[int],
    cfg: DataConfig,
    split: str,
    device,
    rank: int = 0,
    world: int = 1,
    epochs: int | None = 1,
    full: bool = False,
) -> Iterator[dict[int, Tensor]] | Iterator[ChunkRows]:
    """Run the model over one split's chunks (this rank's share); yields {layer: filtered rows} per chunk,
    or with full=True the whole ChunkRows (rows, positions, token ids and filter counts)."""
    chunks = plan(cfg)[split]
    epoch = 0
    while epochs is None or epoch < epochs:
        filt = make_filter(lm, cfg)  # fresh running medians each pass, as the cache does per split
        stream = token_stream(load_text_dataset(cfg), lm.tokenizer, cfg)
        produced = False
        for c, seqs in enumerate(chunked(stream, cfg.shard_sequences)):
            if c >= chunks.stop:
                break
            if c < chunks.start or c % world != rank:
                continue
            produced = True
            chunk = forward_chunk(lm, layers, seqs, cfg, filt, device)
            yield chunk if full else chunk.rows
        if not produced:
            raise InputError(f"the live {split} split has no sequences for rank {rank}")
        epoch += 1


class _FanOut:
    """Hands each layer its rows of the shared live chunks; a layer that runs ahead pulls the next chunk."""

    def __init__(self, chunks: Iterator[dict[int, Tensor]], layers: Sequence[int]) -> None:
        self.chunks = chunks
        self.queues: dict[int, deque] = {n: deque() for n in layers}
        self.count = 0

    def blocks(self, layer: int) -> Callable[[Any], Blocks]:
        def gen(_pos) -> Blocks:
            q = self.queues[layer]
            while True:
                if not q:
                    rows = next(self.chunks, None)
                    if rows is None:
                        return
                    self.count += 1
                    for n, r in rows.items():
                        self.queues[n].append((r.unsqueeze(0), self.count))
                yield q.popleft()

        return gen


def live_batches(
    lm: LoadedLM,
    layers: Sequence[int],
    batch_size: int,
    cfg: DataConfig,
    seed: int,
    device,
    split: str = "train",
    rank: int = 0,
    world: int = 1,
    epochs: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> LayerBatches:
    """The batches cached_batches gives with shuffle_shards=False, computed from the model (no disk).

    Rows are rounded to the cache dtype first, exactly as the cache stores them. Live batches do not
    resume mid-run: a restarted run recomputes the stream from its beginning.
    """
    fan = _FanOut(live_chunks(lm, layers, cfg, split, device, rank, world, epochs), layers)
    buffers = {
        n: ShuffledBatches(
            fan.blocks(n), 0, batch_size, cfg.shuffle_buffer_tokens, seed + n, lambda x: x[0].to(out_dtype)
        )
        for n in layers
    }
    return LayerBatches(buffers, seekable=False)
