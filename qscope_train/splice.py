"""Spliced next-token loss: replace layer n's output by an SAE's reconstruction (or by zeros) and compare
the next-token cross-entropy and the KL divergence with the clean run.

For every batch of held-out sequences the clean forward runs once and is shared by all layers and
all SAE sets; each layer then costs one zero-ablated forward plus one spliced forward per set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.activations import ActivationFilter
from .data.tokens import Sequence as TokSeq
from .data.tokens import batched
from .lm import LoadedLM
from .sae import TopKSAE

Replace = Callable[[Tensor], Tensor]  # (B, T, d_model) layer output -> its stand-in, same shape and dtype


@contextmanager
def splice(layer: nn.Module, replace: Replace, mask_BT: Optional[Tensor] = None) -> Iterator[None]:
    """While active, layer's output is replace(output) at positions where mask_BT is True (everywhere if None);
    the next layer and everything after it see the replaced stream."""

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = replace(h)
        if mask_BT is not None:
            new = torch.where(mask_BT.unsqueeze(-1), new, h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_replace(sae: TopKSAE) -> Replace:
    """The SAE's reconstruction, computed in fp32 and cast back to the stream's dtype."""

    def replace(h_BTD: Tensor) -> Tensor:
        x_ND = h_BTD.reshape(-1, h_BTD.shape[-1]).to(sae.W_enc.dtype)
        return sae(x_ND).x_hat_BD.reshape(h_BTD.shape).to(h_BTD.dtype)

    return replace


def zero_replace(h_BTD: Tensor) -> Tensor:
    return torch.zeros_like(h_BTD)


@torch.no_grad()
def logits(
    lm: LoadedLM,
    ids_BT: Tensor,
    attn_BT: Tensor,
    layer: Optional[int] = None,
    replace: Optional[Replace] = None,
    mask_BT: Optional[Tensor] = None,
) -> Tensor:
    """Full-model logits (B, T, vocab), with layer's output spliced when layer and replace are given."""
    if layer is None:
        return lm.model(input_ids=ids_BT, attention_mask=attn_BT.long(), use_cache=False).logits
    with splice(lm.layers[layer], replace, mask_BT):
        return lm.model(input_ids=ids_BT, attention_mask=attn_BT.long(), use_cache=False).logits


class _Sums:
    """Running sums of next-token CE and KL(clean || run) over scored positions, in float64."""

    def __init__(self) -> None:
        self.ce = self.kl = 0.0
        self.n = 0

    def add(self, logp_BTV: Tensor, clean_BTV: Optional[Tensor], target_BT: Tensor, valid_BT: Tensor) -> None:
        ce_BT = -logp_BTV.gather(-1, target_BT.unsqueeze(-1)).squeeze(-1)
        self.ce += float(ce_BT[valid_BT].double().sum())
        if clean_BTV is not None:
            kl_BT = (clean_BTV.exp() * (clean_BTV - logp_BTV)).sum(-1)
            self.kl += float(kl_BT[valid_BT].double().sum())
        self.n += int(valid_BT.sum())


def _next_token_logp(logits_BTV: Tensor) -> Tensor:
    return F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)


def downstream_metrics(
    lm: LoadedLM,
    sets: dict[str, dict[int, TopKSAE]],
    seqs: Sequence[TokSeq],
    filt: ActivationFilter,
    batch_sequences: int,
    device: torch.device | str,
    splice_filtered: bool = False,
    progress: Optional[Callable] = None,
) -> dict[str, dict[int, dict]]:
    """Per set and layer: ce_clean, ce_spliced, ce_zero_ablated, delta_ce, ce_recovered, kl, kl_zero_ablated.

    The splice covers every position the training filters keep (not position 0, padding or special
    tokens, which the SAE never saw) unless splice_filtered; zero ablation covers the same positions.
    ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 is the clean model, 0 no better than zeros.
    """
    layers = sorted({n for saes in sets.values() for n in saes})
    clean, zero = _Sums(), {n: _Sums() for n in layers}
    spliced = {name: {n: _Sums() for n in saes} for name, saes in sets.items()}
    replaces = {name: {n: sae_replace(sae.to(device).eval()) for n, sae in saes.items()} for name, saes in sets.items()}
    n_forwards = 1 + sum(1 + sum(n in saes for saes in sets.values()) for n in layers)
    n_batches = -(-len(seqs) // batch_sequences)
    bar = progress(total=n_batches * n_forwards, desc="spliced loss", unit="fwd") if progress else None
    for ids_BT, attn_BT in batched(seqs, batch_sequences):
        ids_BT, attn_BT = ids_BT.to(device), attn_BT.to(device)
        mask_BT = None if splice_filtered else filt.token_mask(ids_BT, attn_BT)[0]
        target_BT, valid_BT = ids_BT[:, 1:], attn_BT[:, 1:] & attn_BT[:, :-1]
        clean_logp = _next_token_logp(logits(lm, ids_BT, attn_BT))
        clean.add(clean_logp, None, target_BT, valid_BT)
        for n in layers:
            runs = [(zero[n], zero_replace)] + [
                (spliced[name][n], replaces[name][n]) for name in sets if n in replaces[name]
            ]
            for sums, replace in runs:
                logp = _next_token_logp(logits(lm, ids_BT, attn_BT, n, replace, mask_BT))
                sums.add(logp, clean_logp, target_BT, valid_BT)
                del logp
            if bar is not None:
                bar.update(len(runs))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {name: {n: _layer_result(clean, zero[n], s) for n, s in per.items()} for name, per in spliced.items()}


def _layer_result(clean: _Sums, zero: _Sums, spliced: _Sums) -> dict:
    ce_clean, ce_zero, ce_spl = clean.ce / clean.n, zero.ce / zero.n, spliced.ce / spliced.n
    gap = ce_zero - ce_clean
    return {
        "ce_clean": ce_clean,
        "ce_spliced": ce_spl,
        "ce_zero_ablated": ce_zero,
        "delta_ce": ce_spl - ce_clean,
        "ce_recovered": (ce_zero - ce_spl) / gap if abs(gap) > 1e-12 else float("nan"),
        "kl": spliced.kl / spliced.n,
        "kl_zero_ablated": zero.kl / zero.n,
        "n_scored_tokens": clean.n,
    }
