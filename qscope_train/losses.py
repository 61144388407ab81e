"""Loss terms as pure functions of tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor


def fvu(x_BD: Tensor, x_hat_BD: Tensor, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean_B(x))^2.

    x_BD, x_hat_BD: (B, d_model). Returns a scalar; 1.0 is what predicting the batch mean scores.
    With `reduce` (an in-place all-reduce sum), the mean and variance are those of the global batch
    over all ranks, so that the ranks' losses add up to the global FVU and so do their gradients.
    """
    x_BD = x_BD.float()
    err = (x_BD - x_hat_BD.float()).pow(2).sum()
    if reduce is None:
        var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum()
    else:
        with torch.no_grad():
            stats = reduce(torch.cat([x_BD.sum(0), x_BD.new_tensor([x_BD.shape[0]])]))
            var = reduce((x_BD - stats[:-1] / stats[-1]).pow(2).sum())
    return err / var.clamp_min(1e-12)
