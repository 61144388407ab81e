"""Loss terms as pure functions of tensors."""

from __future__ import annotations

from torch import Tensor


def fvu(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean_B(x))^2.

    x_BD, x_hat_BD: (B, d_model). Returns a scalar; 1.0 is what predicting the batch mean scores.
    """
    x_BD = x_BD.float()
    err = (x_BD - x_hat_BD.float()).pow(2).sum()
    var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum()
    return err / var.clamp_min(1e-12)
