"""The live memory peak of a real training step on this CPU against the fit's memory model (memory.py).

Runs a few steps of one layer's SAE, the worst kind (AuxK with every latent dead, which masks a copy of
the pre-activations of the rows it reads), and reads the process's resident-set high-water mark (VmHWM,
reset through /proc/self/clear_refs after a warm-up). Run it with glibc's mmap threshold low, so that every large tensor
is its own mapping and is returned on free: the high-water mark is then the live peak, not the heap's:

    MALLOC_MMAP_THRESHOLD_=65536 python scripts/bench_step_memory.py --d-model 128 --d-sae 24576 --k 48 --batch 1536

Prints one JSON line: the measured peak, the model's figure (memory.layer_bytes, less the parameters that
exist before the step, plus memory.step_bytes) and their ratio. Linux only.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from qscope_train import memory
from qscope_train.config import TrainerConfig
from qscope_train.sae import TopKSAE
from qscope_train.trainer import new_state, train_step


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def peak_of_steps(d_model: int, d_sae: int, k: int, batch: int, steps: int) -> tuple[int, int]:
    """(measured live peak, modelled bytes) of `steps` all-dead steps on a fresh layer."""
    xs = [torch.randn(batch, d_model) for _ in range(3)]
    sae = TopKSAE(d_model, d_sae, k)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=batch, dead_after_tokens=batch).resolved(100)
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    state = new_state(sae, cfg, 100, "cpu")
    for i in range(steps):
        if i:  # from the second step on every latent is dead: AuxK's worst case
            state.since_fired_F.fill_(cfg.dead_after_tokens)
        train_step(state, xs[i % 3], cfg, i)
    peak = status("VmHWM") - base
    model = memory.layer_bytes(d_model, d_sae, cfg.optimizer, False) - params
    return peak, model + memory.step_bytes(d_model, d_sae, k, batch, False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--batch", type=int, default=1536)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    peak_of_steps(32, 256, 8, 128, 3)  # warm-up: thread pools and lazy initialisation, outside the figure
    peak, model = peak_of_steps(a.d_model, a.d_sae, a.k, a.batch, a.steps)
    print(
        json.dumps(
            {
                "peak_bytes": peak,
                "model_bytes": model,
                "model_over_peak": round(model / peak, 3),
                "settings": vars(a),
            }
        )
    )


if __name__ == "__main__":
    main()
