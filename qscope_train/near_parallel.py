"""Pairs of live latents whose decoder directions are nearly parallel: a merge pass's search (duplicates.py).
A full search forms the d_sae x d_sae cosines above the diagonal; ParallelSearch carries what one pass
learned to the next, so that a pass in a run's quiet stretch forms only the rows that can hold a pair."""

from __future__ import annotations

import torch
from torch import Tensor

# where a ParallelSearch forms more rows than this share of the live latents, it forms them all
FULL_SHARE = 0.5
# the cosines are formed in bf16 where the device multiplies bf16 natively (2.2x faster than fp32 at 8192 x
# 512 on the 2-core CPU VM): unit vectors rounded to bf16 are each within 2^-9 of their own, and the
# product is rounded once more (2^-9), so a bf16 cosine is within 2^-7 of the true one. The search keeps
# pairs from BF16_MARGIN below the asked cosine, then recomputes theirs in fp32 and keeps those at it.
BF16_MARGIN = 2.0**-7
# a kept unit decoder is bf16: each element within 2^-9 of its own value, so the kept vector is within 2^-9
# of the true one; every move is measured this much longer so that the bounds stay bounds
SNAPSHOT_SLACK = 2.0**-8
# the moves (in decreasing order) at which ParallelSearch may put its threshold D, as shares of the latents
MOVE_QUANTILES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def search_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs whose oneDNN multiplies bf16 natively; fp32 elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def _upper_rows(unit_AD: Tensor, start: int, size: int, best_A: Tensor, low: float, partners: int, found: list) -> None:
    """_search's chunk of rows start .. start + size - 1 where every row is formed: only their cosines to
    the latents from `start` on (each pair is taken from its first latent's row, and a latent's cosines
    to earlier ones are columns of their rows), kept in the search dtype. Raises best_A by the rows' and
    the columns' largest and appends the rows' `partners` most parallel at >= low to found."""
    cos_CN = unit_AD[start : start + size] @ unit_AD[start:].T
    # in the chunk's own block, a latent is not its own partner and a pair counts from its first latent
    own = torch.ones(size, size, dtype=torch.bool, device=unit_AD.device).tril()
    cos_CN[:, :size].masked_fill_(own, -2.0)
    best_A[start : start + size] = torch.maximum(best_A[start : start + size], cos_CN.amax(1).float())
    best_A[start:] = torch.maximum(best_A[start:], cos_CN.amax(0).float())
    top_CT, col_CT = cos_CN.topk(min(partners, cos_CN.shape[1]), dim=1)
    r, t = (top_CT.float() >= low).nonzero(as_tuple=True)  # compared in fp32: a bf16 compare rounds `low`
    found.append((r + start, col_CT[r, t] + start, top_CT[r, t].float()))


@torch.no_grad()
def _search(
    unit_FD: Tensor, alive_F: Tensor, rows_F: Tensor, cos: float, partners: int, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pairs (i_P, j_P, c_P) of near_parallel_pairs, from the cosine rows of the latents in rows_F only
    (rows_F within alive_F; the caller guarantees that every pair at >= cos has a latent in rows_F), and
    per live latent an upper bound on its largest cosine to another live latent among those seen, best_A
    (from its row where its row was formed, else from its column's entries in the rows formed)."""
    alive = alive_F.nonzero().squeeze(1)
    n, device = alive.numel(), unit_FD.device
    none = alive[:0]
    best_A = unit_FD.new_full((n,), -2.0)
    if n < 2:
        return none, none, unit_FD.new_empty(0), best_A
    dtype = search_dtype(device)
    margin = BF16_MARGIN if dtype == torch.bfloat16 else 0.0
    low = cos - margin
    unit_AD = unit_FD[alive].to(dtype)
    formed_A = rows_F[alive]
    formed = formed_A.nonzero().squeeze(1)
    cols_A = torch.arange(n, device=device)
    every_row = bool(formed_A.all())
    found, spilled = [(none, none, unit_AD.new_empty(0))], [(none, none, unit_AD.new_empty(0))]
    for start in range(0, formed.numel(), chunk):
        r_C = formed[start : start + chunk]
        if every_row:  # r_C is start .. start + size - 1
            _upper_rows(unit_AD, start, r_C.numel(), best_A, low, partners, found)
            continue
        cos_CA = (unit_AD[r_C] @ unit_AD.T).float()
        cos_CA[torch.arange(r_C.numel(), device=device), r_C] = -2.0  # a latent is not its own partner
        best_A[r_C] = cos_CA.amax(1)
        best_A = torch.where(formed_A, best_A, torch.maximum(best_A, cos_CA.amax(0)))
        # pairs (a, r), a < r, whose first latent has no row of its own: kept apart, ranked below
        r, a = ((cos_CA >= low) & ~formed_A & (cols_A < r_C[:, None])).nonzero(as_tuple=True)
        spilled.append((a, r_C[r], cos_CA[r, a]))
        cos_CA.masked_fill_(cols_A <= r_C[:, None], -2.0)  # each pair once, from its first latent's row
        top_CT, col_CT = cos_CA.topk(min(partners, n), dim=1)
        r, t = (top_CT >= low).nonzero(as_tuple=True)
        found.append((r_C[r], col_CT[r, t], top_CT[r, t]))
    a_S, b_S, c_S = (torch.cat(parts) for parts in zip(*spilled, strict=True))
    if a_S.numel():  # each such latent keeps its `partners` most parallel, as its own row would
        order = c_S.argsort(descending=True, stable=True)
        order = order[a_S[order].argsort(stable=True)]
        a_S, b_S, c_S = a_S[order], b_S[order], c_S[order]
        first = torch.ones_like(a_S, dtype=torch.bool)
        first[1:] = a_S[1:] != a_S[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(a_S.numel(), device=device), 0), 0).values
        keep = torch.arange(a_S.numel(), device=device) - group_start < partners
        found.append((a_S[keep], b_S[keep], c_S[keep]))
    i_P, j_P = (torch.cat(parts) for parts in list(zip(*found, strict=True))[:2])
    i_P, j_P = alive[i_P], alive[j_P]
    c_P = (unit_FD[i_P] * unit_FD[j_P]).sum(1)  # fp32, to decide and to order by
    keep = (c_P >= cos).nonzero().squeeze(1)
    order = keep[c_P[keep].argsort(descending=True, stable=True)]
    return i_P[order], j_P[order], c_P[order], best_A + margin


@torch.no_grad()
def near_parallel_pairs(
    W_dec_FD: Tensor, alive_F: Tensor, cos: float, partners: int = 4, chunk: int = 2048
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs (i_P, j_P), i < j, of latents in alive_F (d_sae,) bool whose decoder rows (W_dec_FD, d_sae x
    d_model) are at cosine >= cos, at most `partners` per latent i (its most parallel ones, so that the
    pairs stay O(d_sae) however clustered the directions are), ordered by decreasing cosine, and their
    cosines c_P (fp32). The cosines above the diagonal are formed `chunk` rows at a time, in search_dtype."""
    unit_FD = torch.nn.functional.normalize(W_dec_FD.float(), dim=1)
    return _search(unit_FD, alive_F, alive_F, cos, partners, chunk)[:3]


class ParallelSearch:
    """near_parallel_pairs over the passes of one SAE's run, forming only the cosine rows that can hold a
    pair. Between two unit vectors, a cosine moves by at most the sum of how far the two moved. So each
    pass keeps, on the host, the unit decoders it saw (bf16) and, on the device, the live mask and per
    live latent an upper bound on its largest cosine to another live latent. The next pass measures each
    latent's move and picks a threshold D: the latents that moved more than D, or came alive, have their
    rows formed, and so does every other latent whose bound plus its own move plus D reaches `cos`; no pair
    of the remaining latents can. D is the move at one of MOVE_QUANTILES, whichever forms the fewest rows;
    past FULL_SHARE of the live latents every row is formed. The pairs are near_parallel_pairs' (tests
    compare them); what it saves depends on how far the decoders move between passes (the rows formed are
    counted in `formed`)."""

    def __init__(self) -> None:
        self.unit_FD: Tensor | None = None  # on the host
        self.alive_F: Tensor | None = None
        self.bound_F: Tensor | None = None
        self.formed: list[tuple[int, int]] = []  # per pass: (rows formed, live latents)

    @torch.no_grad()
    def __call__(
        self, W_dec_FD: Tensor, alive_F: Tensor, cos: float, partners: int = 4, chunk: int = 2048
    ) -> tuple[Tensor, Tensor, Tensor]:
        unit_FD = torch.nn.functional.normalize(W_dec_FD.float(), dim=1)
        rows_F, ceiling_F = alive_F, None
        if self.unit_FD is not None and self.unit_FD.shape == unit_FD.shape:
            moved_F = (unit_FD - self.unit_FD.to(unit_FD.device, torch.float32)).norm(dim=1) + SNAPSHOT_SLACK
            rows_F, ceiling_F = self._rows(moved_F, alive_F, cos)
        i_P, j_P, c_P, best_A = _search(unit_FD, alive_F, rows_F, cos, partners, chunk)
        bound_F = torch.full_like(unit_FD[:, 0], 2.0)
        bound_F[alive_F] = best_A
        if ceiling_F is not None:  # rows not formed: their cosines to the latents not formed either
            bound_F = torch.where(rows_F, bound_F, torch.maximum(bound_F, ceiling_F))
        self.unit_FD = unit_FD.to("cpu", torch.bfloat16)
        self.alive_F, self.bound_F = alive_F.clone(), bound_F
        self.formed.append((int(rows_F.sum()), int(alive_F.sum())))
        return i_P, j_P, c_P

    def _rows(self, moved_F: Tensor, alive_F: Tensor, cos: float) -> tuple[Tensor, Tensor | None]:
        """The latents whose rows to form, and for the others an upper bound on their cosines to one another
        now (bound + own move + D); (alive_F, None) where that would form most rows."""
        old_F = alive_F & self.alive_F
        if not bool(old_F.any()):
            return alive_F, None
        moves = moved_F[old_F].sort(descending=True).values
        best = None
        for share in MOVE_QUANTILES:
            D = moves[min(int(share * moves.numel()), moves.numel() - 1)]
            ceiling_F = self.bound_F + moved_F + D
            rows_F = alive_F & (~old_F | (moved_F > D) | (ceiling_F >= cos))
            if best is None or int(rows_F.sum()) < int(best[0].sum()):
                best = rows_F, ceiling_F
        if int(best[0].sum()) > FULL_SHARE * int(alive_F.sum()):
            return alive_F, None
        return best
