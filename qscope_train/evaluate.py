"""Held-out reconstruction metrics for one SAE: FVU, MSE, L0 and the fraction of latents that never fire."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError
from .sae import TopKSAE


class Evaluator:
    """Accumulates held-out statistics over (B, d_model) batches fed in any number of calls.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (1.0 = predicting the mean);
    l0: mean non-zero latents per row; dead_frac: latents that never fired on these rows.
    """

    def __init__(self, sae: TopKSAE, device: torch.device | str = "cpu", max_batch: int = 4096) -> None:
        self.sae, self.device, self.max_batch = sae.to(device).eval(), device, max_batch
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sse, self.sum_sq, self.l0 = (torch.zeros((), **f64) for _ in range(3))
        self.sum_x_D = torch.zeros(sae.d_model, **f64)
        self.fires_F = torch.zeros(sae.d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, x_ND: Tensor) -> None:
        for x_BD in x_ND.split(self.max_batch):
            x_BD = x_BD.to(self.device).float()
            out = self.sae(x_BD)
            self.sse += (x_BD - out.x_hat_BD).double().pow(2).sum()
            self.sum_x_D += x_BD.double().sum(0)
            self.sum_sq += x_BD.double().pow(2).sum()
            nonzero_BK = out.code.vals_BK != 0
            self.l0 += nonzero_BK.sum()
            self.fires_F += out.code.fire_counts(self.sae.d_sae)
            self.n += x_BD.shape[0]

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise InputError("no held-out rows to evaluate on")
        centered = self.sum_sq - self.sum_x_D.pow(2).sum() / self.n
        return {
            "fvu": float(self.sse / centered),
            "mse": float(self.sse / (self.n * self.sae.d_model)),
            "l0": float(self.l0 / self.n),
            "dead_frac": float((self.fires_F == 0).double().mean()),
            "n_tokens": self.n,
        }
