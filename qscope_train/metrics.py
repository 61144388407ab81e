"""Held-out reconstruction metrics for one SAE: FVU (centered and uncentered), MSE, cosine, l2 ratio,
relative reconstruction bias, SAEBench's legacy explained variance, L0, dead, dense and frequent
fractions, the log10 firing-frequency histogram, and the weights' scorecard (scorecard.py: twins,
max cosines) with the latents that fired on these rows as the live ones.

Spliced next-token loss lives in splice.py; the markdown/PNG report in report.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError
from .sae import TopKSAE
from .scorecard import weight_metrics

# log10 firing-frequency bins: 10^-8 .. 10^0 in quarter decades; latents that never fired are counted apart
HIST_LO, HIST_HI, HIST_BINS = -8.0, 0.0, 32
LEGACY_EV_ROWS = 2048  # SAEBench's legacy explained variance centres each token on its batch's mean: 16 x 128 tokens


class Evaluator:
    """Accumulates held-out statistics over (B, d_model) batches fed in any number of calls.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (1.0 = predicting the mean);
    fvu_uncentered: the same over sum ||x||^2 (1.0 = predicting zero); explained_variance = 1 - fvu;
    explained_variance_legacy: SAEBench's per-token form, the mean over rows of
    1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2 (batches of LEGACY_EV_ROWS rows as fed);
    cosine and l2_ratio: means over rows of cos(x, x_hat) and ||x_hat|| / ||x||;
    relative_reconstruction_bias: sum ||x_hat||^2 / sum <x, x_hat> (1: no shrinkage);
    l0: mean non-zero latents per row; dead_frac: latents that never fired on these rows;
    dense_frac: latents firing on more than dense_threshold of the rows; freq_over_1_percent and
    freq_over_10_percent: SAEBench's shares of latents firing on more than 1 % and 10 % of the rows.
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
        self.sse, self.sum_sq, self.l0, self.cos, self.l2_ratio = (torch.zeros((), **f64) for _ in range(5))
        self.out_sq, self.in_out, self.ev_legacy = (torch.zeros((), **f64) for _ in range(3))
        self.sum_x_D = torch.zeros(sae.d_model, **f64)
        self.fires_F = torch.zeros(sae.d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, x_ND: Tensor) -> None:
        for x_BD in x_ND.split(min(self.max_batch, LEGACY_EV_ROWS)):
            x_BD = x_BD.to(self.device).float()
            out = self.sae(x_BD)
            x_hat_BD = out.x_hat_BD
            self.sse += (x_BD - x_hat_BD).double().pow(2).sum()
            self.sum_x_D += x_BD.double().sum(0)
            self.sum_sq += x_BD.double().pow(2).sum()
            self.cos += torch.nn.functional.cosine_similarity(x_hat_BD, x_BD, dim=-1, eps=1e-12).double().sum()
            self.l2_ratio += (x_hat_BD.norm(dim=-1) / x_BD.norm(dim=-1).clamp_min(1e-12)).double().sum()
            self.out_sq += x_hat_BD.double().pow(2).sum()
            self.in_out += (x_BD.double() * x_hat_BD.double()).sum()
            err_B = (x_BD - x_hat_BD).double().pow(2).sum(-1)
            spread_B = (x_BD - x_BD.mean(0)).double().pow(2).sum(-1)
            self.ev_legacy += (1 - err_B / spread_B.clamp_min(1e-30)).sum()
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
            "explained_variance_legacy": float(self.ev_legacy / self.n),
            "l2_ratio": float(self.l2_ratio / self.n),
            "relative_reconstruction_bias": float(self.out_sq / self.in_out),
            "l0": float(self.l0 / self.n),
            "dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float((freq > self.dense_threshold).double().mean()),
            "freq_over_1_percent": float((freq > 0.01).double().mean()),
            "freq_over_10_percent": float((freq > 0.1).double().mean()),
            "n_tokens": self.n,
            "firing_hist": firing_histogram(freq),
            **weight_metrics(self.sae.W_enc, self.sae.W_dec_FD, freq > 0),
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
