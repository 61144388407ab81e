"""Optimizers and learning-rate schedules for the SAEs: fused Adam with warmup and linear decay, or signum
(sign descent, as sparsify trains) under schedule-free averaging (the `schedulefree` package)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from schedulefree import ScheduleFreeWrapper
from torch import nn

from .config import OptimizerName, TrainerConfig

SCHEDULE_FREE_MOMENTUM = 0.95  # sparsify's setting for signum; schedulefree's own default is 0.9
# Adam: Gao et al.'s (2024) rate. signum: half of sparsify's 5e-3 at 1M tokens, chosen on
# scripts/bench_quality.py (with the data-initialised decoder, 5e-3 leaves more latents dead and recovers
# fewer true directions), and lower for longer runs, since sign descent's step noise does not shrink on
# its own. Measured from 1M to 8M tokens; past 16M the rate stays at a quarter (unmeasured there:
# sparsify keeps one rate for runs of any length).
SIGNUM_REFERENCE_TOKENS, SIGNUM_LONGEST_TOKENS = 2**20, 2**24
BASE_LR = {OptimizerName.adam: 2e-4, OptimizerName.signum: 2.5e-3}


def default_lr(d_sae: int, optimizer: OptimizerName = OptimizerName.signum, run_tokens: int | None = None) -> float:
    """BASE_LR / sqrt(d_sae / 2^14) (Gao et al.'s 2024 width scaling for TopK SAEs); for signum, times
    sqrt(2^20 / run_tokens) when the run is longer than 2^20 tokens (at most 4x lower, from 2^24 tokens on)."""
    lr = BASE_LR[optimizer] / math.sqrt(d_sae / 2**14)
    if optimizer is OptimizerName.signum and run_tokens is not None and run_tokens > SIGNUM_REFERENCE_TOKENS:
        lr *= math.sqrt(SIGNUM_REFERENCE_TOKENS / min(run_tokens, SIGNUM_LONGEST_TOKENS))
    return lr


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warmup over `warmup` steps, flat, then linear decay to 0 over the last decay_fraction."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = total - int(total * decay_fraction)
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


class SignSGD(torch.optim.Optimizer):
    """Steepest descent in the L-infinity norm: p -= lr * sign(grad) (Bernstein et al. 2018)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class SwapFreeScheduleFree(ScheduleFreeWrapper):
    """schedulefree's ScheduleFreeWrapper, exchanging a parameter with its z buffer by handing over their
    storages instead of three XOR passes over the bytes. Values and results are identical (a test steps
    both side by side); at d_sae 16384 x 1024 the XOR swaps were a quarter of a signum step's time.
    Nothing in qscope_train keeps a reference to a parameter's storage across a step."""

    @staticmethod
    def swap(x: torch.Tensor, y: torch.Tensor) -> None:
        held = x.data
        x.data = y.data
        y.data = held


def build(params: list[nn.Parameter], cfg: TrainerConfig, d_sae: int, total_steps: int):
    """(optimizer, scheduler) for one SAE. The scheduler scales group["lr"] by lr_factor every step; under
    schedule-free averaging the optimizer is in train mode (its parameters are the y sequence)."""
    lr = cfg.lr if cfg.lr is not None else default_lr(d_sae, cfg.optimizer, total_steps * cfg.batch_size)
    if cfg.optimizer is OptimizerName.adam:
        # the fused kernel: 7x faster than foreach on a 2-core CPU
        opt = base = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    else:
        base = SignSGD(params, lr)
        opt = SwapFreeScheduleFree(base, momentum=SCHEDULE_FREE_MOMENTUM, r=cfg.average_power)
        opt.train()
    sched = torch.optim.lr_scheduler.LambdaLR(
        base, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.decay_fraction)
    )
    return opt, sched


@torch.no_grad()
def averaged_weight(opt, p: nn.Parameter) -> torch.Tensor:
    """A copy of the weight a run would export for parameter p, without touching the optimizer:
    schedule-free's average x (its parameters are y = x + (1 - momentum)(z - x) while training)."""
    if isinstance(opt, ScheduleFreeWrapper) and opt.train_mode and "z" in opt.state[p]:
        return p.detach().lerp(opt.state[p]["z"], 1 - 1 / opt.momentum)
    return p.detach().clone()


def use_averaged_weights_(opt) -> None:
    """Leave the parameters at the weights a run exports: schedule-free's average x (its eval mode);
    Adam's parameters already are."""
    if isinstance(opt, ScheduleFreeWrapper):
        opt.eval()


@torch.no_grad()
def overwrite_rows_(opt, p: nn.Parameter, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Set rows of parameter p to `values` in the optimizer's view too: under schedule-free the parameter
    (y), its z buffer and so the average x all take them; Adam's moments for those rows restart at 0."""
    p[rows] = values.to(p.dtype)
    for key, buf in opt.state.get(p, {}).items():
        if key == "z":
            buf[rows] = values.to(buf.dtype)
        elif key in ("exp_avg", "exp_avg_sq"):
            buf[rows] = 0
