"""Duplicate latents: pairs whose decoder directions are nearly parallel and that fire on the same rows.
Mean-squared error pays for such copies with the top-k slots a row does not need, and the copies tilt
apart, each holding a tilted share of one feature, so that no decoder direction is the feature's own.
Training merges their decoder directions (trainer.merge_cos): both latents take the pair's mean
direction and stay live."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import distributed
from .config import TrainerConfig
from .optim import overwrite_rows_
from .sae import SparseCode, TopKSAE

ROW_PAIRS = 1 << 20  # (row, pair of its selected latents) entries looked up at once


class Merges(NamedTuple):
    frequent_M: Tensor  # the pairs' more frequent latents (long)
    rare_M: Tensor  # their partners (long)
    direction_MD: Tensor  # the unit decoder direction both latents of a pair take


@torch.no_grad()
def near_parallel_pairs(
    W_dec_FD: Tensor, alive_F: Tensor, cos: float, partners: int = 4, chunk: int = 2048
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs (i_P, j_P), i < j, of latents in alive_F (d_sae,) bool whose decoder rows (W_dec_FD, d_sae x
    d_model) are at cosine >= cos, at most `partners` per latent i (its most parallel ones, so that the
    pairs stay O(d_sae) however clustered the directions are), ordered by decreasing cosine, and their
    cosines c_P. The d_sae x d_sae cosines are formed `chunk` rows at a time."""
    alive = alive_F.nonzero().squeeze(1)
    unit_AD = torch.nn.functional.normalize(W_dec_FD[alive].float(), dim=1)
    none = alive[:0]
    i_parts, j_parts, c_parts = [none], [none], [unit_AD.new_empty(0)]
    for start in range(0, unit_AD.shape[0], chunk):
        cos_CA = unit_AD[start : start + chunk] @ unit_AD.T
        rows = torch.arange(start, start + cos_CA.shape[0], device=cos_CA.device)
        cos_CA.masked_fill_(rows[:, None] >= torch.arange(unit_AD.shape[0], device=cos_CA.device), -2.0)
        top_CT, col_CT = cos_CA.topk(min(partners, cos_CA.shape[1]), dim=1)
        r, t = (top_CT >= cos).nonzero(as_tuple=True)
        i_parts.append(r + start)
        j_parts.append(col_CT[r, t])
        c_parts.append(top_CT[r, t])
    i_P, j_P, c_P = torch.cat(i_parts), torch.cat(j_parts), torch.cat(c_parts)
    order = c_P.argsort(descending=True, stable=True)
    return alive[i_P[order]], alive[j_P[order]], c_P[order]


@torch.no_grad()
def firing_counts(code: SparseCode, i_P: Tensor, j_P: Tensor, d_sae: int, rows: int | None = None) -> Tensor:
    """Per latent: rows fired on, positive activation sum and sum of squares; per pair: rows both fired on
    and the sum of their activations' products. One (d_sae * 3 + 2P,) fp32 vector [fired_F, act_F, sq_F,
    both_P, cross_P], so that data parallel adds it over ranks in one all-reduce. The pair sums come from
    each row's own pairs of selected latents (k(k-1)/2 of them) looked up among the P pairs, `rows` rows
    at a time (None: about ROW_PAIRS lookups at once); no rows x d_sae tensor is built."""
    vals_BK, idx_BK = code
    device = idx_BK.device
    fired_F = code.fire_counts(d_sae).float()
    # a plain top-k can pick negative values where fewer than k are positive: they count as firing (as in
    # the trainer's dead counters) but weigh nothing in the merged direction
    pos_BK = vals_BK.float().clamp_min(0)
    act_F = torch.zeros(d_sae, device=device).index_add_(0, idx_BK.reshape(-1), pos_BK.reshape(-1))
    sq_F = torch.zeros(d_sae, device=device).index_add_(0, idx_BK.reshape(-1), pos_BK.square().reshape(-1))
    both_P = torch.zeros(i_P.shape[0], device=device)
    cross_P = torch.zeros_like(both_P)
    k = idx_BK.shape[1]
    if i_P.numel() and k > 1:
        # each pair as the key lo * d_sae + hi, sorted once for the lookups (int32 while the keys fit)
        key_dtype = torch.int32 if d_sae * d_sae < 2**31 else torch.int64
        key_S, pair_S = (torch.minimum(i_P, j_P) * d_sae + torch.maximum(i_P, j_P)).to(key_dtype).sort()
        a_T, b_T = torch.triu_indices(k, k, 1, device=device)  # a row's pairs of top-k slots
        rows = rows or max(1, ROW_PAIRS // a_T.numel())
        keyed_BK = idx_BK.to(key_dtype)
        for start in range(0, idx_BK.shape[0], rows):
            idx, vals, pos = (t[start : start + rows] for t in (keyed_BK, vals_BK, pos_BK))
            key_RT = torch.minimum(idx[:, a_T], idx[:, b_T]) * d_sae + torch.maximum(idx[:, a_T], idx[:, b_T])
            at_RT = torch.searchsorted(key_S, key_RT).clamp_max_(key_S.numel() - 1)
            r_H, t_H = (key_S[at_RT] == key_RT).nonzero(as_tuple=True)
            p_H, a_H, b_H = pair_S[at_RT[r_H, t_H]], a_T[t_H], b_T[t_H]
            both_P.index_add_(0, p_H, ((vals[r_H, a_H] != 0) & (vals[r_H, b_H] != 0)).float())
            cross_P.index_add_(0, p_H, pos[r_H, a_H] * pos[r_H, b_H])
    return torch.cat([fired_F, act_F, sq_F, both_P, cross_P])


def merge_cost(c_P: Tensor, w_a_P: Tensor, w_b_P: Tensor, sq_a_P: Tensor, sq_b_P: Tensor, cross_P: Tensor) -> Tensor:
    """Per pair, the squared error a merge adds on the counted rows, before training adapts: both latents
    keep their activations a_a, a_b and move to m, the unit direction of w_a d_a + w_b d_b, so the
    output changes by a_a (m - d_a) + a_b (m - d_b): sum_rows |a_a (d_a - m) + a_b (d_b - m)|^2. From
    the unit decoders' cosine c_P, the weights and the activations' second moments alone (no pair x
    d_model tensor)."""
    norm = (w_a_P.square() + w_b_P.square() + 2 * w_a_P * w_b_P * c_P).clamp_min(1e-30).sqrt()
    a_m, b_m = (w_a_P + w_b_P * c_P) / norm, (w_a_P * c_P + w_b_P) / norm  # each direction's cosine to m
    return sq_a_P * (2 - 2 * a_m) + sq_b_P * (2 - 2 * b_m) + 2 * cross_P * (c_P - a_m - b_m + 1)


def pick(
    W_dec_FD: Tensor,
    i_P: Tensor,
    j_P: Tensor,
    c_P: Tensor,
    counts: Tensor,
    cofire: float,
    cofire_frequent: float = 0.0,
    max_cost: float | None = None,
    min_rows: int = 4,
) -> Merges:
    """The merges: pairs in which the rarer latent fired on at least `min_rows` rows and shared at least
    `cofire` of them with the other, which shared at least `cofire_frequent` of its own rows (a latent
    that mostly fires elsewhere, such as a dense filler of spare top-k slots, is no copy), and (unless
    max_cost is None) whose merge_cost is at most `max_cost` times the rows' squared reconstruction
    error (counts' last entry); taken greedily in the pairs' order (most parallel first), each latent in
    one merge at most. A pair's direction is the activation-weighted mean of its two directions."""
    d_sae, n_pairs = W_dec_FD.shape[0], i_P.shape[0]
    sizes = [d_sae] * 3 + [n_pairs] * 2
    fired_F, act_F, sq_F, both_P, cross_P, rest = counts.split([*sizes, counts.numel() - sum(sizes)])
    i_frequent = fired_F[i_P] >= fired_F[j_P]
    frequent_P, rare_P = torch.where(i_frequent, i_P, j_P), torch.where(i_frequent, j_P, i_P)
    # two latents that only fired at 0 still get a direction (cosine >= merge_cos > 0)
    weight_F = act_F + 1e-12
    ok = (both_P >= min_rows) & (both_P >= cofire * fired_F[rare_P]) & (both_P >= cofire_frequent * fired_F[frequent_P])
    if max_cost is not None:
        err = rest[0]
        cost_P = merge_cost(c_P, weight_F[frequent_P], weight_F[rare_P], sq_F[frequent_P], sq_F[rare_P], cross_P)
        ok &= cost_P <= max_cost * err
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
    return Merges(frequent_M, rare_M, unit(mixed_MD, dim=1))


def _steps_between_passes(cfg: TrainerConfig) -> int:
    return max(1, cfg.merge_every_tokens // cfg.batch_size)


def first_merge_step(cfg: TrainerConfig, total_steps: int) -> int | None:
    """The step the run's first merge pass follows (cfg resolved), or None if none does: the first step
    ending on a multiple of merge_every_tokens once the first dead window is over, if it ends within
    merge_until of the run. Before the window the decoders are still near their initialisation, and
    every latent still counts as live (none has gone a whole window without firing)."""
    if cfg.merge_cos is None:
        return None
    every = _steps_between_passes(cfg)
    window_end = max(1, -(-cfg.dead_after_tokens // cfg.batch_size))  # steps until the first window is over
    end = -(-window_end // every) * every
    return end - 1 if end <= min(total_steps, total_steps * cfg.merge_until) else None


def merge_step(step: int, cfg: TrainerConfig, total_steps: int) -> bool:
    """Whether a merge pass follows step `step` of total_steps (cfg resolved): from first_merge_step on,
    after every merge_every_tokens tokens, until merge_until of the run."""
    first = first_merge_step(cfg, total_steps)
    return (
        first is not None
        and first <= step
        and step + 1 <= total_steps * cfg.merge_until
        and (step + 1) % _steps_between_passes(cfg) == 0
    )


@torch.no_grad()
def merge_(sae: TopKSAE, opt, since_fired_F: Tensor, code: SparseCode, err: Tensor, cfg: TrainerConfig) -> int:
    """One merge pass over a training SAE, deciding from `code`, the top-k code of this rank's rows of a
    training step (the trainer keeps it: train_steps' keep_code), and `err`, that step's squared
    reconstruction error over all ranks' rows; the counts are added over ranks under data parallel, so
    every rank merges the same pairs. Each merge gives both decoder rows of a pair the pair's mean
    direction (pick), in the weights the run exports too (optim.overwrite_rows_); encoders, biases and
    the dead counters (since_fired_F, which picks the live latents) are left alone, so both latents stay
    live and keep firing where they did. Reads back to the host (it runs between steps); returns the
    number of pairs merged."""
    alive_F = since_fired_F < cfg.dead_after_tokens
    i_P, j_P, c_P = near_parallel_pairs(sae.W_dec_FD, alive_F, cfg.merge_cos)
    counts = torch.cat([distributed.sum_(firing_counts(code, i_P, j_P, sae.d_sae)), err.float().reshape(1)])
    m = pick(sae.W_dec_FD, i_P, j_P, c_P, counts, cfg.merge_cofire, cfg.merge_cofire_frequent, cfg.merge_max_cost)
    if m.frequent_M.numel():
        overwrite_rows_(opt, sae.W_dec_FD, torch.cat([m.frequent_M, m.rare_M]), m.direction_MD.repeat(2, 1))
    return int(m.frequent_M.shape[0])


@torch.no_grad()
def step_code(sae: TopKSAE, x_BD: Tensor) -> tuple[SparseCode, Tensor]:
    """What merge_ takes, for a batch outside the trainer (tests, benchmarks): the SAE's top-k code of
    x_BD and its squared reconstruction error (this process's rows only)."""
    code = sae.encode_sparse(x_BD)
    return code, (x_BD - sae.decode_sparse(code)).float().square().sum()
