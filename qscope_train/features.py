"""What each feature of an SAE does, streamed over held-out tokens in memory bounded by d_sae × N: its
top-N activations, examples from lower activation ranges, an activation histogram and firing count
(two passes over the same codes), and from the weights alone a logit lens and decoder neighbours."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

HIST_BINS = 32  # log2-spaced activation bins from 2**HIST_LO up
HIST_LO = -8.0
HIST_HI = 8.0


def _sorted_keep(key: Tensor, val: Tensor, tok: Tensor, slots: int, n: int) -> tuple[Tensor, Tensor]:
    """For every key in 0..slots-1, the n entries of largest val (ties: smaller tok first). Every key
    must have at least n entries (callers pad with -inf placeholders). Returns (slots, n) val and tok."""
    order = torch.argsort(tok, stable=True)
    order = order[torch.argsort(val[order], descending=True, stable=True)]
    order = order[torch.argsort(key[order], stable=True)]
    key, val, tok = key[order], val[order], tok[order]
    starts = torch.searchsorted(key, torch.arange(slots, device=key.device))
    rank = torch.arange(key.numel(), device=key.device) - starts[key]
    sel = rank < n
    return val[sel].view(slots, n), tok[sel].view(slots, n)


class TopN:
    """The n largest (activation, token index) of every feature over a stream of sparse codes."""

    def __init__(self, d_sae: int, n: int) -> None:
        self.d_sae, self.n = d_sae, n
        self.val = torch.full((d_sae, n), -math.inf)
        self.tok = torch.full((d_sae, n), -1, dtype=torch.long)

    def add(self, idx_BK: Tensor, val_BK: Tensor, tok_B: Tensor) -> None:
        live = val_BK > 0
        f = idx_BK[live]
        v = val_BK[live].float()
        t = tok_B[:, None].expand_as(idx_BK)[live]
        key = torch.cat([torch.arange(self.d_sae).repeat_interleave(self.n), f])
        self.val, self.tok = _sorted_keep(
            key, torch.cat([self.val.flatten(), v]), torch.cat([self.tok.flatten(), t]), self.d_sae, self.n
        )


def hist_bin(v: Tensor) -> Tensor:
    """The histogram bin of positive activations (log2-spaced; values beyond the ends go to the end bins)."""
    width = (HIST_HI - HIST_LO) / HIST_BINS
    return ((v.clamp_min(2.0**HIST_LO).log2() - HIST_LO) / width).long().clamp_(0, HIST_BINS - 1)


def hist_edges() -> list[float]:
    return [2.0 ** (HIST_LO + i * (HIST_HI - HIST_LO) / HIST_BINS) for i in range(HIST_BINS + 1)]


@dataclass
class FirstPass:
    """Pass 1 over the held-out codes: top-N, histogram, firing count, tokens seen."""

    top: TopN
    hist: Tensor  # (d_sae, HIST_BINS) long
    fires: Tensor  # (d_sae,) long
    tokens: int = 0  # rows seen (held-out tokens the filters kept)
    sequences: int = 0  # held-out sequences they came from

    @classmethod
    def new(cls, d_sae: int, n: int) -> FirstPass:
        return cls(
            TopN(d_sae, n), torch.zeros(d_sae, HIST_BINS, dtype=torch.long), torch.zeros(d_sae, dtype=torch.long)
        )

    def add(self, idx_BK: Tensor, val_BK: Tensor, tok_B: Tensor) -> None:
        self.top.add(idx_BK, val_BK, tok_B)
        live = val_BK > 0
        f = idx_BK[live]
        self.fires += torch.bincount(f, minlength=self.fires.numel())
        flat = f * HIST_BINS + hist_bin(val_BK[live].float())
        self.hist += torch.bincount(flat, minlength=self.hist.numel()).view_as(self.hist)
        self.tokens += idx_BK.shape[0]


class Ranges:
    """Pass 2: for every feature, the first m tokens (in stream order) whose activation falls in each of
    `bands` equal ranges below its maximum, (0, max/bands], ..., ((bands-1)·max/bands, max); the top
    band is left out (the top-N covers it). Slots fill once and are never replaced."""

    def __init__(self, max_val: Tensor, bands: int, m: int) -> None:
        self.max_val, self.bands, self.m = max_val.clamp_min(1e-12), bands, m
        self.tok = torch.full((max_val.numel(), bands - 1, m), -1, dtype=torch.long)
        self.val = torch.zeros(max_val.numel(), bands - 1, m)
        self.filled = torch.zeros(max_val.numel(), bands - 1, dtype=torch.long)
        self.seen = torch.zeros(max_val.numel(), bands, dtype=torch.long)  # activations per range, all kept or not

    def add(self, idx_BK: Tensor, val_BK: Tensor, tok_B: Tensor) -> None:
        live = val_BK > 0
        f, v = idx_BK[live], val_BK[live].float()
        t = tok_B[:, None].expand_as(idx_BK)[live]
        band = (v / self.max_val[f] * self.bands).long().clamp_(0, self.bands - 1)
        self.seen += torch.bincount(f * self.bands + band, minlength=self.seen.numel()).view_as(self.seen)
        low = band < self.bands - 1
        f, v, t, band = f[low], v[low], t[low], band[low]
        slot = f * (self.bands - 1) + band
        order = torch.argsort(t, stable=True)
        order = order[torch.argsort(slot[order], stable=True)]
        slot, v, t = slot[order], v[order], t[order]
        starts = torch.searchsorted(slot, slot)  # first entry of each entry's slot
        rank = torch.arange(slot.numel()) - starts + self.filled.view(-1)[slot]
        take = rank < self.m
        slot, v, t, rank = slot[take], v[take], t[take], rank[take]
        self.tok.view(-1, self.m)[slot, rank] = t
        self.val.view(-1, self.m)[slot, rank] = v
        self.filled.view(-1).index_add_(0, slot, torch.ones_like(slot))


def window_activations(feat: Tensor, tok: Tensor, idx_BK: Tensor, val_BK: Tensor, row_of: Tensor, width: int) -> Tensor:
    """Activation of feature feat[e] at tokens tok[e] - width .. tok[e] + width (E, 2·width + 1), from one
    chunk's codes; row_of maps a token index within the chunk to its code row (-1 where the token was
    filtered out and has no code, or lies outside the chunk)."""
    offsets = torch.arange(-width, width + 1)
    at = tok[:, None] + offsets  # (E, W)
    inside = (at >= 0) & (at < row_of.numel())
    rows = torch.where(inside, row_of[at.clamp(0, row_of.numel() - 1)], torch.full_like(at, -1))
    has = rows >= 0
    r = rows.clamp_min(0)
    match = idx_BK[r] == feat[:, None, None]  # (E, W, K)
    acts = (val_BK[r].float() * match).sum(-1)
    return torch.where(has, acts, torch.zeros_like(acts))


def logit_lens(
    W_dec: Tensor, norm: Callable[[Tensor], Tensor] | None, W_U: Tensor, k: int, chunk: int = 512
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each decoder direction through the model's final norm (applied to rows (C, d_model), as the model
    applies it to a residual) and the unembedding: the k highest and k lowest token ids and their
    logits, chunked over features so that no (d_sae × vocab) matrix is ever whole."""
    d_sae = W_dec.shape[1]
    top_i, top_v, bot_i, bot_v = [], [], [], []
    for s in range(0, d_sae, chunk):
        d_CD = W_dec[:, s : s + chunk].T.float()
        if norm is not None:
            d_CD = norm(d_CD).float()
        logits = d_CD @ W_U.float().T  # (C, vocab)
        hi, lo = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        top_v.append(hi.values)
        top_i.append(hi.indices)
        bot_v.append(lo.values)
        bot_i.append(lo.indices)
    return torch.cat(top_i), torch.cat(top_v), torch.cat(bot_i), torch.cat(bot_v)


def neighbours(W_dec: Tensor, k: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The k other features whose decoder directions have the highest cosine with each one's."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=0)
    idx, cos = [], []
    for s in range(0, unit.shape[1], chunk):
        sim = unit[:, s : s + chunk].T @ unit  # (C, d_sae)
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -math.inf  # not itself
        best = sim.topk(min(k, unit.shape[1] - 1), dim=1)
        idx.append(best.indices)
        cos.append(best.values)
    return torch.cat(idx), torch.cat(cos)


def specificity(top_ids: Tensor, center: int) -> Tensor:
    """Per feature, the share of its top-N slots whose example's own token is the most common one among
    them (1.0: all N top examples peak on the same token, such as one digit or one word; a feature
    with fewer than N examples cannot reach 1)."""
    own = top_ids[:, :, center].long()  # (d_sae, n)
    valid = own >= 0
    out = torch.zeros(own.shape[0])
    for f in valid.any(1).nonzero().flatten().tolist():
        toks = own[f][valid[f]]
        out[f] = torch.bincount(toks).max().float() / own.shape[1]
    return out


def drift(trained_W_dec: Tensor, source_W_dec: Optional[Tensor]) -> Optional[Tensor]:
    """1 - cosine between each feature's trained and source decoder directions (None without a source)."""
    if source_W_dec is None:
        return None
    a = torch.nn.functional.normalize(trained_W_dec.detach().cpu().float(), dim=0)
    s = torch.nn.functional.normalize(source_W_dec.detach().cpu().float(), dim=0)
    return 1 - (a * s).sum(0)
