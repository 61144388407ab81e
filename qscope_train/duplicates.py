"""Duplicate latents: pairs whose decoder directions are nearly parallel and that fire on the same rows.
Mean-squared error pays for such copies with the top-k slots a row does not need, and the copies tilt
apart, each holding a tilted share of one feature, so that no decoder direction is the feature's own.
Training merges such pairs (trainer.merge_cos): one latent takes the pair's direction and output, and
the other is re-seeded on a direction the step reconstructed worst, so no latent is lost and no two
latents end with one direction (a twin, scorecard.py)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from . import distributed
from .config import TrainerConfig
from .near_parallel import ParallelSearch, near_parallel_pairs
from .optim import overwrite_rows_
from .sae import SparseCode, TopKSAE
from .scorecard import TWIN_COS

ENTRIES = 1 << 22  # entries of the latents' lists of fired rows that firing_counts looks at once
# What makes a pair of live latents at decoder cosine >= merge_cos a copy worth merging (session 10's rules,
# kept as constants: none was worth a setting): the rarer latent shares COFIRE of its rows with the other,
# which shares COFIRE_FREQUENT of its own (a dense filler of spare top-k slots is no copy), and the merge
# adds at most MAX_COST of the step's squared error (two latents that each carry much of it stay apart).
COFIRE, COFIRE_FREQUENT, MAX_COST, MIN_ROWS = 0.5, 0.25, 0.1, 4
# a re-seeded latent's encoder row norm, as a share of the live latents' mean: small, so that it enters the
# top-k only where its direction is most of the residual (1 pulled it into many rows at once and raised the
# easy shape's FVU at 2M tokens from 0.0815 to 0.0909; docs/BENCHMARKS.md, session 13)
RESEED_ENCODER = 0.2
# a re-seeded direction, a residual row, moves SHIFT_STEPS times to the mean of the candidate rows at cosine
# >= SHIFT_COS to it (shift_to_shared), and the latent starts out counted as dead, so that AuxK trains it on
# the residual from the next step on. Without both, re-seeded latents ended as blurred features: on the hard
# shape at 2M tokens 31 % of the features at decoder cosine 0.80-0.88 sat on a re-seeded latent, 3 % of
# those above 0.92 (docs/BENCHMARKS.md, session 17)
SHIFT_COS, SHIFT_STEPS = 0.5, 3
# merge passes take copies (co-firing pairs at merge_cos) in the run's first MERGE_UNTIL only, twins to
# the end: the copies' merges give each feature its own direction while the dictionary takes shape; the
# rest of the run trains the re-seeded latents and lets copies tilt apart again where that lowers the
# error, while twins are still merged. Copies merge at up to MAX_COST of the step's error until CHEAP_AFTER
# of the run; after it, only where the merge adds at most one live latent's share of the step's squared
# error (err / live latents): freeing a latent by a dearer merge loses more than an average latent
# carries. Late copies of rare, newly learned features are cheap; late splits of frequent, settled ones
# are dear (docs/BENCHMARKS.md, session 21: on the easy shape such merges cost 0.5-2.5 % of the error
# each and moved held-out FVU above sparsify's in 3 of 6 seeds; copies until 0.5 only lost recovery on
# the hard shape, sessions 19-20). With the default dead window (1/64 of the run) that leaves sixteen
# windows after the last copy merge for the re-seeded latents to come alive; a window above 1/16 of the
# run keeps four: copies also stop SETTLE_WINDOWS dead windows before the end (the demo's window is half
# its run: copy merges from its step 196 to 282 of 376 raised its held-out dead from 45 % to 61-68 %,
# session 19).
MERGE_UNTIL, CHEAP_AFTER, SETTLE_WINDOWS = 0.75, 0.5, 4


class Merges(NamedTuple):
    frequent_M: Tensor  # the pairs' more frequent latents, which take the pair over (long)
    rare_M: Tensor  # their partners, re-seeded (long)
    direction_MD: Tensor  # the unit decoder direction the frequent latent takes
    scale_M: Tensor  # the factor on its encoder row and bias, so that it also carries the partner's output


def _ranges(start_Q: Tensor, n_Q: Tensor) -> tuple[Tensor, Tensor]:
    """The flat positions start_Q[q] + 0 .. n_Q[q] - 1 for every q, in order, and the q each belongs to."""
    q_N = torch.repeat_interleave(torch.arange(n_Q.numel(), device=n_Q.device), n_Q)
    first_Q = n_Q.cumsum(0) - n_Q
    return start_Q[q_N] + torch.arange(q_N.numel(), device=n_Q.device) - first_Q[q_N], q_N


@torch.no_grad()
def firing_counts(code: SparseCode, i_P: Tensor, j_P: Tensor, d_sae: int, entries: int | None = None) -> Tensor:
    """Per latent: rows fired on, positive activation sum and sum of squares; per pair (i_P[p] != j_P[p]):
    rows both fired on and the sum of their activations' products. One (d_sae * 3 + 2P,) fp32 vector
    [fired_F, act_F, sq_F, both_P, cross_P], so that data parallel adds it over ranks in one all-reduce.
    The pair sums intersect the two latents' lists of fired rows (the code regrouped by latent, rows
    ascending): each entry of j's list is looked up among i's, so a pair costs the rows its two latents
    fired on, not k^2 per row; `entries` (None: ENTRIES) bounds the list entries looked at once."""
    vals_BK, idx_BK = code
    device = idx_BK.device
    rows, k = idx_BK.shape
    fired_F = code.fire_counts(d_sae)
    # a plain top-k can pick negative values where fewer than k are positive: they count as firing (as in
    # the trainer's dead counters) but weigh nothing in the merged direction
    pos_BK = vals_BK.float().clamp_min(0)
    act_F = torch.zeros(d_sae, device=device).index_add_(0, idx_BK.reshape(-1), pos_BK.reshape(-1))
    sq_F = torch.zeros(d_sae, device=device).index_add_(0, idx_BK.reshape(-1), pos_BK.square().reshape(-1))
    n_pairs = i_P.shape[0]
    both_P = torch.zeros(n_pairs, device=device)
    cross_P = torch.zeros_like(both_P)
    if n_pairs:
        # the code by latent: each latent's fired rows, ascending, from start_F on
        fired_N = (vals_BK != 0).reshape(-1)
        by_latent = idx_BK.reshape(-1)[fired_N].argsort(stable=True)
        row_N = torch.arange(rows * k, device=device).div(k, rounding_mode="floor")[fired_N][by_latent]
        pos_N = pos_BK.reshape(-1)[fired_N][by_latent]
        start_F = fired_F.cumsum(0) - fired_F
        n_i, n_j = fired_F[i_P], fired_F[j_P]
        # pairs in runs of about `entries` list entries (at least one pair each)
        entries = entries or ENTRIES
        total_P = (n_i + n_j).cumsum(0)
        marks = torch.arange(1, int(total_P[-1]) // entries + 1, device=device) * entries
        bounds = sorted({0, n_pairs, *torch.searchsorted(total_P, marks, right=True).tolist()})
        for p0, p1 in itertools.pairwise(bounds):
            at_i, q_i = _ranges(start_F[i_P[p0:p1]], n_i[p0:p1])
            at_j, q_j = _ranges(start_F[j_P[p0:p1]], n_j[p0:p1])
            if not at_i.numel():
                continue
            key_i = q_i * rows + row_N[at_i]  # ascending: pairs in order, each list's rows ascending
            key_j = q_j * rows + row_N[at_j]
            at = torch.searchsorted(key_i, key_j).clamp_max_(key_i.numel() - 1)
            hit = (key_i[at] == key_j).nonzero().squeeze(1)
            q_H = q_j[hit] + p0
            both_P.index_add_(0, q_H, torch.ones(q_H.shape, device=device))
            cross_P.index_add_(0, q_H, pos_N[at_i[at[hit]]] * pos_N[at_j[hit]])
    return torch.cat([fired_F.float(), act_F, sq_F, both_P, cross_P])


def merge_cost(
    c_P: Tensor, w_a_P: Tensor, w_b_P: Tensor, sq_a_P: Tensor, sq_b_P: Tensor, cross_P: Tensor
) -> tuple[Tensor, Tensor]:
    """Per pair (a the frequent latent, b its partner): the encoder scale s and the squared error the
    merge adds on the counted rows, before training adapts. a moves to m, the unit direction of
    w_a d_a + w_b d_b, with its activations scaled by s, and b's output leaves (b is re-seeded): the error
    is sum_rows |a_a d_a + a_b d_b - s a_a m|^2, least at s = (sum a_a^2 <d_a, m> + sum a_a a_b <d_b, m>)
    / sum a_a^2. From the unit decoders' cosine c_P, the weights and the activations' second moments alone
    (no pair x d_model tensor). Returns (cost_P, s_P)."""
    norm = (w_a_P.square() + w_b_P.square() + 2 * w_a_P * w_b_P * c_P).clamp_min(1e-30).sqrt()
    a_m, b_m = (w_a_P + w_b_P * c_P) / norm, (w_a_P * c_P + w_b_P) / norm  # each direction's cosine to m
    carried = sq_a_P * a_m + cross_P * b_m
    scale = torch.where(sq_a_P > 0, carried / sq_a_P.clamp_min(1e-30), torch.ones_like(sq_a_P))
    before = sq_a_P + sq_b_P + 2 * cross_P * c_P
    return (before - scale * carried).clamp_min(0), scale.clamp(1.0, 2.0)


def pick(
    W_dec_FD: Tensor,
    i_P: Tensor,
    j_P: Tensor,
    c_P: Tensor,
    counts: Tensor,
    cofire: float = COFIRE,
    cofire_frequent: float = COFIRE_FREQUENT,
    max_cost: float | None = MAX_COST,
    min_rows: int = MIN_ROWS,
    copy_max_cost: float | None = None,
) -> Merges:
    """The merges: pairs in which the rarer latent fired on at least `min_rows` rows and shared at least
    `cofire` of them with the other, which shared at least `cofire_frequent` of its own rows (a latent
    that mostly fires elsewhere, such as a dense filler of spare top-k slots, is no copy), and (unless
    max_cost is None) whose merge_cost is at most `max_cost` times the rows' squared reconstruction
    error (counts' last entry); taken greedily in the pairs' order (most parallel first), each latent in
    one merge at most. Twins (cosine >= TWIN_COS) need no co-firing: rare or split, two live latents on
    one direction show a user the same feature twice. copy_max_cost (None: none) caps the copies' (not
    the twins') merge_cost the same way, more tightly. A pair's direction is the activation-weighted mean
    of its two directions; the frequent latent's encoder scale is merge_cost's s (clamped to [1, 2])."""
    d_sae, n_pairs = W_dec_FD.shape[0], i_P.shape[0]
    sizes = [d_sae] * 3 + [n_pairs] * 2
    fired_F, act_F, sq_F, both_P, cross_P, rest = counts.split([*sizes, counts.numel() - sum(sizes)])
    i_frequent = fired_F[i_P] >= fired_F[j_P]
    frequent_P, rare_P = torch.where(i_frequent, i_P, j_P), torch.where(i_frequent, j_P, i_P)
    # two latents that only fired at 0 still get a direction (cosine >= merge_cos > 0)
    weight_F = act_F + 1e-12
    ok = (both_P >= min_rows) & (both_P >= cofire * fired_F[rare_P]) & (both_P >= cofire_frequent * fired_F[frequent_P])
    ok |= c_P >= TWIN_COS  # twins merge whether or not they fire together: the user would see one direction twice
    cost_P, scale_P = merge_cost(c_P, weight_F[frequent_P], weight_F[rare_P], sq_F[frequent_P], sq_F[rare_P], cross_P)
    if max_cost is not None:
        ok &= cost_P <= max_cost * rest[0]
    if copy_max_cost is not None:  # a tighter cap for copies (cheap passes); twins keep max_cost
        ok &= (c_P >= TWIN_COS) | (cost_P <= copy_max_cost * rest[0])
    chosen, used = [], set()
    rows = ok.nonzero().squeeze(1)
    for p, a, b in zip(rows.tolist(), frequent_P[rows].tolist(), rare_P[rows].tolist(), strict=True):
        if a in used or b in used:
            continue
        used.update((a, b))
        chosen.append(p)
    chosen_M = torch.tensor(chosen, dtype=torch.long, device=W_dec_FD.device)
    frequent_M, rare_M = frequent_P[chosen_M], rare_P[chosen_M]
    unit = torch.nn.functional.normalize
    mixed_MD = weight_F[frequent_M, None] * unit(W_dec_FD[frequent_M].float(), dim=1)
    mixed_MD += weight_F[rare_M, None] * unit(W_dec_FD[rare_M].float(), dim=1)
    return Merges(frequent_M, rare_M, unit(mixed_MD, dim=1), scale_P[chosen_M])


def _steps_between_passes(cfg: TrainerConfig) -> int:
    return max(1, cfg.merge_every_tokens // cfg.batch_size)


def first_merge_step(cfg: TrainerConfig, total_steps: int) -> int | None:
    """The step the run's first merge pass follows (cfg resolved), or None if none does: the first step
    ending on a multiple of merge_every_tokens once the first dead window is over. Before the window the
    decoders are still near their initialisation, and every latent still counts as live (none has gone a
    whole window without firing)."""
    if cfg.merge_cos is None:
        return None
    every = _steps_between_passes(cfg)
    window_end = max(1, -(-cfg.dead_after_tokens // cfg.batch_size))  # steps until the first window is over
    end = -(-window_end // every) * every
    return end - 1 if end <= total_steps else None


def merge_step(step: int, cfg: TrainerConfig, total_steps: int) -> bool:
    """Whether a merge pass follows step `step` of total_steps (cfg resolved): from first_merge_step on,
    after every merge_every_tokens tokens (see twins_only for what the pass merges)."""
    first = first_merge_step(cfg, total_steps)
    return first is not None and first <= step and (step + 1) % _steps_between_passes(cfg) == 0


def twins_only(step: int, cfg: TrainerConfig, total_steps: int) -> bool:
    """Whether a merge pass after step `step` of total_steps (cfg resolved) merges twins only (decoder
    cosine >= TWIN_COS): past the run's first MERGE_UNTIL, or with fewer than SETTLE_WINDOWS dead
    windows of tokens left."""
    left = (total_steps - step - 1) * cfg.batch_size
    return step + 1 > int(total_steps * MERGE_UNTIL) or left < SETTLE_WINDOWS * cfg.dead_after_tokens


def cheap_only(step: int, cfg: TrainerConfig, total_steps: int) -> bool:
    """Whether a merge pass after step `step` of total_steps (cfg resolved) takes only merges that add at
    most one live latent's share of the step's squared error: past the run's first CHEAP_AFTER."""
    return step + 1 > int(total_steps * CHEAP_AFTER)


@torch.no_grad()
def residual_rows(resid_BD: Tensor, m: int, seed: int) -> tuple[Tensor, Tensor]:
    """(seeds, candidates): up to m unit rows of a step's residual x - x_hat drawn without replacement with
    probability proportional to their squared norm among the global batch's 4m worst rows (each rank's
    4m worst gathered, then the 4m worst of those in order of error, so that any number of ranks draws
    from the same candidates; drawn from `seed` on the CPU, the same on every rank), and those rows."""
    n_cand = 4 * m
    worst = resid_BD.float().pow(2).sum(1).topk(min(n_cand, resid_BD.shape[0])).indices
    gathered_CD = distributed.cat(resid_BD[worst].float())
    weights_C, order = gathered_CD.pow(2).sum(1).topk(min(n_cand, gathered_CD.shape[0]))
    candidates_CD, weights_C = gathered_CD[order], weights_C.cpu().double()
    n = min(m, int((weights_C > 0).sum()))
    if n == 0:
        return candidates_CD[:0], candidates_CD
    g = torch.Generator().manual_seed(seed)
    chosen = torch.multinomial(weights_C, n, replacement=False, generator=g).to(candidates_CD.device)
    return torch.nn.functional.normalize(candidates_CD[chosen], dim=1), candidates_CD


@torch.no_grad()
def shift_to_shared(
    seeds_MD: Tensor,
    rows_CD: Tensor,
    avoid_AD: Tensor | None = None,
    min_cos: float = SHIFT_COS,
    steps: int = SHIFT_STEPS,
) -> Tensor:
    """Mean shift on the sphere: each unit seed moves, `steps` times, to the direction of the sum of the
    rows at cosine >= min_cos to it, each weighted by its projection on the seed. One residual row mixes
    every feature the step missed on it; the rows near it share mostly the strongest of them, so the
    shifted seed is more one feature than one row's mixture. A seed with no other row near it stays, and
    so does one whose shifted direction would be a twin (cosine >= TWIN_COS) of an earlier seed's or of
    a row of avoid_AD (the live latents' unit decoder directions): a re-seeded latent must not start as
    a copy of another."""
    unit_CD = torch.nn.functional.normalize(rows_CD, dim=1)
    shifted_MD = seeds_MD
    for _ in range(steps):
        near_CM = unit_CD @ shifted_MD.T >= min_cos
        weight_CM = torch.where(near_CM, rows_CD @ shifted_MD.T, torch.zeros((), device=rows_CD.device))
        moved_M = near_CM.sum(0) >= 2  # the seed's own row is always near it
        mean_MD = torch.nn.functional.normalize(weight_CM.T @ rows_CD, dim=1)
        shifted_MD = torch.where(moved_M[:, None], mean_MD, shifted_MD)
    m = seeds_MD.shape[0]
    twin_M = torch.zeros(m, dtype=torch.bool, device=seeds_MD.device)
    for start in range(0, m, 1024):  # (1024 x M) and (1024 x A) cosines at a time
        part_ND = shifted_MD[start : start + 1024]
        index_N = torch.arange(start, start + part_ND.shape[0], device=part_ND.device)
        earlier_NM = index_N[:, None] > torch.arange(m, device=part_ND.device)
        twin_M[index_N] = ((part_ND @ shifted_MD.T >= TWIN_COS) & earlier_NM).any(1)
        if avoid_AD is not None and avoid_AD.shape[0]:
            twin_M[index_N] |= (part_ND @ avoid_AD.T.to(part_ND.dtype) >= TWIN_COS).any(1)
    return torch.where(twin_M[:, None], seeds_MD, shifted_MD)


@torch.no_grad()
def merge_(
    sae: TopKSAE,
    opt,
    since_fired_F: Tensor,
    code: SparseCode,
    err: Tensor,
    resid_BD: Tensor,
    cfg: TrainerConfig,
    seed: int = 0,
    only_twins: bool = False,
    search: ParallelSearch | None = None,
    cheap: bool = False,
) -> int:
    """One merge pass over a training SAE, deciding from `code`, the top-k code of this rank's rows of a
    training step (the trainer keeps it: train_steps' keep_code), `err`, that step's squared
    reconstruction error over all ranks' rows, and `resid_BD`, this rank's residuals x - x_hat of that
    step; the counts are added over ranks under data parallel, so every rank merges the same pairs.

    Per merge (pick), the more frequent latent takes the pair's mean direction, its encoder row and bias
    scaled to carry the partner's output too; the partner is re-seeded: its decoder on a residual
    direction (residual_rows, drawn from `seed`, then shift_to_shared), its encoder row that direction
    at RESEED_ENCODER of the live latents' mean encoder norm, b_enc 0, and counted as dead (AuxK trains
    it until it fires). All of it in the weights the run exports too (optim.overwrite_rows_).
    only_twins: pairs at cosine >= TWIN_COS only (the run's end, twins_only); a pass that finds
    no pair returns before counting anything. cheap: copy merges only where they add at most
    err / (live latents) of squared error (cheap_only); twins still merge at up to MAX_COST * err. `search`: the run's ParallelSearch for this SAE (None: a
    full near_parallel_pairs). Reads back to the host (it runs between steps); returns the number of
    pairs merged."""
    alive_F = since_fired_F < cfg.dead_after_tokens
    find = near_parallel_pairs if search is None else search
    i_P, j_P, c_P = find(sae.W_dec_FD, alive_F, max(TWIN_COS, cfg.merge_cos) if only_twins else cfg.merge_cos)
    if i_P.numel() == 0:  # every rank holds the same decoder, so every rank returns here alike
        return 0
    counts = torch.cat([distributed.sum_(firing_counts(code, i_P, j_P, sae.d_sae)), err.float().reshape(1)])
    m = pick(sae.W_dec_FD, i_P, j_P, c_P, counts, copy_max_cost=1 / float(alive_F.sum()) if cheap else None)
    if m.frequent_M.numel() == 0:
        return 0
    seeds_MD, candidates_CD = residual_rows(resid_BD, m.frequent_M.numel(), seed)
    n = seeds_MD.shape[0]  # a pair without a residual row to re-seed its partner on is left as it is
    keep_M, rare_M, scale_M1 = m.frequent_M[:n], m.rare_M[:n], m.scale_M[:n, None]
    encoder_norm = sae.W_enc[alive_F].norm(dim=1).mean() * RESEED_ENCODER
    overwrite_rows_(opt, sae.W_dec_FD, keep_M, m.direction_MD[:n])
    overwrite_rows_(opt, sae.W_enc, keep_M, sae.W_enc[keep_M] * scale_M1)
    overwrite_rows_(opt, sae.b_enc, keep_M, sae.b_enc[keep_M] * scale_M1[:, 0])
    staying_F = alive_F.clone()
    staying_F[rare_M] = False
    seeds_MD = shift_to_shared(seeds_MD, candidates_CD, torch.nn.functional.normalize(sae.W_dec_FD[staying_F], dim=1))
    overwrite_rows_(opt, sae.W_dec_FD, rare_M, seeds_MD)
    overwrite_rows_(opt, sae.W_enc, rare_M, seeds_MD * encoder_norm)
    overwrite_rows_(opt, sae.b_enc, rare_M, torch.zeros_like(sae.b_enc[rare_M]))
    since_fired_F[rare_M] = cfg.dead_after_tokens
    return n


@torch.no_grad()
def step_code(sae: TopKSAE, x_BD: Tensor) -> tuple[SparseCode, Tensor, Tensor]:
    """What merge_ takes, for a batch outside the trainer (tests, benchmarks): the SAE's top-k code of
    x_BD, its squared reconstruction error and its residuals (this process's rows only)."""
    code = sae.encode_sparse(x_BD)
    resid_BD = (x_BD - sae.decode_sparse(code)).float()
    return code, resid_BD.square().sum(), resid_BD
