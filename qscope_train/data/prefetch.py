"""Batches read ahead on a background thread, each paired with the reader's position right after it, so
the training thread never waits on the reader and a checkpoint records where the trained batches end."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from .batches import BatchSource

Item = tuple[dict[int, Tensor], Optional[dict]]  # a {layer: rows} batch and the reader's state after it
_END = object()


def _pinned(batch: dict[int, Tensor]) -> dict[int, Tensor]:
    """Page-locked copies of CPU rows, so that a non-blocking copy to the GPU really is asynchronous."""
    return {n: t.pin_memory() if t.device.type == "cpu" else t for n, t in batch.items()}


class Prefetched:
    """Iterate `source` `depth` batches ahead on a daemon thread (pinned when `pin`); yields (batch,
    position). depth 0 reads on the caller's thread. The source must not be touched by anyone else
    while this iterates; an error in the reader is raised on the caller's thread at the batch where it
    happened, after the batches before it. Use as a context manager: leaving stops the thread."""

    def __init__(self, source: BatchSource, depth: int = 2, pin: bool = False) -> None:
        self.source, self.depth, self.pin = source, depth, pin
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _items(self) -> Iterator[Item]:
        for batch in self.source:
            yield (_pinned(batch) if self.pin else batch), self.source.state_dict()

    def __iter__(self) -> Iterator[Item]:
        if self.depth <= 0:
            yield from self._items()
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(q,), name="qscope-prefetch", daemon=True)
        self._thread.start()
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _produce(self, q: queue.Queue) -> None:
        # on a GPU, whatever device work the source does (a live source's model forward) goes on a
        # stream of its own, beside the training step's kernels; its rows reach this thread's consumer
        # in host memory, and forward_chunk waits for its own copies, so no event crosses the streams
        side = torch.cuda.stream(torch.cuda.Stream()) if self.pin and torch.cuda.is_available() else nullcontext()
        try:
            with side:
                for item in self._items():
                    if not self._put(q, item):
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(q, e)
            return
        self._put(q, _END)

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_device(batch: dict[int, Tensor], device: torch.device | str) -> dict[int, Tensor]:
    """The batch on `device` (non-blocking from pinned memory), in its stored dtype: the trainer widens it
    to fp32 there, so a bf16 cache crosses the bus at half the bytes."""
    return {n: t.to(device, non_blocking=True) for n, t in batch.items()}
