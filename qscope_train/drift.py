"""Adaptation of released SAEs to a post-trained model: feature drift between the source and the adapted
SAE, and the per-layer before/after summary that goes into adapt.json and the adaptation report.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .sae import TopKSAE

DRIFT_THRESHOLD = 0.9  # a feature whose decoder direction keeps less than this cosine has moved noticeably
# cosine bins for the drift histograms: [-1, 0.5) lumped, then 0.02-wide bins up to 1
COS_EDGES = [-1.0, *[round(0.5 + 0.02 * i, 2) for i in range(26)]]


def feature_drift(
    source: TopKSAE,
    adapted: TopKSAE,
    top: int = 10,
    freq_before: Optional[Tensor] = None,
    freq_after: Optional[Tensor] = None,
) -> dict:
    """Per-feature cosine between source and adapted decoder columns (W_dec[:, i]) and encoder rows (W_enc[i]).

    Returns means, medians, the fraction below DRIFT_THRESHOLD, cosine histograms, and the `top` features
    whose decoder direction moved most (with their held-out firing frequencies when given).
    """
    if (source.d_model, source.d_sae) != (adapted.d_model, adapted.d_sae):
        raise InputError(
            f"cannot compare SAEs of different shapes: source (d_model {source.d_model}, d_sae {source.d_sae}) "
            f"vs adapted (d_model {adapted.d_model}, d_sae {adapted.d_sae})"
        )
    with torch.no_grad():
        dec_F = F.cosine_similarity(source.W_dec_FD.float().cpu(), adapted.W_dec_FD.float().cpu(), dim=1, eps=1e-12)
        enc_F = F.cosine_similarity(source.W_enc.float().cpu(), adapted.W_enc.float().cpu(), dim=1, eps=1e-12)
    order = dec_F.argsort()[:top].tolist()
    most_changed = []
    for i in order:
        row = {"feature": i, "decoder_cos": float(dec_F[i]), "encoder_cos": float(enc_F[i])}
        if freq_before is not None and freq_after is not None:
            row |= {"freq_before": float(freq_before[i]), "freq_after": float(freq_after[i])}
        most_changed.append(row)
    return {
        "decoder_cos_mean": float(dec_F.mean()),
        "decoder_cos_median": float(dec_F.median()),
        "encoder_cos_mean": float(enc_F.mean()),
        "encoder_cos_median": float(enc_F.median()),
        "frac_decoder_below_0.9": float((dec_F < DRIFT_THRESHOLD).double().mean()),
        "frac_encoder_below_0.9": float((enc_F < DRIFT_THRESHOLD).double().mean()),
        "decoder_cos_hist": _hist(dec_F),
        "encoder_cos_hist": _hist(enc_F),
        "most_changed": most_changed,
    }


def _hist(cos_F: Tensor) -> dict:
    edges = torch.tensor(COS_EDGES)
    # bucketize with right=True puts cos == edge into the bin to its right; 1.0 itself joins the last bin
    idx = torch.bucketize(cos_F.clamp(-1.0, 1.0 - 1e-7), edges, right=True) - 1
    counts = torch.bincount(idx.clamp(0, len(COS_EDGES) - 2), minlength=len(COS_EDGES) - 1)
    return {"edges": COS_EDGES, "counts": [int(c) for c in counts]}


BEFORE_AFTER_KEYS = (
    "fvu",
    "explained_variance",
    "explained_variance_legacy",
    "mse",
    "cosine",
    "l2_ratio",
    "relative_reconstruction_bias",
    "l0",
    "dead_frac",
    "dense_frac",
    "twin_frac",
    "average_max_decoder_cosine_sim",
)
DOWNSTREAM_KEYS = ("delta_ce", "ce_recovered", "kl", "ce_spliced", "consistent_activation_heuristic")


def before_after(before: dict, after: dict) -> dict:
    """{metric_before, metric_after} for the held-out and spliced-loss metrics that both sides have."""
    out = {}
    for key in (*BEFORE_AFTER_KEYS, *DOWNSTREAM_KEYS):
        if key in before and key in after:
            out[f"{key}_before"], out[f"{key}_after"] = before[key], after[key]
    for key in ("ce_clean", "ce_zero_ablated", "n_tokens", "n_scored_tokens"):
        if key in after:
            out[key] = after[key]
    return out
