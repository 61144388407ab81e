"""Activation batches for the trainer: {layer: (B, d_model)} dicts, from the cache or live from the model,
both behind the BatchSource interface.

Both sources push per-layer blocks of rows (one cache shard, or one freshly computed chunk) through
the same ShuffledBatches buffer, so with shuffle_shards=False and the same seed they yield the same
batches. The cached reader reads ahead on threads and resumes exactly from its state_dict().
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from ..errors import InputError
from ..lm import LoadedLM
from . import shards
from .activations import START, positioned_live_chunks
from .config import DataConfig, OnCorrupt, ReaderConfig
from .shards import Codec, CorruptShardError
from .shuffle import Blocks, ShuffledBatches, generator


class BatchSource(Protocol):
    """What the trainer iterates: one {layer: (B, d_model) rows} dict per step.

    state_dict() is the exact position after the last batch handed out, or None when the source cannot
    seek; load_state_dict() (before iterating) restarts there. Checkpoints and exact resume rely on both.
    """

    def __iter__(self) -> Iterator[dict[int, Tensor]]: ...

    def state_dict(self) -> Optional[dict]: ...

    def load_state_dict(self, state: dict) -> None: ...


class Unseekable:
    """Any iterable of {layer: rows} batches as a BatchSource without a position (a resumed run restarts it)."""

    def __init__(self, batches: Iterable[dict[int, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        return iter(self.batches)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        raise InputError("this activation source cannot seek to a saved position")


class CachedBlocks:
    """One layer's shards of one split for one rank, in per-epoch order, decoded ahead on threads."""

    def __init__(
        self,
        root: Path,
        manifest: dict,
        split: str,
        layer: int,
        reader: ReaderConfig,
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
        self.reader, self.seed, self.epochs = reader, seed, epochs

    def order(self, epoch: int) -> list[int]:
        if not self.reader.shuffle_shards:
            return list(range(len(self.recs)))
        return torch.randperm(len(self.recs), generator=generator(self.seed, 7919, epoch)).tolist()

    def __call__(self, pos: tuple[int, int]) -> Blocks:
        epoch, index = pos
        ahead = self.reader.threads + 1
        with ThreadPoolExecutor(self.reader.threads, thread_name_prefix="qscope-reader") as pool:
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
        return shards.read_shard_planes(self.root, rec, self.width, self.codec, self.reader.verify_shards)

    def _result(self, fut) -> Tensor | None:
        try:
            return fut.result()
        except CorruptShardError as e:
            if self.reader.on_corrupt is OnCorrupt.skip:
                warnings.warn(f"skipping {e}", stacklevel=2)
                return None
            raise


class LayerBatches:
    """{layer: batch} dicts from one ShuffledBatches per layer; state_dict() covers all of them."""

    def __init__(self, buffers: dict[int, ShuffledBatches]) -> None:
        self.buffers = buffers

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        its = {n: iter(b) for n, b in self.buffers.items()}
        while True:
            try:
                yield {n: next(it) for n, it in its.items()}
            except StopIteration:
                return

    def state_dict(self) -> dict:
        states = {str(n): b.state_dict() for n, b in self.buffers.items()}
        return {n: {**st, "carry": None if st["carry"] is None else st["carry"].cpu()} for n, st in states.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, b in self.buffers.items():
            b.load_state_dict(state[str(n)])


def cached_batches(
    root: Path,
    manifest: dict,
    layers: Sequence[int],
    batch_size: int,
    reader: ReaderConfig,
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
            CachedBlocks(root, manifest, split, n, reader, seed + n, rank, world, epochs),
            (0, 0),
            batch_size,
            reader.shuffle_buffer_tokens,
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


def _key(pos: dict) -> tuple[int, int]:
    """A live position's place in the stream, for ordering positions."""
    return pos["epoch"], pos["chunk"]


class _FanOut:
    """Hands each layer its rows of the shared live chunks; a layer that runs ahead pulls the next chunk.
    start() restarts the chunk stream at a position; a layer whose own position lies further on skips
    the chunks before it (layers fill their shuffle buffers from different numbers of chunks, since the
    outlier filter keeps different rows per layer)."""

    def __init__(self, chunks_from: Callable[[dict], Iterator[tuple[dict[int, Tensor], dict]]], layers) -> None:
        self.chunks_from, self.layers = chunks_from, list(layers)
        self.start(START)

    def start(self, pos: dict) -> None:
        self.chunks, self.before = None, pos
        self.queues: dict[int, deque] = {n: deque() for n in self.layers}

    def blocks(self, layer: int) -> Callable[[Any], Blocks]:
        def gen(pos: dict) -> Blocks:
            q, want = self.queues[layer], _key(pos)
            while True:
                if not q:
                    if self.chunks is None:
                        self.chunks = self.chunks_from(self.before)
                    item = next(self.chunks, None)
                    if item is None:
                        return
                    rows, after = item
                    for n, r in rows.items():
                        self.queues[n].append((r.unsqueeze(0), _key(self.before), after))
                    self.before = after
                block, before, after = q.popleft()
                if before >= want:
                    yield block, after

        return gen


class LiveBatches(LayerBatches):
    """Live batches that resume exactly: the state holds each layer's shuffle-buffer position, which
    names the chunk its current fill started at (see positioned_live_chunks)."""

    def __init__(self, buffers: dict[int, ShuffledBatches], fan: _FanOut) -> None:
        super().__init__(buffers)
        self.fan = fan

    def __iter__(self) -> Iterator[dict[int, Tensor]]:
        self.fan.start(min((b.state["pos"] for b in self.buffers.values()), key=_key))
        return super().__iter__()


def live_batches(
    lm: LoadedLM,
    layers: Sequence[int],
    batch_size: int,
    data: DataConfig,
    reader: ReaderConfig,
    seed: int,
    device,
    split: str = "train",
    rank: int = 0,
    world: int = 1,
    epochs: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> LayerBatches:
    """The batches cached_batches gives with shuffle_shards=False, computed from the model (no disk).

    Rows are rounded to the cache dtype first, exactly as the cache stores them, and kept in host memory
    (page-locked when the model is on a GPU), so the shuffle buffers take no device memory. The source resumes
    exactly from its state_dict(): the stream restarts at the chunk where each layer's current shuffle
    fill began, skipping the text before it without running the model over it.
    """

    def chunks_from(pos: dict) -> Iterator[tuple[dict[int, Tensor], dict]]:
        chunks = positioned_live_chunks(lm, layers, data, split, device, rank, world, epochs, pos, out_device="cpu")
        for chunk, after in chunks:
            yield chunk.rows, after

    fan = _FanOut(chunks_from, layers)
    buffers = {
        n: ShuffledBatches(
            fan.blocks(n), START, batch_size, reader.shuffle_buffer_tokens, seed + n, lambda x: x[0].to(out_dtype)
        )
        for n in layers
    }
    return LiveBatches(buffers, fan)
