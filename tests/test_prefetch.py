"""The prefetch thread: same batches, each with the reader's position after it, errors in order."""

import threading

import pytest
import torch

from qscope_train.data.prefetch import Prefetched


class _Counting:
    """A seekable source of numbered batches that fails at `fail_at`, if given."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.pos = n, fail_at, 0

    def __iter__(self):
        while self.pos < self.n:
            if self.pos == self.fail_at:
                raise ValueError(f"bad shard at {self.pos}")
            self.pos += 1
            yield {0: torch.full((2, 3), float(self.pos - 1))}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_come_in_order_each_with_the_position_after_it(depth):
    with Prefetched(_Counting(6), depth) as src:
        items = list(src)
    assert [int(b[0][0, 0]) for b, _ in items] == list(range(6))
    assert [pos["pos"] for _, pos in items] == list(range(1, 7))


def test_the_reader_runs_ahead_on_another_thread():
    seen = []

    class Spy(_Counting):
        def state_dict(self):
            seen.append(threading.current_thread().name)
            return super().state_dict()

    with Prefetched(Spy(3), 2) as src:
        list(src)
    assert set(seen) == {"qscope-prefetch"}


@pytest.mark.parametrize("depth", [0, 2])
def test_a_reader_error_arrives_after_the_batches_before_it(depth):
    got = []
    with pytest.raises(ValueError, match="bad shard at 4"):
        with Prefetched(_Counting(10, fail_at=4), depth) as src:
            for b, _ in src:
                got.append(int(b[0][0, 0]))
    assert got == [0, 1, 2, 3]


def test_leaving_early_stops_the_thread():
    src = Prefetched(_Counting(10_000), 2)
    with src:
        for i, _ in enumerate(src):
            if i == 3:
                break
    assert src._thread is not None and not src._thread.is_alive()


def test_pinning_is_asked_only_for_cpu_tensors(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t)
    with Prefetched(_Counting(2), 1, pin=True) as src:
        list(src)
    assert pinned == [torch.Size([2, 3])] * 2
