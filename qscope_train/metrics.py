"""Held-out reconstruction metrics for one SAE: FVU (centered and uncentered), MSE, cosine, relative
norm, L0, dead and dense fractions, and the log10 firing-frequency histogram.

Spliced next-token loss lives in splice.py; the markdown/PNG report in report.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError
from .sae import TopKSAE

# log10 firing-frequency bins: 10^-8 .. 10^0 in quarter decades; latents that never fired are counted apart
HIST_LO, HIST_HI, HIST_BINS = -8.0, 0.0, 32


class Evaluator:
    """Accumulates held-out statistics over (B, d_model) batches fed in any number of calls.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (1.0 = predicting the mean);
    fvu_uncentered: the same over sum ||x||^2 (1.0 = predicting zero); explained_variance = 1 - fvu;
    cosine and rel_norm: means over rows of cos(x, x_hat) and ||x_hat|| / ||x||;
    l0: mean non-zero latents per row; dead_frac: latents that never fired on these rows;
    dense_frac: latents firing on more than dense_threshold of the rows.
    """

    def __init__(
        self,
        sae: TopKSAE,
        device: torch.device | str = "cpu",
        max_batch: int = 4096,
        dense_threshold: float = 0.1,
    ) -> None:
        self.sae, self.device, self.max_batch = sae.to(device).eval(), device, max_batch
        self.dense_threshold = dense_threshold
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sse, self.sum_sq, self.l0, self.cos, self.rel_norm = (torch.zeros((), **f64) for _ in range(5))
        self.sum_x_D = torch.zeros(sae.d_model, **f64)
        self.fires_F = torch.zeros(sae.d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, x_ND: Tensor) -> None:
        for x_BD in x_ND.split(self.max_batch):
            x_BD = x_BD.to(self.device).float()
            out = self.sae(x_BD)
            x_hat_BD = out.x_hat_BD
            self.sse += (x_BD - x_hat_BD).double().pow(2).sum()
            self.sum_x_D += x_BD.double().sum(0)
            self.sum_sq += x_BD.double().pow(2).sum()
            self.cos += torch.nn.functional.cosine_similarity(x_hat_BD, x_BD, dim=-1, eps=1e-12).double().sum()
            self.rel_norm += (x_hat_BD.norm(dim=-1) / x_BD.norm(dim=-1).clamp_min(1e-12)).double().sum()
            self.l0 += (out.code.vals_BK != 0).sum()
            self.fires_F += out.code.fire_counts(self.sae.d_sae)
            self.n += x_BD.shape[0]

    def frequencies(self) -> Tensor:
        """Fraction of held-out rows on which each latent fired, (d_sae,) float64 on the CPU."""
        return (self.fires_F.double() / max(self.n, 1)).cpu()

    def result(self) -> dict:
        if self.n == 0:
            raise InputError("no held-out rows to evaluate on")
        centered = self.sum_sq - self.sum_x_D.pow(2).sum() / self.n
        freq = self.frequencies()
        fvu = float(self.sse / centered)
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "fvu_uncentered": float(self.sse / self.sum_sq),
            "explained_variance_uncentered": 1.0 - float(self.sse / self.sum_sq),
            "mse": float(self.sse / (self.n * self.sae.d_model)),
            "cosine": float(self.cos / self.n),
            "rel_norm": float(self.rel_norm / self.n),
            "l0": float(self.l0 / self.n),
            "dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float((freq > self.dense_threshold).double().mean()),
            "n_tokens": self.n,
            "firing_hist": firing_histogram(freq),
        }


def firing_histogram(freq_F: Tensor) -> dict:
    """Counts of latents per log10 firing-frequency bin; `never` counts latents with frequency 0."""
    alive = freq_F[freq_F > 0]
    counts = torch.histc(alive.log10().float(), bins=HIST_BINS, min=HIST_LO, max=HIST_HI) if len(alive) else None
    edges = torch.linspace(HIST_LO, HIST_HI, HIST_BINS + 1)
    return {
        "log10_edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts] if counts is not None else [0] * HIST_BINS,
        "never": int((freq_F == 0).sum()),
    }


def scalar_metrics(m: dict) -> dict:
    """The scalar entries of a metrics dict (what goes to wandb and tables)."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
