"""The training encoder's fp32 top-k, found through a bf16 screen where the CPU multiplies bf16 natively.

An fp32 encoder GEMM (B x d_model x d_sae) is most of a CPU training step; the same product in bf16 runs
about 3x faster where oneDNN has native bf16 (AVX512-BF16 / AMX). The screen forms the pre-activations
in bf16, takes the top (k + margin) of each row as candidates, recomputes the candidates' values in fp32
and writes them back, then proves per row that no other latent can beat the k-th of them:

  the product of x and a row w rounded to bf16 (x~, w~) and summed in fp32 differs from x . w by at most
      R(x) = |dx| max|w~| + |x~| max|dw| + |dx| max|dw| + d_model 2^-23 |x~| max|w~|
  (dx = x - x~ and dw = w - w~ measured; rounding_bound), the product's bf16 output adds at most u = 2^-8
  of itself and the bias add u of the bias, so a latent outside the candidates (screened value <= T, the
  (k + margin)-th) is at most  T + 2u (|T| + max|b|) + R(x).

A row whose k-th candidate is below that bound is formed again in fp32. The selected latents and their
values are therefore those of an fp32 encoder (up to fp32 rounding, as any two fp32 GEMMs differ), and
so are the gradients. Pre-activations outside the candidates stay at bf16 accuracy: only AuxK reads them,
to rank and value dead latents (on a GPU the whole GEMM is bf16 by default).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .sparse import LatentMajor

UNIT = 2.0**-8  # bf16 unit roundoff (8 significant bits, round to nearest)
# The screen's own work (a top-2k, the candidates' fp32 dot products, norms) grows with d_sae and 2k x d_model,
# the GEMM it saves with d_model x d_sae: timed at B 4096 on the 2-core CPU VM (docs/BENCHMARKS.md, session
# 15), screen / fp32 GEMM + top-k is 2.5 at d_model 64, 1.5 at 256, 1.0 at 512, 0.6 at 1024 and 2048; on a
# machine with AMX, whose fp32 GEMM is twice as fast, 0.84 at 1024 and 0.88 at 2048 (session 22)
MIN_D_MODEL = 1024
# and only where the candidates are a small share of the latents
MAX_CANDIDATE_SHARE = 1 / 8


@functools.cache
def _native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def applies(device: torch.device, d_model: int, d_sae: int, k: int) -> bool:
    """Whether an fp32 top-k on this device is found through the screen: a CPU with native bf16, d_model at
    least MIN_D_MODEL and a candidate set (2k) at most MAX_CANDIDATE_SHARE of the latents."""
    return device.type == "cpu" and d_model >= MIN_D_MODEL and 2 * k <= MAX_CANDIDATE_SHARE * d_sae and _native_bf16()


class Screened(NamedTuple):
    pre_BF: Tensor  # pre-activations: fp32 at each row's candidates (and redone rows), bf16-accurate elsewhere
    idx_BK: Tensor  # each row's top k latents (after a ReLU if relu), the fp32 GEMM's
    redone: int  # rows the bound sent back to an fp32 GEMM


@torch.no_grad()
def screened_pre(
    x_BD: Tensor, W_FD: Tensor, b_F: Tensor, k: int, margin: int | None = None, relu: bool = False
) -> Screened:
    """Pre-activations x @ W_FD.T + b_F (B, d_sae) whose top k per row, and the values there, are the fp32
    ones, with that top k (ranked after a ReLU if relu) taken from the candidates, so that the caller needs
    no second top k over all the latents (about a sixth of a step at 1024 x 16384, k 64); and the number of
    rows the bound sent back to an fp32 GEMM. margin: candidates beyond k (default k)."""
    margin = k if margin is None else margin
    B, d_model = x_BD.shape
    m = min(k + margin, W_FD.shape[0])
    pre_BF = (x_BD.to(torch.bfloat16) @ W_FD.to(torch.bfloat16).T).float()
    pre_BF += b_F
    screened_BM, idx_BM = pre_BF.topk(m, dim=-1, sorted=False)
    exact_BM = LatentMajor(idx_BM, W_FD.shape[0]).dots(x_BD, W_FD) + b_F[idx_BM]
    pre_BF.scatter_(-1, idx_BM, exact_BM)
    # under a ReLU the picks are ranked at relu(value): one at 0 ties with every latent at or below 0
    ranked_BM = exact_BM.relu() if relu else exact_BM
    pos_BK = ranked_BM.topk(k, dim=-1, sorted=False).indices
    idx_BK = idx_BM.gather(-1, pos_BK)
    if m == W_FD.shape[0]:
        return Screened(pre_BF, idx_BK, 0)
    t_B = screened_BM.min(-1).values
    reach_B = t_B + 2 * UNIT * (t_B.abs() + b_F.abs().max()) + rounding_bound(x_BD, W_FD)
    kth_B = ranked_BM.gather(-1, pos_BK).min(-1).values
    bad = (kth_B < reach_B).nonzero().squeeze(1)
    if bad.numel():
        rows = torch.addmm(b_F, x_BD[bad], W_FD.T)
        pre_BF[bad] = rows
        idx_BK[bad] = (rows.relu() if relu else rows).topk(k, dim=-1, sorted=False).indices
    return Screened(pre_BF, idx_BK, int(bad.numel()))


@torch.no_grad()
def rounding_bound(x_BD: Tensor, W_FD: Tensor) -> Tensor:
    """Per row, a bound on |x~ . w~ (accumulated in fp32) - x . w| over every row w of W_FD, where ~ rounds
    to bf16: with x = x~ + dx and w = w~ + dw, the error is dx.w~ + x~.dw + dx.dw (Cauchy-Schwarz on the
    measured rounding residuals) plus the fp32 accumulation's d_model * 2^-23 * |x~| |w~|. (B,)"""
    x16_BD, W16_FD = x_BD.to(torch.bfloat16).float(), W_FD.to(torch.bfloat16).float()
    dx_B, x_B = (x_BD - x16_BD).norm(dim=1), x16_BD.norm(dim=1)
    dw, w = (W_FD - W16_FD).norm(dim=1).max(), W16_FD.norm(dim=1).max()
    return dx_B * w + x_B * dw + dx_B * dw + x_BD.shape[1] * 2.0**-23 * x_B * w
