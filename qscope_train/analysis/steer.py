"""steer: generate with features pushed along their decoder directions (or clamped at a value) at chosen
layers and positions, beside the same generation without them, with each token's probability."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from .model import Analyzer


class Positions(StrEnum):
    prompt = "prompt"  # the prompt's tokens only
    generated = "generated"  # the generated tokens only
    both = "both"


@dataclass
class Edit:
    """One feature's intervention at one layer: add `strength` times its unit decoder direction (with
    `relative`, strength is in units of the layer's typical residual norm, Analyzer.norms), or, with
    `clamp`, move the residual along the decoder direction until the SAE reads the feature at that value."""

    layer: int
    feature: int
    strength: float = 0.0
    clamp: Optional[float] = None
    relative: bool = True
    positions: Positions = Positions.both

    def __post_init__(self) -> None:
        self.positions = Positions(self.positions)


def _position_mask(T: int, prompt_len: int, positions: Positions, device) -> Tensor:
    t = torch.arange(T, device=device)
    if positions is Positions.prompt:
        return t < prompt_len
    if positions is Positions.generated:
        return t >= prompt_len
    return torch.ones(T, dtype=torch.bool, device=device)


def _edit_hook(an: Analyzer, edit: Edit, prompt_len: int):
    sae = an.saes[edit.layer]
    f = edit.feature
    d_D = sae.W_dec_FD[f].float()
    unit_D = d_D / d_D.norm().clamp_min(1e-12)
    scale = an.norms[edit.layer] if edit.relative and edit.clamp is None else 1.0
    if edit.clamp is not None:
        gain = float(sae.W_enc[f].float() @ d_D)  # d pre_f / d (step along d_D)
        if abs(gain) < 1e-6:
            raise InputError(
                f"layer {edit.layer} feature {f}: its encoder row is orthogonal to its decoder, so no step along the decoder can clamp it"
            )

    def hook(_module, _inputs, output):
        h_BTD = output[0] if isinstance(output, tuple) else output
        mask_T = _position_mask(h_BTD.shape[1], prompt_len, edit.positions, h_BTD.device)
        h = h_BTD.float()
        if edit.clamp is None:
            h[:, mask_T] += edit.strength * scale * unit_D
        else:
            rows = h[:, mask_T]
            pre = sae.pre_acts(rows.reshape(-1, rows.shape[-1]))[:, f].reshape(rows.shape[:-1])
            h[:, mask_T] = rows + ((edit.clamp - pre) / gain)[..., None] * d_D
        h = h.to(h_BTD.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


@contextmanager
def steering(an: Analyzer, edits: Sequence[Edit], prompt_len: int) -> Iterator[None]:
    """Forward hooks applying `edits` while the context is open (positions counted from the sequence's
    start; tokens from prompt_len on are generated ones). A clamp sets the feature's pre-activation; where
    that is below the token's k-th largest, the top-k does not select it and it reads 0."""
    handles = [an.lm.layers[e.layer].register_forward_hook(_edit_hook(an, e, prompt_len)) for e in edits]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _generate(an: Analyzer, ids_T: Tensor, max_new: int, temperature: float, seed: int, alternatives: int) -> dict:
    """Token by token (the whole sequence each step, so that every position's edit applies), greedy at
    temperature 0, else sampled from softmax(logits / temperature) with a generator seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    eos = an.lm.tokenizer.eos_token_id
    ids = ids_T.to(an.device)
    out = {"ids": [], "tokens": [], "probs": [], "alternatives": []}
    for _ in range(max_new):
        logits_V = an.lm.model(input_ids=ids[None], use_cache=False).logits[0, -1].float()
        probs_V = torch.softmax(logits_V / temperature if temperature > 0 else logits_V, dim=0)
        if temperature > 0:
            token = int(torch.multinomial(probs_V.cpu(), 1, generator=g))
        else:
            token = int(probs_V.argmax())
        top_p, top_i = probs_V.topk(min(alternatives, probs_V.numel()))
        out["ids"].append(token)
        out["tokens"].append(an.lm.tokenizer.decode([token]))
        out["probs"].append(float(probs_V[token]))
        out["alternatives"].append(
            [(an.lm.tokenizer.decode([i]), float(p)) for i, p in zip(top_i.tolist(), top_p.tolist(), strict=True)]
        )
        ids = torch.cat([ids, torch.tensor([token], device=ids.device)])
        if token == eos:
            break
    out["text"] = an.lm.tokenizer.decode(out["ids"])
    return out


def steer(
    an: Analyzer,
    prompt: str,
    edits: Sequence[Edit],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    alternatives: int = 5,
) -> dict:
    """The prompt's continuation without and with the edits (the same seed for both, so that only the edits
    differ), each token with its probability and the `alternatives` likeliest tokens. Relative strengths
    need the layer's typical residual norm: measured on the prompt when Analyzer.measure_norms has not run
    (the result says which). JSON-ready."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    for e in edits:
        an.check_feature(e.layer, e.feature)
    ids_T = an.tokenize(prompt)
    norms_from = "measure_norms"
    if any(e.relative and e.clamp is None and e.layer not in an.norms for e in edits):
        if ids_T.numel() < 2:
            raise InputError(
                "a relative strength needs the layer's residual norm: call measure_norms, or give a longer prompt"
            )
        an.measure_norms([prompt])
        norms_from = "the prompt"
    original = _generate(an, ids_T, max_new_tokens, temperature, seed, alternatives)
    with steering(an, edits, ids_T.numel()):
        steered = _generate(an, ids_T, max_new_tokens, temperature, seed, alternatives)
    return {
        "prompt": an.token_strings(ids_T),
        "original": original,
        "steered": steered,
        "edits": [asdict(e) | {"positions": e.positions.value} for e in edits],
        "norms": {n: an.norms[n] for n in sorted({e.layer for e in edits}) if n in an.norms},
        "norms_measured_on": norms_from,
    }
