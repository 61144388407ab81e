"""Loss terms as pure functions of tensors: FVU, AuxK and the dead-latent selection AuxK trains.

`reduce`, where taken, is an in-place all-reduce sum over data-parallel ranks (None for one process):
with it, means and variances are those of the global batch, so the ranks' losses and gradients add up
to the global ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

Reduce = Optional[Callable[[Tensor], Tensor]]


def global_mean(x_BD: Tensor, reduce: Reduce = None) -> Tensor:
    """Mean row of x_BD (B, D), shape (D,); with `reduce`, of the global batch over all ranks."""
    stats = torch.cat([x_BD.sum(0), x_BD.new_tensor([x_BD.shape[0]])])
    if reduce is not None:
        stats = reduce(stats)
    return stats[:-1] / stats[-1]


def fvu(x_BD: Tensor, x_hat_BD: Tensor, reduce: Reduce = None) -> Tensor:
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean_B(x))^2.

    x_BD, x_hat_BD: (B, d_model). Returns a scalar; 1.0 is what predicting the batch mean scores.
    """
    x_BD = x_BD.float()
    err = (x_BD - x_hat_BD.float()).pow(2).sum()
    if reduce is None:
        var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum()
    else:
        with torch.no_grad():
            var = reduce((x_BD - global_mean(x_BD, reduce)).pow(2).sum())
    return err / var.clamp_min(1e-12)


@torch.no_grad()
def dead_topk(pre_BF: Tensor, dead_F: Tensor, k_aux: int, n_dead: int, relu: bool = False) -> Tensor:
    """Indices (B, k_aux) of the k_aux largest pre-activations among the dead latents, per row.

    pre_BF: (B, d_sae) pre-activations; dead_F: (d_sae,) bool, n_dead of them True (k_aux <= n_dead);
    relu: select on relu(pre), as a relu_topk encoder does.
    """
    if relu:
        pre_BF = torch.relu(pre_BF)
    d_sae = dead_F.shape[0]
    if n_dead == d_sae:  # every latent dead: select straight from the pre-activations, no copy
        return pre_BF.topk(k_aux, dim=-1, sorted=False).indices
    if 4 * n_dead >= d_sae:
        # many dead: masking live columns is one streaming pass; gathering the dead columns of a
        # (B, d_sae) matrix is several times slower
        low = -1.0 if relu else float("-inf")  # below every dead value
        return pre_BF.masked_fill(~dead_F, low).topk(k_aux, dim=-1, sorted=False).indices
    dead_idx = dead_F.nonzero().squeeze(1)
    return dead_idx[pre_BF.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False).indices]


def auxk(x_BD: Tensor, x_hat_BD: Tensor, e_hat_BD: Tensor, reduce: Reduce = None) -> Tensor:
    """AuxK (Gao et al. 2024): FVU of e_hat_BD, the dead latents' reconstruction (no bias), against the
    detached residual x - x_hat. All (B, d_model); returns a scalar."""
    return fvu((x_BD - x_hat_BD).detach(), e_hat_BD, reduce)
