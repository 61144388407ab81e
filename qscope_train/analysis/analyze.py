"""analyze: a text's strongest features on every token, at every layer, from one forward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..errors import InputError
from .model import Analyzer


@torch.no_grad()
def analyze(an: Analyzer, text: str, top: int = 5, layers: Optional[Sequence[int]] = None) -> dict:
    """Per layer: each token's `top` strongest firing features [(feature, activation), ...] (strongest first),
    and the text's `top` features by their largest activation, each with its activation on every token
    (the rows of a heatmap). JSON-ready: {"tokens", "ids", "layers": {layer: {"per_token", "features"}}}."""
    if top < 1:
        raise InputError(f"top must be at least 1, got {top}")
    layers = an.pick_layers(layers)
    enc = an.encode(text)
    T = enc.ids_T.numel()
    result: dict = {"tokens": an.token_strings(enc.ids_T), "ids": enc.ids_T.tolist(), "layers": {}}
    for n in layers:
        vals_TK, idx_TK = enc.codes[n]
        sae = an.saes[n]
        vals_TK = vals_TK.masked_fill(vals_TK <= 0, 0.0)  # a plain top-k can pick values <= 0: not firing
        v_TK, order = vals_TK.topk(min(top, vals_TK.shape[1]), dim=1)
        f_TK = idx_TK.gather(1, order)
        per_token = [
            [(int(f), float(a)) for f, a in zip(f_row, v_row, strict=True) if a > 0]
            for f_row, v_row in zip(f_TK.tolist(), v_TK.tolist(), strict=True)
        ]
        dense_TF = torch.zeros(T, sae.d_sae, device=vals_TK.device).scatter_(1, idx_TK, vals_TK)
        peak_F = dense_TF.max(0).values
        n_firing = int((peak_F > 0).sum())
        peak, feats = peak_F.topk(min(top, n_firing))
        features = [
            {"feature": int(f), "max": float(m), "acts": dense_TF[:, f].tolist()}
            for f, m in zip(feats.tolist(), peak.tolist(), strict=True)
        ]
        result["layers"][n] = {"per_token": per_token, "features": features}
    return result
