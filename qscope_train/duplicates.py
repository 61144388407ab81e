"""Duplicate latents: pairs whose decoder directions are nearly parallel and that fire on the same rows.
Mean-squared error pays for such copies with the top-k slots a row does not need, and each copy then
holds a tilted share of one feature; training merges them (trainer.merge_cos)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import distributed
from .config import TrainerConfig
from .optim import overwrite_rows_
from .sae import SparseCode, TopKSAE

CHUNK = 1 << 16  # pairs whose shared rows are counted at once (a rows x CHUNK boolean)


class Merges(NamedTuple):
    keep_M: Tensor  # latents that take over their pair (long)
    drop_M: Tensor  # their partners, to restart dead (long)
    direction_MD: Tensor  # the kept latents' new unit decoder directions


@torch.no_grad()
def near_parallel_pairs(
    W_dec_FD: Tensor, alive_F: Tensor, cos: float, partners: int = 4, chunk: int = 2048
) -> tuple[Tensor, Tensor]:
    """Pairs (i_P, j_P), i < j, of latents in alive_F (d_sae,) bool whose decoder rows (W_dec_FD, d_sae x
    d_model) are at cosine >= cos, at most `partners` per latent i (its most parallel ones, so that the
    pairs stay O(d_sae) however clustered the directions are), ordered by decreasing cosine. The
    d_sae x d_sae cosines are formed `chunk` rows at a time."""
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
    return alive[i_P[order]], alive[j_P[order]]


@torch.no_grad()
def firing_counts(code: SparseCode, i_P: Tensor, j_P: Tensor, d_sae: int) -> Tensor:
    """Per latent: rows fired on and positive activation sum; per pair: rows both fired on. One (d_sae * 2 + P,)
    fp32 vector [fired_F, act_F, both_P], so that data parallel adds it over ranks in one all-reduce."""
    vals_BK, idx_BK = code
    fired_F = code.fire_counts(d_sae).float()
    # a plain top-k can pick negative values where fewer than k are positive: they count as firing (as in
    # the trainer's dead counters) but weigh nothing in the merged direction
    act_F = torch.zeros(d_sae, device=idx_BK.device).index_add_(
        0, idx_BK.reshape(-1), vals_BK.reshape(-1).float().clamp_min(0)
    )
    # rows x latents as a dense boolean, read only at the pairs' columns
    dense_BF = torch.zeros(idx_BK.shape[0], d_sae, dtype=torch.bool, device=idx_BK.device)
    dense_BF.scatter_(1, idx_BK, vals_BK != 0)
    both = [
        (dense_BF[:, i] & dense_BF[:, j]).sum(0).float()
        for i, j in zip(i_P.split(CHUNK), j_P.split(CHUNK), strict=True)
    ]
    return torch.cat([fired_F, act_F, *both])


def pick(W_dec_FD: Tensor, i_P: Tensor, j_P: Tensor, counts: Tensor, cofire: float, min_rows: int = 4) -> Merges:
    """The merges: pairs in which the rarer latent fired on at least `min_rows` rows and shared at least
    `cofire` of them with the other, taken greedily in the pairs' order (most parallel first), each latent
    in one merge at most. The more frequent latent is kept, with the activation-weighted mean of the two
    directions."""
    d_sae = W_dec_FD.shape[0]
    fired_F, act_F, both_P = counts[:d_sae], counts[d_sae : 2 * d_sae], counts[2 * d_sae :]
    rarer_P = torch.minimum(fired_F[i_P], fired_F[j_P])
    ok = (both_P >= min_rows) & (both_P >= cofire * rarer_P)
    keep, drop, used = [], [], set()
    for a, b in zip(i_P[ok].tolist(), j_P[ok].tolist(), strict=True):
        if a in used or b in used:
            continue
        used.update((a, b))
        keep_one, drop_one = (a, b) if fired_F[a] >= fired_F[b] else (b, a)
        keep.append(keep_one)
        drop.append(drop_one)
    device = W_dec_FD.device
    keep_M = torch.tensor(keep, dtype=torch.long, device=device)
    drop_M = torch.tensor(drop, dtype=torch.long, device=device)
    weight_F = act_F + 1e-12  # two latents that only fired at 0 still get a direction (cosine >= merge_cos > 0)
    mixed_MD = weight_F[keep_M, None] * W_dec_FD[keep_M] + weight_F[drop_M, None] * W_dec_FD[drop_M]
    return Merges(keep_M, drop_M, torch.nn.functional.normalize(mixed_MD, dim=1))


def merge_step(step: int, cfg: TrainerConfig) -> bool:
    """Whether a merge pass follows step `step` (cfg resolved): after every merge_every_tokens tokens."""
    if cfg.merge_cos is None:
        return False
    every = max(1, cfg.merge_every_tokens // cfg.batch_size)
    return (step + 1) % every == 0


@torch.no_grad()
def merge_(sae: TopKSAE, opt, since_fired_F: Tensor, x_BD: Tensor, cfg: TrainerConfig, seed: int) -> int:
    """One merge pass over a training SAE, deciding from this rank's rows x_BD (added over ranks under data
    parallel, so every rank merges the same pairs): each merge leaves the kept latent with the pair's
    mean direction (pick) and restarts the other one dead (a random direction from `seed`, its encoder
    row at a tenth of its norm, b_enc 0), for AuxK to retrain. Reads back to the host (it runs between
    steps); returns the number of merges."""
    alive_F = since_fired_F < cfg.dead_after_tokens
    i_P, j_P = near_parallel_pairs(sae.W_dec_FD, alive_F, cfg.merge_cos)
    counts = distributed.sum_(firing_counts(sae.encode_sparse(x_BD), i_P, j_P, sae.d_sae))
    m = pick(sae.W_dec_FD, i_P, j_P, counts, cfg.merge_cofire)
    if m.keep_M.numel() == 0:
        return 0
    g = torch.Generator(device=sae.W_dec_FD.device).manual_seed(seed)
    restart_MD = torch.randn(m.drop_M.shape[0], sae.d_model, generator=g, device=g.device)
    restart_MD = torch.nn.functional.normalize(restart_MD, dim=1)
    encoder_norm_M1 = sae.W_enc[m.drop_M].norm(dim=1, keepdim=True) / 10
    overwrite_rows_(opt, sae.W_dec_FD, m.keep_M, m.direction_MD)
    overwrite_rows_(opt, sae.W_dec_FD, m.drop_M, restart_MD)
    overwrite_rows_(opt, sae.W_enc, m.drop_M, restart_MD * encoder_norm_M1)
    overwrite_rows_(opt, sae.b_enc, m.drop_M, torch.zeros_like(m.drop_M, dtype=sae.b_enc.dtype))
    since_fired_F[m.drop_M] = cfg.dead_after_tokens
    return int(m.keep_M.shape[0])
