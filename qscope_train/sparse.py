"""Sparse pieces of the training step: the (row, slot) pairs of a code grouped by latent, and the two
autograd functions whose backward reads only the selected latents' rows (the encoder's gathered
pre-activations and the embedding_bag decoder)."""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
            # int32 keys (any d_sae fits) sort about twice as fast as int64 ones on a CPU; stable, so each
            # latent's pairs are in row order (an int64 argsort kept that order only on larger codes)
            order = flat.to(torch.int32).sort(stable=True).indices
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
