"""The quality scorecard beyond FVU: twin latents (two live latents with one decoder direction) and the
weight-based and per-sequence parts of SAEBench's core metrics. The per-token parts (l2_ratio,
relative reconstruction bias, the legacy explained variance) accumulate in metrics.Evaluator.

Every formula is written out in the README's "Quality scorecard" section, with SAEBench's names.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

TWIN_COS = 0.95  # two live latents whose decoder directions are this parallel show the user one feature twice
# bins of each live latent's largest decoder cosine to another live latent: below 0 lumped, then 0.05 wide
MAX_COS_EDGES = [-1.0, *[round(0.05 * i, 2) for i in range(21)]]
COS_CHUNK = 2048  # rows of the d_sae x d_sae cosine matrix formed at once


@torch.no_grad()
def max_cosines(M_FD: Tensor, among_F: Optional[Tensor] = None, chunk: int = COS_CHUNK) -> tuple[Tensor, Tensor]:
    """For every row i of M_FD (d_sae, d_model): max over rows j != i (only rows in among_F, a (d_sae,) bool,
    when given) of cos(M_i, M_j), and that j. Rows outside among_F get -inf and -1; so does a row with no
    other row to compare with. The d_sae x d_sae cosines are formed `chunk` rows at a time."""
    d_sae = M_FD.shape[0]
    among = torch.ones(d_sae, dtype=torch.bool, device=M_FD.device) if among_F is None else among_F.to(M_FD.device)
    idx_A = among.nonzero().squeeze(1)
    unit_AD = torch.nn.functional.normalize(M_FD[idx_A].float(), dim=1)
    best_F = torch.full((d_sae,), -torch.inf, device=M_FD.device)
    partner_F = torch.full((d_sae,), -1, dtype=torch.long, device=M_FD.device)
    for start in range(0, unit_AD.shape[0], chunk):
        cos_CA = unit_AD[start : start + chunk] @ unit_AD.T
        rows = torch.arange(cos_CA.shape[0], device=cos_CA.device)
        cos_CA[rows, rows + start] = -torch.inf  # a latent is not its own twin
        top_C, at_C = cos_CA.max(dim=1)
        mine = idx_A[start : start + cos_CA.shape[0]]
        best_F[mine] = top_C
        partner_F[mine] = torch.where(top_C > -torch.inf, idx_A[at_C], -1)
    return best_F, partner_F


def cos_histogram(cos_A: Tensor) -> dict:
    """Counts of cosines per MAX_COS_EDGES bin (the first bin holds every cosine below 0)."""
    edges = torch.tensor(MAX_COS_EDGES[1:-1], dtype=cos_A.dtype, device=cos_A.device)
    counts = torch.bincount(torch.bucketize(cos_A, edges, right=True), minlength=len(MAX_COS_EDGES) - 1)
    return {"edges": MAX_COS_EDGES, "counts": [int(c) for c in counts]}


@torch.no_grad()
def twins(W_dec_FD: Tensor, live_F: Tensor, cos: float = TWIN_COS) -> dict:
    """Twin latents among the live ones (live_F, (d_sae,) bool): twin_frac, the share of live latents with
    another live latent at decoder cosine >= cos (twin_frac_99: >= 0.99); live, their count; and the
    histogram of each live latent's largest decoder cosine to another live latent."""
    best_F, _ = max_cosines(W_dec_FD, live_F)
    best_A = best_F[live_F.to(best_F.device)]
    live = int(best_A.numel())
    best_A = best_A[torch.isfinite(best_A)]  # a lone live latent has nothing to be a twin of
    return {
        "twin_frac": float((best_A >= cos).sum()) / max(live, 1),
        "twin_frac_99": float((best_A >= 0.99).sum()) / max(live, 1),
        "live": live,
        "max_decoder_cos_hist": cos_histogram(best_A.float().cpu()),
    }


@torch.no_grad()
def weight_metrics(W_enc_FD: Tensor, W_dec_FD: Tensor, live_F: Optional[Tensor] = None) -> dict:
    """SAEBench's weight-based core metrics over all latents: the means over latents of the largest cosine
    to another latent's decoder (average_max_decoder_cosine_sim) and encoder (average_max_encoder_cosine_sim)
    row, and the mean cosine between each latent's encoder row and decoder direction
    (encoder_decoder_cosine_sim, SAEBench's per-latent figure averaged); with live_F, the twins too."""
    out = {
        "average_max_decoder_cosine_sim": float(max_cosines(W_dec_FD)[0].mean()),
        "average_max_encoder_cosine_sim": float(max_cosines(W_enc_FD)[0].mean()),
        "encoder_decoder_cosine_sim": float(
            torch.nn.functional.cosine_similarity(W_enc_FD.float(), W_dec_FD.float(), dim=1, eps=1e-12).mean()
        ),
    }
    return out if live_F is None else out | twins(W_dec_FD, live_F)


class SequenceFiring:
    """SAEBench's consistent-activation heuristic: per latent, the tokens it fires on over the sequences it
    fires in at least once, counted over (sequence, token) codes fed in any number of calls."""

    def __init__(self, d_sae: int) -> None:
        self.tokens_F = torch.zeros(d_sae, dtype=torch.float64)
        self.sequences_F = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def add(self, idx_BTK: Tensor, vals_BTK: Tensor, mask_BT: Optional[Tensor] = None) -> None:
        """The top-k code of B sequences of T tokens; mask_BT (bool) marks the tokens that count."""
        B, T, K = idx_BTK.shape
        fired_BTK = vals_BTK > 0
        if mask_BT is not None:
            fired_BTK &= mask_BT[..., None].to(fired_BTK.device)
        d_sae = self.tokens_F.numel()
        hits = torch.zeros(B, d_sae, dtype=torch.float64, device=idx_BTK.device)
        hits.scatter_add_(1, idx_BTK.reshape(B, T * K), fired_BTK.reshape(B, T * K).double())
        self.tokens_F += hits.sum(0).cpu()
        self.sequences_F += (hits > 0).sum(0).double().cpu()

    def result(self) -> dict:
        """consistent_activation_heuristic: the mean over latents that fired of tokens / sequences (1 at
        least: a latent firing on one token per sequence; up to the sequence length)."""
        fired = self.sequences_F > 0
        per_F = self.tokens_F[fired] / self.sequences_F[fired]
        return {"consistent_activation_heuristic": float(per_F.mean()) if fired.any() else float("nan")}
