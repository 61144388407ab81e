"""Trains one small SAE on fixed global batches, as one process or as one rank of several (gloo).

Usage: python ddp_worker.py OUT   or   torchrun --nproc_per_node 2 ddp_worker.py OUT
Rank r trains on rows [r*B/w, (r+1)*B/w) of every global batch; rank 0 saves the weights and logs, and
the collectives each step called (counted at torch.distributed, whatever helper called them).
"""

import os
import sys

import torch
import torch.distributed as dist

import qscope_train.trainer as trainer
from qscope_train.config import TrainerConfig
from qscope_train.data.batches import Unseekable
from qscope_train.sae import TopKSAE
from qscope_train.tracking import NullBar

B, D, F, K, STEPS = 64, 16, 256, 8, 12  # F > B: the data init reads four global batches


def main(out: str) -> None:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(40, D, generator=g), dim=-1)
    batches = []
    for _ in range(STEPS):
        codes = torch.rand(B, 40, generator=g) * (torch.rand(B, 40, generator=g) < 0.1)
        x = codes @ directions + 0.3
        batches.append({0: x[rank * B // world : (rank + 1) * B // world]})
    sae = TopKSAE(D, F, K)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    # the default recipe (signum, centred encoder, decoder directions from the first global batches) with a
    # one-batch dead window, so that AuxK is active in most steps, and a merge pass after every fourth step
    # (each rank's co-firing counts are added, so all of them merge the same duplicates)
    cfg = TrainerConfig(
        batch_size=B,
        lr=1e-2,
        dead_after_tokens=B,
        log_every=1,
        merge_cos=0.5,
        merge_every_tokens=4 * B,
    )
    logs = []
    init = {name: t.clone() for name, t in sae.state_dict().items()}
    calls, marks = _count_collectives()
    summary = trainer.fit({0: sae}, Unseekable(batches), cfg, STEPS, "cpu", lambda s, m: logs.append(m[0]), NullBar)
    marks.append(len(calls))
    per_step = [calls[a:b] for a, b in zip(marks, marks[1:], strict=False)]  # from one step's start to the next's
    if rank == 0:
        torch.save(
            {"state": sae.state_dict(), "init": init, "logs": logs, "per_step": per_step, "summary": summary}, out
        )
    if dist.is_initialized():
        # all ranks leave together: a rank tearing gloo down while rank 0 still saves can abort (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


def _count_collectives() -> tuple[list[str], list[int]]:
    """Record every collective by name, and where each training step starts in that record."""
    calls, marks = [], []
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter_tensor", "barrier"):
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    original_step = trainer.train_steps

    def step(*args, **kwargs):
        marks.append(len(calls))
        return original_step(*args, **kwargs)

    trainer.train_steps = step
    return calls, marks


if __name__ == "__main__":
    main(sys.argv[1])
