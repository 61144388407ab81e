"""Spliced next-token loss: replace layer n's output by an SAE's reconstruction (or by zeros) and compare
the next-token cross-entropy and the KL divergence with the clean run.

Memory stays bounded at any vocabulary: the forwards stop at the final norm (the model's own head runs on
one position), and the head, the log-softmax and the KL run over chunks of HEAD_CHUNK scored positions,
so no (tokens x vocab) matrix exists. One SAE set is on the device at a time: each set is a pass over the
held-out batches with a clean forward per batch (the first pass also runs the zero ablations); each
layer costs one spliced forward per set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.activations import ActivationFilter
from .data.tokens import Sequence as TokSeq
from .data.tokens import batched
from .lm import LoadedLM
from .sae import TopKSAE
from .scorecard import SequenceFiring

HEAD_CHUNK = 1024  # scored positions per head GEMM: a (HEAD_CHUNK, vocab) fp32 block and its temporaries
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
    return _SAEReplace(sae)


class _SAEReplace:
    """sae_replace's function; with `firing` set, each call also counts the code's firings per sequence at
    the positions `mask_BT` marks (the spliced ones)."""

    def __init__(self, sae: TopKSAE) -> None:
        self.sae, self.firing, self.mask_BT = sae, None, None

    def __call__(self, h_BTD: Tensor) -> Tensor:
        x_ND = h_BTD.reshape(-1, h_BTD.shape[-1]).to(self.sae.W_enc.dtype)
        out = self.sae(x_ND)
        if self.firing is not None:
            vals, idx = out.code
            B, T = h_BTD.shape[:2]
            self.firing.add(idx.view(B, T, -1), vals.view(B, T, -1), self.mask_BT)
        return out.x_hat_BD.reshape(h_BTD.shape).to(h_BTD.dtype)


def zero_replace(h_BTD: Tensor) -> Tensor:
    return torch.zeros_like(h_BTD)


@torch.no_grad()
def _forward(lm: LoadedLM, ids_BT, attn_BT, layer=None, replace=None, mask_BT=None, **kwargs):
    """The model's forward, with layer's output spliced when layer and replace are given."""
    with splice(lm.layers[layer], replace, mask_BT) if layer is not None else nullcontext():
        return lm.model(input_ids=ids_BT, attention_mask=attn_BT.long(), use_cache=False, **kwargs)


def logits(
    lm: LoadedLM,
    ids_BT: Tensor,
    attn_BT: Tensor,
    layer: Optional[int] = None,
    replace: Optional[Replace] = None,
    mask_BT: Optional[Tensor] = None,
) -> Tensor:
    """Full-model logits (B, T, vocab), with layer's output spliced when layer and replace are given."""
    return _forward(lm, ids_BT, attn_BT, layer, replace, mask_BT).logits


def final_norm(lm: LoadedLM) -> nn.Module:
    """The text decoder's final norm: the `norm` beside the decoder layer list, wherever the class keeps it."""
    for module in lm.model.modules():
        if getattr(module, "layers", None) is lm.layers and isinstance(getattr(module, "norm", None), nn.Module):
            return module.norm
    raise RuntimeError(f"no final norm beside the decoder layers in {type(lm.model).__name__}")


def final_hidden(
    lm: LoadedLM,
    ids_BT: Tensor,
    attn_BT: Tensor,
    layer: Optional[int] = None,
    replace: Optional[Replace] = None,
    mask_BT: Optional[Tensor] = None,
) -> Tensor:
    """What the LM head reads (B, T, d_model): the final norm's output, with layer's output spliced when
    layer and replace are given. The model's head runs on the last position only."""
    seen = {}
    handle = final_norm(lm).register_forward_hook(lambda _m, _i, out: seen.__setitem__("h", out))
    try:
        _forward(lm, ids_BT, attn_BT, layer, replace, mask_BT, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["h"]


class _Sums:
    """Running sums of next-token CE and KL(clean || run) over scored positions, in float64."""

    def __init__(self) -> None:
        self.ce = self.kl = 0.0
        self.n = 0

    @torch.no_grad()
    def add(self, head: nn.Module, h_ND: Tensor, clean_ND: Optional[Tensor], target_N: Tensor) -> None:
        """h_ND, clean_ND: final hidden states at the N scored positions; target_N: the next tokens."""
        ce = kl = 0.0
        for i in range(0, h_ND.shape[0], HEAD_CHUNK):
            logp_CV = F.log_softmax(head(h_ND[i : i + HEAD_CHUNK]).float(), dim=-1)
            ce -= float(logp_CV.gather(-1, target_N[i : i + HEAD_CHUNK, None]).double().sum())
            if clean_ND is not None:
                clean_CV = F.log_softmax(head(clean_ND[i : i + HEAD_CHUNK]).float(), dim=-1)
                kl += float(F.kl_div(logp_CV, clean_CV, reduction="sum", log_target=True).double())
                del clean_CV
            del logp_CV
        self.ce, self.kl, self.n = self.ce + ce, self.kl + kl, self.n + h_ND.shape[0]


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
    """Per set and layer: ce_clean, ce_spliced, ce_zero_ablated, delta_ce, ce_recovered, kl, kl_zero_ablated,
    and SAEBench's consistent_activation_heuristic over the spliced positions (scorecard.SequenceFiring).

    The splice covers every position the training filters keep (not position 0, padding or special
    tokens, which the SAE never saw) unless splice_filtered; zero ablation covers the same positions.
    ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 is the clean model, 0 no better than zeros.
    The SAEs are moved to `device` one set at a time and back to where they were after.
    """
    layers = sorted({n for saes in sets.values() for n in saes})
    head = lm.model.get_output_embeddings()
    clean, zero = _Sums(), {n: _Sums() for n in layers}
    spliced = {name: {n: _Sums() for n in saes} for name, saes in sets.items()}
    firing = {name: {n: SequenceFiring(sae.d_sae) for n, sae in saes.items()} for name, saes in sets.items()}
    n_batches = -(-len(seqs) // batch_sequences)
    n_forwards = len(sets) + len(layers) + sum(len(saes) for saes in sets.values())
    bar = progress(total=n_batches * n_forwards, desc="spliced loss", unit="fwd") if progress else None
    for p, (name, saes) in enumerate(sets.items()):
        homes = {n: sae.W_enc.device for n, sae in saes.items()}
        replaces = {n: _SAEReplace(sae.to(device).eval()) for n, sae in saes.items()}
        for n, r in replaces.items():
            r.firing = firing[name][n]
        for ids_BT, attn_BT in batched(seqs, batch_sequences):
            ids_BT, attn_BT = ids_BT.to(device), attn_BT.to(device)
            mask_BT = None if splice_filtered else filt.token_mask(ids_BT, attn_BT)[0]
            scored = (attn_BT[:, 1:] & attn_BT[:, :-1]).reshape(-1)
            target_N = ids_BT[:, 1:].reshape(-1)[scored]
            for r in replaces.values():
                r.mask_BT = attn_BT.bool() if mask_BT is None else mask_BT
            clean_ND = _at(final_hidden(lm, ids_BT, attn_BT), scored)
            runs = [(spliced[name][n], n, replaces[n]) for n in saes]
            if p == 0:  # the clean loss and the zero ablations once, in the first set's pass
                clean.add(head, clean_ND, None, target_N)
                runs = [(zero[n], n, zero_replace) for n in layers] + runs
            for sums, n, replace in runs:
                sums.add(head, _at(final_hidden(lm, ids_BT, attn_BT, n, replace, mask_BT), scored), clean_ND, target_N)
            if bar is not None:
                bar.update(1 + len(runs))
        for n, sae in saes.items():
            sae.to(homes[n])
    if bar is not None:
        bar.close()
    return {
        name: {n: _layer_result(clean, zero[n], s) | firing[name][n].result() for n, s in per.items()}
        for name, per in spliced.items()
    }


def _at(h_BTD: Tensor, scored: Tensor) -> Tensor:
    """The rows of h_BTD (B, T, D) at the scored positions (each predicting the next token), (N, D)."""
    return h_BTD[:, :-1].reshape(-1, h_BTD.shape[-1])[scored]


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
