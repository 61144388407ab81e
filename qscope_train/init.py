"""How a fresh run's SAEs start: b_dec at the first batch's mean, decoder directions from training rows
(decoder_init=data) and the encoder at the scale that reconstructs the first batch best."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import distributed
from .config import DecoderInit, TrainerConfig
from .data.prefetch import Item
from .losses import global_mean
from .sae import TopKSAE


def initialise(saes: dict[int, TopKSAE], it, cfg: TrainerConfig, device):
    """Fresh runs: b_dec at the first global batch's mean, with decoder_init=data the decoder from the
    first batches' rows, and the encoder scaled to reconstruct the first batch best (fit_encoder_scale_);
    returns the iterator of items with those batches put back in front."""
    peeked = [next(it)]
    with torch.no_grad():
        for n, sae in saes.items():
            sae.b_dec.copy_(global_mean(peeked[0][0][n].to(device).float(), distributed.sum_))
    if cfg.decoder_init is DecoderInit.data:
        peeked = _init_from_rows(saes, peeked, it, cfg, device)
    for n, sae in saes.items():
        fit_encoder_scale_(sae, peeked[0][0][n].to(device))
    return itertools.chain(peeked, it)


@torch.no_grad()
def _init_from_rows(saes: dict[int, TopKSAE], peeked: list[Item], it, cfg: TrainerConfig, device) -> list[Item]:
    """decoder_init=data: each decoder direction starts as a distinct training row minus b_dec, normalised
    (the encoder row as that direction), drawn from the first global batches (every rank's rows in rank
    order, so any number of processes starts alike). Returns the (batch, position) items read, which
    training then starts with."""
    first = next(iter(saes))
    d_sae = saes[first].d_sae
    while sum(b[first].shape[0] for b, _ in peeked) * distributed.world() < d_sae:
        try:
            peeked.append(next(it))
        except StopIteration:
            break
    batches = [b for b, _ in peeked]
    for n, sae in saes.items():
        g = torch.Generator().manual_seed(cfg.seed * 65_537 + n)  # per layer: whichever layers train beside it
        rows = torch.cat([distributed.cat(b[n].to(device).float()) for b in batches]) - sae.b_dec
        rows = rows[torch.isfinite(rows).all(1) & (rows.norm(dim=1) > 0)]  # a bad row fails at its own step
        pick = torch.randperm(rows.shape[0], generator=g)[:d_sae].to(device)
        dirs_FD = torch.nn.functional.normalize(rows[pick], dim=-1)
        m = dirs_FD.shape[0]  # fewer rows than latents: the rest keep their random directions
        sae.W_dec_FD[:m] = dirs_FD
        sae.W_enc.copy_(sae.W_dec_FD)
    return peeked


@torch.no_grad()
def fit_encoder_scale_(sae: TopKSAE, x_BD: Tensor) -> float:
    """Scale the encoder (W_enc and b_enc) by the factor c that makes this batch's reconstruction best in
    the least-squares sense: the top-k selection does not change with c > 0, so the reconstruction is
    b_dec + c u with u the decode of the code at c = 1, and c = <x - b_dec, u> / |u|^2 summed over rows
    (and over ranks, so every rank scales alike). The batch's FVU about b_dec is then at most 1: a
    tied encoder at any fixed norm reconstructs a data-initialised dictionary's rows tens of times over.
    Returns c (1 where the code reconstructs nothing)."""
    x_BD = x_BD.float()
    u_BD = sae.decode_sparse(sae.select(sae.dense_pre(x_BD)), bias=False)
    sums = distributed.sum_(torch.stack([((x_BD - sae.b_dec) * u_BD).sum(), u_BD.pow(2).sum()]))
    c = float(sums[0] / sums[1]) if float(sums[1]) > 0 and float(sums[0]) > 0 else 1.0
    sae.W_enc.mul_(c)
    sae.b_enc.mul_(c)
    return c
