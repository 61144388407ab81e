"""The fit stage's memory plan: bytes per layer (SAE, optimizer state, gradients, counters) and per step
(batch temporaries), the device's free memory, and how many sequential layer groups fit in it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .config import OptimizerName
from .errors import ConfigError
from .objectives import AUXK_ROWS

HEADROOM = 0.85  # of the free memory, the share a plan may fill (allocator slack, the model in live runs)
GiB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    layer_bytes: int  # kept for every layer of a group during its pass
    step_bytes: int  # one step's temporaries, for the layer training at that moment
    available: int  # free memory on the device (or the host) at planning time
    groups: list[list[int]]

    def describe(self, device: torch.device | str) -> str:
        per_group = max(len(g) for g in self.groups)
        return (
            f"memory plan: {self.layer_bytes / GiB:.2f} GiB per layer (SAE, optimizer state, gradients, "
            f"counters) + {self.step_bytes / GiB:.2f} GiB of step temporaries; {device} has "
            f"{self.available / GiB:.1f} GiB free; {sum(map(len, self.groups))} layers in "
            f"{len(self.groups)} group(s) of up to {per_group}"
        )


def layer_bytes(d_model: int, d_sae: int, optimizer: OptimizerName, data_parallel: bool) -> int:
    """What one layer holds throughout its pass: fp32 parameters, the optimizer's state (schedule-free's z
    for signum, Adam's two moments), the dead counters, and under data parallel its gradients (every
    layer's sit in one buffer for the step's single all-reduce)."""
    params = (2 * d_sae * d_model + d_sae + d_model) * 4
    state = params * (2 if optimizer is OptimizerName.adam else 1)
    return params + state + d_sae * 8 + (params + d_sae * 4 if data_parallel else 0)


def step_bytes(d_model: int, d_sae: int, k: int, batch: int, data_parallel: bool, bf16_gemm: bool = False) -> int:
    """One layer's step at its peak, the larger of its two phases (the worst step: AuxK with every latent
    dead, which masks a copy of the pre-activations of the rows it reads):
    - forward and AuxK: the dense pre-activations (B x d_sae fp32) and AuxK's masked copy of its rows
      (B / AUXK_ROWS of them; a bf16 encoder GEMM adds its bf16 product), eight B x d_model fp32
      temporaries (batch, centred input, reconstruction, residuals, their squares) and the sparse code's
      bookkeeping;
    - backward and update: the layer's gradients (under data parallel they sit in layer_bytes), the
      pre-activations of AuxK's rows still held, one weight matrix's optimizer temporary and the same
      B x d_model ones.
    Checked against the live peak of real steps on a CPU (tests/test_plan.py)."""
    params = (2 * d_sae * d_model + d_sae + d_model) * 4
    pre = batch * d_sae * 4
    rows = 8 * batch * d_model * 4
    forward = pre + pre // AUXK_ROWS + (pre // 2 if bf16_gemm else 0) + rows + 6 * batch * k * 8
    backward = (0 if data_parallel else params) + pre // AUXK_ROWS + d_sae * d_model * 4 + rows
    return max(forward, backward)


def free_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def plan(
    layers: list[int],
    d_model: int,
    d_sae: int,
    k: int,
    batch: int,
    optimizer: OptimizerName,
    groups: int | None,
    device: torch.device | str,
    data_parallel: bool = False,
    bf16_gemm: bool = False,
    available: int | None = None,
) -> MemoryPlan:
    """Split `layers` into contiguous groups: `groups` of them, or (None: auto) as few as fit in HEADROOM
    of the free memory (`available` bytes where given, else the device's free memory now). Refuses auto
    when even one layer does not fit."""
    per_layer = layer_bytes(d_model, d_sae, optimizer, data_parallel)
    per_step = step_bytes(d_model, d_sae, k, batch, data_parallel, bf16_gemm)
    available = free_bytes(device) if available is None else available
    n = groups
    if n is None:
        room = int(available * HEADROOM) - per_step
        if room < per_layer:
            raise ConfigError(
                f"trainer.layer_groups=auto: one layer needs {(per_layer + per_step) / GiB:.2f} GiB "
                f"but {device} has {available / GiB:.2f} GiB free; lower trainer.batch_size or sae.d_sae"
            )
        n = math.ceil(len(layers) / (room // per_layer))
    n = min(n, len(layers))
    size = math.ceil(len(layers) / n)
    split = [layers[i : i + size] for i in range(0, len(layers), size)]
    return MemoryPlan(per_layer, per_step, available, split)
