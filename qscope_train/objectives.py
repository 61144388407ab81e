"""Training objectives that keep the release format (per-token TopK, the same four tensors).

- topk: FVU of the top-k reconstruction.
- multi_topk: FVU(top-k) + coef * FVU(top-(factor*k)), Gao et al.'s (2024) Multi-TopK: the latents
  ranked just below the k-th are trained to help too, so the code degrades gracefully at other k.
- matryoshka: the mean FVU over nested prefixes of the latents (latents 0..m-1 for each prefix size m,
  the last being all of them) of the same per-token top-k code: early latents must reconstruct on their
  own, which pushes general features to the front and their refinements to the back (Bussmann et al.
  2025 train prefixes with BatchTopK; here the code is the card's per-token TopK).

Each returns the code the SAE selects at k (what dead counting and AuxK read), the loss to minimise,
and the top-k FVU (what is logged as "fvu").
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .config import Activation, Objective, TrainerConfig
from .losses import auxk, dead_topk, fvu
from .sae import ForwardOutput, SparseCode, TopKSAE
from .sparse import LatentMajor


class StepLoss(NamedTuple):
    out: ForwardOutput
    loss: Tensor
    fvu: Tensor


def prefix_sizes(d_sae: int, fractions: list[float]) -> list[int]:
    """Latent counts of the nested prefixes, ascending, ending with d_sae."""
    return sorted({max(1, round(f * d_sae)) for f in fractions if 0 < f < 1} | {d_sae})


def compute(
    sae: TopKSAE,
    x_BD: Tensor,
    cfg: TrainerConfig,
    k: int,
    var: Optional[Tensor] = None,
    gemm_dtype: Optional[torch.dtype] = None,
) -> StepLoss:
    """The training objective named by cfg.objective on rows x_BD (B, d_model); var: the variance every
    FVU divides by (the global batch's under data parallel; None: this batch's)."""
    x_BD = x_BD.float()
    if cfg.objective is Objective.multi_topk:
        return multi_topk(sae, x_BD, k, cfg.multi_topk_factor, cfg.multi_topk_coef, var, gemm_dtype)
    out = sae(x_BD, gemm_dtype=gemm_dtype, k=k)
    if var is None:
        var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum()  # once, for every term
    main = fvu(x_BD, out.x_hat_BD, var)
    if cfg.objective is Objective.matryoshka:
        return StepLoss(
            out, matryoshka(sae, x_BD, out, prefix_sizes(sae.d_sae, cfg.matryoshka_prefixes), main, var), main
        )
    return StepLoss(out, main, main)


def multi_topk(
    sae: TopKSAE, x_BD: Tensor, k: int, factor: int, coef: float, var: Optional[Tensor] = None, gemm_dtype=None
) -> StepLoss:
    """FVU(top-k) + coef * FVU(top-(factor*k)); one encoder pass, one sparse backward through both."""
    pre_BF, idx_BM = sae.pre_top(x_BD, gemm_dtype, min(factor * k, sae.d_sae))
    wide = sae.reconstruct(x_BD, pre_BF, idx_BM)
    with torch.no_grad():  # the top k of the top factor*k are the top k
        pos_BK = wide.code.vals_BK.topk(k, dim=-1, sorted=False).indices
    code = SparseCode(wide.code.vals_BK.gather(-1, pos_BK), idx_BM.gather(-1, pos_BK))
    out = ForwardOutput(sae.decode_sparse(code), code, pre_BF)
    if var is None:
        var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum()
    main = fvu(x_BD, out.x_hat_BD, var)
    return StepLoss(out, main + coef * fvu(x_BD, wide.x_hat_BD, var), main)


def matryoshka(
    sae: TopKSAE, x_BD: Tensor, out: ForwardOutput, sizes: list[int], full: Tensor, var: Optional[Tensor] = None
) -> Tensor:
    """Mean over the prefix sizes of the FVU when only latents below that size decode; `full` is the
    FVU of the whole code (the last prefix), already computed."""
    vals_BK, idx_BK = out.code
    pairs = LatentMajor(idx_BK, sae.d_sae)  # one grouping shared by every prefix's decode
    losses = [full]
    for m in sizes[:-1]:
        keep_BK = (idx_BK < m).to(vals_BK.dtype)
        x_hat_BD = sae.decode_sparse(SparseCode(vals_BK * keep_BK, idx_BK), pairs=pairs)
        losses.append(fvu(x_BD, x_hat_BD, var))
    return torch.stack(losses).mean()


# AuxK reads one row in AUXK_ROWS of each batch
AUXK_ROWS = 2


def auxk_loss(
    sae: TopKSAE, x_BD: Tensor, out: ForwardOutput, dead_F: Tensor, k_aux: int, var: Optional[Tensor] = None
) -> Tensor:
    """AuxK for one SAE: its top k_aux dead latents (losses.dead_topk) reconstruct the detached residual
    (losses.auxk, divided by `var`, or by this batch's residual variance); the gradient reaches only the
    dead rows of W_dec, W_enc and b_enc (never b_dec). Zero when no latent is dead, with nothing read
    back to the host to find that out.

    It takes every other row (rows 0, 2, 4, ... of this process's batch): half the rows halve AuxK's cost
    (on CPUs mostly its per-row top-k) and, unlike a choice by residual size, kept bench_quality's scores
    (docs/BENCHMARKS.md, session 24). With data parallel, where each process holds an even number of rows,
    the processes' rows together are every other row of the global batch, as in one process. A `var`
    given is the full batch's residual variance, so the loss is then about 1 / AUXK_ROWS of what all rows
    would give."""
    relu = sae.activation is Activation.relu_topk
    x_BD, x_hat_BD, pre_BF = x_BD[::AUXK_ROWS], out.x_hat_BD[::AUXK_ROWS], out.pre_BF[::AUXK_ROWS]
    idx_BA, dead_BA = dead_topk(pre_BF, dead_F, k_aux, relu)
    e_hat_BD = sae.decode_selected(x_BD, pre_BF, idx_BA, dead_BA)
    return auxk(x_BD, x_hat_BD, e_hat_BD, var) * dead_F.any()
