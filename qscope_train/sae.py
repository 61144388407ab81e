"""TopK sparse autoencoder with the Qwen-Scope names, shapes and encoder convention, and a sparse backward.

encode(x) is the release card's feature extraction: topk(x @ W_enc.T + b_enc, k) scattered into
zeros (optionally with a ReLU first, as the official app does); decode(z) = z @ W_dec.T + b_dec.
Inside, the decoder is kept as rows W_dec_FD (d_sae, d_model) = W_dec.T, which embedding_bag
gathers fastest; `W_dec` is that parameter's transposed view and to_release() writes it as released.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Activation
from .errors import InputError
from .release import RELEASE_KEYS


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


class LatentMajor:
    """The (row, slot) pairs of idx_BM (B, M) grouped by latent, built on first use and then shared.

    Per-latent weight gradients are sums over the rows that selected each latent; with the pairs
    grouped by latent, embedding_bag computes them as one weighted gather-sum per latent, which on a
    2-core CPU is ~1.6x faster than a CSR matmul and ~2.5x faster than embedding_bag's own dense
    backward (docs/BENCHMARKS.md). The encoder and decoder of one code share one grouping (one sort).
    """

    def __init__(self, idx_BM: Tensor, n_latents: int) -> None:
        self.idx_BM, self.n_latents = idx_BM, n_latents
        self._built: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    def _build(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(order, rows, latents, offsets): the flat pair indices sorted by latent, their batch rows and
        latents in that order, and where each latent's run starts."""
        if self._built is None:
            flat = self.idx_BM.reshape(-1)
            order = flat.argsort()
            latents = flat[order]
            # where each latent's run starts in the sorted pairs (searchsorted, unlike bincount, needs no
            # read-back of the largest index on a GPU)
            offsets = torch.searchsorted(latents, torch.arange(self.n_latents, device=flat.device))
            rows = torch.div(order, self.idx_BM.shape[-1], rounding_mode="floor")
            self._built = (order, rows, latents, offsets)
        return self._built

    def weighted_rows(self, w_BM: Tensor, y_BD: Tensor) -> Tensor:
        """out[f] = sum over (b, m) with idx[b, m] = f of w[b, m] * y[b], shape (n_latents, D)."""
        order, rows, _, offsets = self._build()
        return F.embedding_bag(rows, y_BD, offsets, mode="sum", per_sample_weights=w_BM.reshape(-1)[order])

    def dots(self, y_BD: Tensor, W_FD: Tensor) -> Tensor:
        """out[b, m] = <y[b], W_FD[idx[b, m]]>, shape (B, M), without a (B, M, D) gather.

        Latent-major, each decoder row is read once and the rows of y (the smaller table) are
        gathered: that is embedding_bag's per-sample-weight backward with W_FD as the bags' output
        gradient, 1.6x faster than sampled_addmm on a 2-core CPU. That op is internal to torch, so
        sampled_addmm (public) stands in wherever it is missing or refuses the inputs.
        """
        op = per_sample_backward()
        if op is not None:
            order, rows, latents, offsets = self._build()
            try:
                d = op(W_FD.contiguous(), y_BD.contiguous(), rows, offsets, latents, 0, -1)
            except (RuntimeError, TypeError):
                pass
            else:
                return torch.empty_like(d).index_copy_(0, order, d).view(self.idx_BM.shape)
        return sampled_dots(self.idx_BM, y_BD, W_FD, self.n_latents)


def sampled_dots(idx_BM: Tensor, y_BD: Tensor, W_FD: Tensor, n_latents: int) -> Tensor:
    """out[b, m] = <y[b], W_FD[idx[b, m]]> with torch.sparse.sampled_addmm (the public fallback of dots)."""
    B, M = idx_BM.shape
    crow = torch.arange(0, B * M + 1, M, device=y_BD.device)
    with warnings.catch_warnings():  # torch calls CSR support "beta"; this pattern is valid by construction
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            idx_BM.reshape(-1),
            torch.zeros(B * M, dtype=y_BD.dtype, device=y_BD.device),  # zeros: beta=0 still reads them
            size=(B, n_latents),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, y_BD, W_FD.T, beta=0.0).values().view(B, M)


@functools.cache
def per_sample_backward():
    """torch's internal per-sample-weight backward of embedding_bag, or None where this torch lacks it;
    looked up on first use, not at import."""
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward
    except (AttributeError, RuntimeError):
        return None


class _GatherPre(torch.autograd.Function):
    """pre[b, idx[b, m]] from dense pre-activations computed without autograd, with a backward that
    reaches W_enc, b_enc (and b_dec, when the encoder reads x - b_dec) only through the gathered
    entries (no dense (B, d_sae) gradient). x_BD is the encoder's input, already centred if it is."""

    @staticmethod
    def forward(
        ctx, x_BD: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], pre_BF: Tensor, pairs
    ) -> Tensor:
        ctx.save_for_backward(x_BD, W_enc)
        ctx.pairs = pairs
        return pre_BF.gather(-1, pairs.idx_BM)

    @staticmethod
    def backward(ctx, g_BM: Tensor):
        x_BD, W_enc = ctx.saved_tensors
        pairs = ctx.pairs
        g_W = pairs.weighted_rows(g_BM, x_BD.to(g_BM.dtype)) if ctx.needs_input_grad[1] else None
        g_b = g_b_dec = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g_b = torch.zeros(pairs.n_latents, dtype=g_BM.dtype, device=g_BM.device).index_add_(
                0, pairs.idx_BM.reshape(-1), g_BM.reshape(-1)
            )
            if ctx.needs_input_grad[3]:
                # d pre[b, f] / d b_dec = -W_enc[f], so the rows' gradients sum to -(g_b_enc @ W_enc): a
                # (d_sae,) x (d_sae, d_model) product instead of a (B, d_model) sparse one
                g_b_dec = -(g_b @ W_enc)
        return None, g_W, g_b if ctx.needs_input_grad[2] else None, g_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_m vals[b, m] * W_dec_FD[idx[b, m]] (embedding_bag), with a backward that reads only the
    selected decoder rows: value gradients as dot products and the weight gradient, both latent-major."""

    @staticmethod
    def forward(ctx, vals_BM: Tensor, W_FD: Tensor, pairs: LatentMajor) -> Tensor:
        ctx.save_for_backward(vals_BM, W_FD)
        ctx.pairs = pairs
        return F.embedding_bag(pairs.idx_BM, W_FD, mode="sum", per_sample_weights=vals_BM)

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        vals_BM, W_FD = ctx.saved_tensors
        pairs = ctx.pairs
        g_vals = pairs.dots(g_BD, W_FD) if ctx.needs_input_grad[0] else None
        g_W = pairs.weighted_rows(vals_BM.to(g_BD.dtype), g_BD) if ctx.needs_input_grad[1] else None
        return g_vals, g_W, None


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

    def reconstruct(self, x_BD: Tensor, pre_BF: Tensor, idx_BK: Tensor) -> ForwardOutput:
        """Decode the latents idx_BK (B, k), valued from pre_BF, with sparse gradients to every parameter."""
        pairs = LatentMajor(idx_BK, self.d_sae)
        code = SparseCode(self.code_with_grad(x_BD.to(self.W_enc.dtype), pre_BF, pairs), idx_BK)
        return ForwardOutput(self.decode_sparse(code, pairs=pairs), code, pre_BF)

    def forward(self, x_BD: Tensor, gemm_dtype: Optional[torch.dtype] = None, k: Optional[int] = None) -> ForwardOutput:
        """Training forward: dense pre-activations without autograd, sparse gradients for the top k.

        gemm_dtype: see dense_pre. k overrides self.k for this call (k annealing).
        """
        pre_BF = self.dense_pre(x_BD, gemm_dtype)
        with torch.no_grad():
            idx_BK = self.select(pre_BF, k).idx_BK
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
