"""Held-out reconstruction metrics for one SAE: FVU, MSE, L0 and the fraction of latents that never fire."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .sae import TopKSAE


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, batches: Iterable[Tensor], device: torch.device | str = "cpu") -> dict[str, float]:
    """Stream (B, d_model) held-out batches through the SAE.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (1.0 = predicting the mean);
    l0: mean non-zero latents per row; dead_frac: latents that never fired on these rows.
    """
    sae = sae.to(device).eval()
    n = 0
    sse = torch.zeros((), dtype=torch.float64, device=device)
    sum_x_D = torch.zeros(sae.d_model, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    l0_sum = torch.zeros((), dtype=torch.float64, device=device)
    fires_F = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    for x_BD in batches:
        x_BD = x_BD.to(device).float()
        out = sae(x_BD)
        sse += (x_BD - out.x_hat_BD).double().pow(2).sum()
        sum_x_D += x_BD.double().sum(0)
        sum_sq += x_BD.double().pow(2).sum()
        nonzero_BK = out.code.vals_BK != 0
        l0_sum += nonzero_BK.sum()
        fires_F += torch.bincount(out.code.idx_BK[nonzero_BK], minlength=sae.d_sae)
        n += x_BD.shape[0]
    if n == 0:
        raise ValueError("no held-out rows to evaluate on")
    centered = sum_sq - sum_x_D.pow(2).sum() / n
    return {
        "fvu": float(sse / centered),
        "mse": float(sse / (n * sae.d_model)),
        "l0": float(l0_sum / n),
        "dead_frac": float((fires_F == 0).double().mean()),
        "n_tokens": n,
    }
