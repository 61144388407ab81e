"""TopK sparse autoencoder with the Qwen-Scope parameter names, shapes and encoder convention.

encode(x) is the release card's feature extraction: topk(x @ W_enc.T + b_enc, k) scattered into
zeros (optionally with a ReLU first, as the official app does); decode(z) = z @ W_dec.T + b_dec.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Activation
from .errors import InputError

RELEASE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


class SparseCode(NamedTuple):
    """The k selected latents per row: values (B, k) and their indices (B, k)."""

    vals_BK: Tensor
    idx_BK: Tensor

    def fire_counts(self, d_sae: int) -> Tensor:
        """Rows on which each latent fired (value non-zero; a ReLU can zero a selected latent), (d_sae,)."""
        return torch.bincount(self.idx_BK[self.vals_BK != 0], minlength=d_sae)


class ForwardOutput(NamedTuple):
    x_hat_BD: Tensor
    code: SparseCode
    pre_BF: Tensor


class TopKSAE(nn.Module):
    """W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc (d_sae,), b_dec (d_model,)."""

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        k: int,
        activation: Activation = Activation.topk,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        if not 0 < k <= d_sae:
            raise InputError(f"k must be in 1..d_sae ({d_sae}), got {k}")
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        self.activation = Activation(activation)
        f32 = dict(device=device, dtype=torch.float32)
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_model, **f32))
        self.W_dec = nn.Parameter(torch.empty(d_model, d_sae, **f32))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **f32))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **f32))
        self.init_weights_()

    # ----- construction and the release format -------------------------------------------------

    @torch.no_grad()
    def init_weights_(self, x_sample_ND: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> None:
        """Unit-norm random decoder columns, W_enc = W_dec.T, b_enc = 0, b_dec = sample mean (or 0)."""
        W = torch.randn(self.d_model, self.d_sae, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=0, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        if x_sample_ND is None:
            self.b_dec.zero_()
        else:
            self.b_dec.copy_(x_sample_ND.float().mean(0))

    @classmethod
    def from_release(cls, tensors: dict[str, Tensor], k: int, activation: Activation = Activation.topk) -> TopKSAE:
        """Build from the four release tensors (validated by release.validate), copied exactly."""
        d_sae, d_model = tensors["W_enc"].shape
        sae = cls(d_model, d_sae, k, activation, device=tensors["W_enc"].device)
        with torch.no_grad():
            for key in RELEASE_KEYS:
                getattr(sae, key).copy_(tensors[key])
        return sae

    @torch.no_grad()
    def to_release(self) -> dict[str, Tensor]:
        """The four release tensors: fp32, contiguous, detached copies on the CPU."""
        return {key: getattr(self, key).detach().float().cpu().contiguous().clone() for key in RELEASE_KEYS}

    # ----- encoder / decoder -----------------------------------------------------------------------

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """x @ W_enc.T + b_enc, shape (B, d_sae); no b_dec subtraction, no input scaling.

        Written as the card writes it (matmul, then add) so features match the card bit for bit.
        """
        return x_BD.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc

    def select(self, pre_BF: Tensor) -> SparseCode:
        """Top-k of the pre-activations (after a ReLU for relu_topk)."""
        if self.activation is Activation.relu_topk:
            pre_BF = F.relu(pre_BF)
        vals_BK, idx_BK = pre_BF.topk(self.k, dim=-1, sorted=False)
        return SparseCode(vals_BK, idx_BK)

    def encode_sparse(self, x_BD: Tensor) -> SparseCode:
        return self.select(self.pre_acts(x_BD))

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense feature activations (B, d_sae): the card's get_feature_acts."""
        vals_BK, idx_BK = self.encode_sparse(x_BD)
        return torch.zeros(*vals_BK.shape[:-1], self.d_sae, dtype=vals_BK.dtype, device=vals_BK.device).scatter_(
            -1, idx_BK, vals_BK
        )

    def decode(self, z_BF: Tensor) -> Tensor:
        """z @ W_dec.T + b_dec for dense latents z (B, d_sae)."""
        return F.linear(z_BF, self.W_dec, self.b_dec)

    def decode_sparse(self, code: SparseCode) -> Tensor:
        """Same as decode(dense z) but gathers only the k active decoder columns per row."""
        vals_BK, idx_BK = code
        lead = idx_BK.shape[:-1]
        out_BD = F.embedding_bag(
            idx_BK.reshape(-1, self.k), self.W_dec.T, per_sample_weights=vals_BK.reshape(-1, self.k), mode="sum"
        )
        return (out_BD + self.b_dec).reshape(*lead, self.d_model)

    def forward(self, x_BD: Tensor) -> ForwardOutput:
        pre_BF = self.pre_acts(x_BD)
        code = self.select(pre_BF)
        return ForwardOutput(self.decode_sparse(code), code, pre_BF)

    # ----- decoder-norm helpers (in place) -----------------------------------------------------------

    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        """Rescale every decoder column W_dec[:, j] to unit L2 norm."""
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder column, so a step keeps norms ~1."""
        if self.W_dec.grad is None:
            return
        parallel_F = (self.W_dec.grad * self.W_dec).sum(0, keepdim=True)
        self.W_dec.grad -= parallel_F * self.W_dec

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}, activation={self.activation.value}"
