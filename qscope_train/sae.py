"""TopK sparse autoencoder with the Qwen-Scope names, shapes and encoder convention, and a sparse backward.

encode(x) is the release card's feature extraction: topk(x @ W_enc.T + b_enc, k) scattered into
zeros (optionally with a ReLU first, as the official app does); decode(z) = z @ W_dec.T + b_dec.
Inside, the decoder is kept as rows W_dec_FD (d_sae, d_model) = W_dec.T, which embedding_bag
gathers fastest; `W_dec` is that parameter's transposed view and to_release() writes it as released.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import screen
from .config import Activation
from .errors import InputError
from .release import RELEASE_KEYS
from .sparse import LatentMajor, _GatherPre, _SparseDecode


class SparseCode(NamedTuple):
    """The k selected latents per row: values (B, k) and their indices (B, k)."""

    vals_BK: Tensor
    idx_BK: Tensor

    def fire_counts(self, d_sae: int) -> Tensor:
        """Rows on which each latent fired (value non-zero; a ReLU can zero a selected latent), (d_sae,) int64.
        A scatter-add, so nothing is read back to the host (bincount and boolean indexing would)."""
        fired = (self.vals_BK != 0).reshape(-1).long()
        return torch.zeros(d_sae, dtype=torch.long, device=fired.device).index_add_(0, self.idx_BK.reshape(-1), fired)


class ForwardOutput(NamedTuple):
    x_hat_BD: Tensor
    code: SparseCode
    pre_BF: Tensor  # dense pre-activations, without autograd history (for AuxK's selection)


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
        self.W_dec_FD = nn.Parameter(torch.empty(d_sae, d_model, **f32))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **f32))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **f32))
        self.centered = False  # training only: the encoder reads x - b_dec (see center_input_)
        self.init_weights_()

    @property
    def W_dec(self) -> Tensor:
        """The decoder as released, (d_model, d_sae): a view of W_dec_FD."""
        return self.W_dec_FD.T

    # ----- construction and the release format -------------------------------------------------

    @torch.no_grad()
    def init_weights_(
        self,
        x_sample_ND: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        encoder_norm: float = 1.0,
    ) -> None:
        """Unit-norm random decoder columns, W_enc = encoder_norm * W_dec.T, b_enc = 0, b_dec = sample mean (or 0)."""
        rows = torch.randn(self.d_sae, self.d_model, generator=generator, dtype=torch.float32)
        rows /= rows.norm(dim=1, keepdim=True)
        self.W_dec_FD.copy_(rows)
        self.W_enc.copy_(rows * encoder_norm)
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
            sae.W_enc.copy_(tensors["W_enc"])
            sae.W_dec_FD.copy_(tensors["W_dec"].T)
            sae.b_enc.copy_(tensors["b_enc"])
            sae.b_dec.copy_(tensors["b_dec"])
        return sae

    @torch.no_grad()
    def to_release(self) -> dict[str, Tensor]:
        """The four release tensors: fp32, contiguous, detached copies on the CPU (a centred encoder's
        b_dec folded into b_enc, so the card's encoder computes the same pre-activations)."""
        out = {key: getattr(self, key).detach().float().cpu().contiguous().clone() for key in RELEASE_KEYS}
        if self.centered:
            out["b_enc"] = self._folded_b_enc().float().cpu()
        return out

    def _folded_b_enc(self) -> Tensor:
        """b_enc - W_enc @ b_dec: (x - b_dec) @ W_enc.T + b_enc == x @ W_enc.T + that."""
        return self.b_enc - self.W_enc @ self.b_dec

    @torch.no_grad()
    def center_input_(self, on: bool = True) -> None:
        """Switch the encoder between reading x (the release's form) and x - b_dec (the form sparsify and
        Gao et al. train: b_dec then moves the encoder's origin too). b_enc is rewritten so that the
        pre-activations are unchanged; to_release() always writes the uncentred form."""
        if on == self.centered:
            return
        shift = self.W_enc @ self.b_dec
        self.b_enc.add_(shift if on else -shift)
        self.centered = on

    # ----- encoder / decoder -----------------------------------------------------------------------

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """x @ W_enc.T + b_enc, shape (B, d_sae); no b_dec subtraction, no input scaling.

        Written as the card writes it (matmul, then add) so features match the card bit for bit.
        """
        if self.centered:
            return (x_BD.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc.T + self.b_enc
        return x_BD.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc

    def select(self, pre_BF: Tensor, k: Optional[int] = None) -> SparseCode:
        """Top-k of the pre-activations (after a ReLU for relu_topk)."""
        if self.activation is Activation.relu_topk:
            pre_BF = F.relu(pre_BF)
        vals_BK, idx_BK = pre_BF.topk(k or self.k, dim=-1, sorted=False)
        return SparseCode(vals_BK, idx_BK)

    def encode_sparse(self, x_BD: Tensor) -> SparseCode:
        return self.select(self.pre_acts(x_BD))

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense feature activations (B, d_sae): the card's get_feature_acts."""
        vals_BK, idx_BK = self.encode_sparse(x_BD)
        out = torch.zeros(*vals_BK.shape[:-1], self.d_sae, dtype=vals_BK.dtype, device=vals_BK.device)
        return out.scatter_(-1, idx_BK, vals_BK)

    def decode(self, z_BF: Tensor) -> Tensor:
        """z @ W_dec.T + b_dec for dense latents z (B, d_sae)."""
        return z_BF @ self.W_dec_FD + self.b_dec

    def decode_sparse(self, code: SparseCode, bias: bool = True, pairs: Optional[LatentMajor] = None) -> Tensor:
        """Same as decode(dense z) but gathers only the k active decoder rows per row of the batch.

        `pairs` (the code's LatentMajor) lets the backward share its grouping with the encoder's.
        """
        vals_BK, idx_BK = code
        lead, m = idx_BK.shape[:-1], idx_BK.shape[-1]
        if pairs is None:
            pairs = LatentMajor(idx_BK.reshape(-1, m), self.d_sae)
        out_BD = _SparseDecode.apply(vals_BK.reshape(-1, m), self.W_dec_FD, pairs)
        if bias:
            out_BD = out_BD + self.b_dec
        return out_BD.reshape(*lead, self.d_model)

    def code_with_grad(self, x_BD: Tensor, pre_BF: Tensor, pairs: LatentMajor, b_dec_grad: bool = True) -> Tensor:
        """Values at pairs.idx_BM that carry gradients to W_enc and b_enc (and b_dec, centred, unless
        b_dec_grad is False) through the sparse backward. x_BD is the raw input."""
        if self.centered:
            x_in = (x_BD.to(self.W_enc.dtype) - self.b_dec).detach()
            vals = _GatherPre.apply(x_in, self.W_enc, self.b_enc, self.b_dec if b_dec_grad else None, pre_BF, pairs)
        else:
            vals = _GatherPre.apply(x_BD, self.W_enc, self.b_enc, None, pre_BF, pairs)
        return F.relu(vals) if self.activation is Activation.relu_topk else vals

    def decode_selected(self, x_BD: Tensor, pre_BF: Tensor, idx_BM: Tensor, keep_BM: Optional[Tensor] = None) -> Tensor:
        """Reconstruction without b_dec from the latents idx_BM (B, M), valued from pre_BF (B, d_sae), where
        keep_BM (bool, B x M) is True if given; the gradients reach only those latents' W_enc, b_enc and
        decoder rows, through the sparse backward (AuxK's term). b_dec gets none even when the encoder
        reads x - b_dec: AuxK is there to move dead latents, and its gradient on the shared bias
        (normalised by the small residual's variance) cost reconstruction on real activations
        (docs/BENCHMARKS.md, tiny Qwen3)."""
        pairs = LatentMajor(idx_BM, self.d_sae)
        vals_BM = self.code_with_grad(x_BD, pre_BF, pairs, b_dec_grad=False)
        if keep_BM is not None:
            vals_BM = vals_BM * keep_BM.to(vals_BM.dtype)
        return self.decode_sparse(SparseCode(vals_BM, idx_BM), bias=False, pairs=pairs)

    @torch.no_grad()
    def dense_pre(self, x_BD: Tensor, gemm_dtype: Optional[torch.dtype] = None) -> Tensor:
        """Pre-activations (B, d_sae) without autograd history; gemm_dtype (e.g. bfloat16) runs the GEMM
        in that dtype, weights staying fp32."""
        x_BD = x_BD.to(self.W_enc.dtype)
        # centred: (x - b_dec) W^T + b_enc computed as x W^T + (b_enc - W b_dec), no (B, D) copy
        b_enc = self._folded_b_enc() if self.centered else self.b_enc
        if gemm_dtype is None or gemm_dtype == self.W_enc.dtype:
            return torch.addmm(b_enc, x_BD, self.W_enc.T)  # bias fused into the GEMM
        return (x_BD.to(gemm_dtype) @ self.W_enc.to(gemm_dtype).T).float() + b_enc

    @torch.no_grad()
    def pre_top(
        self, x_BD: Tensor, gemm_dtype: Optional[torch.dtype] = None, k: Optional[int] = None
    ) -> tuple[Tensor, Tensor]:
        """dense_pre's pre-activations and each row's top k latents (select's; k: self.k if None). In fp32
        on a CPU with native bf16 both come from screen.screened_pre: the top k and their values are the
        fp32 ones, the other pre-activations are at bf16 accuracy, and no top k over all latents runs."""
        k = k or self.k
        fp32 = (gemm_dtype is None or gemm_dtype == self.W_enc.dtype) and self.W_enc.dtype == torch.float32
        if fp32 and screen.applies(x_BD.device, self.d_model, self.d_sae, k):
            b_enc = self._folded_b_enc() if self.centered else self.b_enc
            relu = self.activation is Activation.relu_topk
            pre_BF, idx_BK, _ = screen.screened_pre(x_BD.to(self.W_enc.dtype), self.W_enc, b_enc, k, relu=relu)
            return pre_BF, idx_BK
        pre_BF = self.dense_pre(x_BD, gemm_dtype)
        return pre_BF, self.select(pre_BF, k).idx_BK

    def reconstruct(self, x_BD: Tensor, pre_BF: Tensor, idx_BK: Tensor) -> ForwardOutput:
        """Decode the latents idx_BK (B, k), valued from pre_BF, with sparse gradients to every parameter."""
        pairs = LatentMajor(idx_BK, self.d_sae)
        code = SparseCode(self.code_with_grad(x_BD.to(self.W_enc.dtype), pre_BF, pairs), idx_BK)
        return ForwardOutput(self.decode_sparse(code, pairs=pairs), code, pre_BF)

    def forward(self, x_BD: Tensor, gemm_dtype: Optional[torch.dtype] = None, k: Optional[int] = None) -> ForwardOutput:
        """Training forward: dense pre-activations without autograd, sparse gradients for the top k.

        gemm_dtype: see dense_pre; the top k: pre_top. k overrides self.k for this call (k annealing).
        """
        pre_BF, idx_BK = self.pre_top(x_BD, gemm_dtype, k)
        return self.reconstruct(x_BD, pre_BF, idx_BK)

    # ----- decoder-norm helpers (in place) -----------------------------------------------------------

    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        """Rescale every decoder direction (a row of W_dec_FD, a column of W_dec) to unit L2 norm."""
        self.W_dec_FD /= self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder direction, so a step keeps norms ~1."""
        if self.W_dec_FD.grad is None:
            return
        # vecdot + addcmul_ avoid (d_sae, d_model) temporaries; vecdot reads both 1.5x faster than einsum
        parallel_F1 = torch.linalg.vecdot(self.W_dec_FD.grad, self.W_dec_FD, dim=1).unsqueeze(1)
        self.W_dec_FD.grad.addcmul_(self.W_dec_FD, parallel_F1, value=-1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}, activation={self.activation.value}"
