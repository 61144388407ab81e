"""compare: which features fire more on one set of texts than on another, how much of each set's footprint
the other covers, and a feature classifier that tells the sets apart.

Counts are per text (a feature fires in a text if it fires on any of its tokens): tokens of one text are not
independent draws, so token counts would overstate significance. Position 0 (the attention sink, whose
norm is orders of magnitude above the rest) is left out."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from .model import Analyzer

FEATURE_CHUNK = 4096  # features whose hypergeometric tables are formed at once


@torch.no_grad()
def firing(
    an: Analyzer, texts: Sequence[str], layers: Sequence[int], max_tokens: Optional[int] = None
) -> dict[int, tuple[Tensor, Tensor, int]]:
    """Per layer: (fired_NF bool, texts x d_sae: fired anywhere in the text; token counts_F: tokens fired on;
    tokens in all), each text cut to its first max_tokens tokens, position 0 left out."""
    fired = {n: [] for n in layers}
    counts = {n: torch.zeros(an.saes[n].d_sae, dtype=torch.long) for n in layers}
    tokens = 0
    for text in texts:
        enc = an.encode(text, max_tokens)
        tokens += enc.ids_T.numel() - 1
        for n in layers:
            vals_TK, idx_TK = (t[1:].cpu() for t in enc.codes[n])
            on = torch.zeros(an.saes[n].d_sae, dtype=torch.long).index_add_(
                0, idx_TK.reshape(-1), (vals_TK > 0).reshape(-1).long()
            )
            counts[n] += on
            fired[n].append(on > 0)
    return {n: (torch.stack(fired[n]), counts[n], tokens) for n in layers}


def _log_comb(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def fisher_exact(x_F: Tensor, n_a: int, y_F: Tensor, n_b: int) -> Tensor:
    """Two-sided Fisher exact test per feature on the 2 x 2 table (x of n_a texts fire in A, y of n_b in B):
    the probability, under the hypergeometric law with the margins fixed, of the tables at most as likely
    as the one observed (float64 throughout)."""
    N = torch.tensor(float(n_a + n_b), dtype=torch.float64)
    i = torch.arange(n_a + 1, dtype=torch.float64)[None, :]
    log_total = _log_comb(N, torch.tensor(float(n_a), dtype=torch.float64))
    out = [torch.zeros(0, dtype=torch.float64)]
    for start in range(0, x_F.numel(), FEATURE_CHUNK):
        x = x_F[start : start + FEATURE_CHUNK].double()[:, None]
        K = x + y_F[start : start + FEATURE_CHUNK].double()[:, None]
        support = (i <= K) & (n_a - i <= N - K)
        log_p = _log_comb(K, torch.minimum(i, K)) + _log_comb(N - K, torch.minimum((n_a - i).clamp_min(0), N - K))
        log_p = log_p - log_total
        observed = _log_comb(K, x) + _log_comb(N - K, n_a - x) - log_total
        as_rare = support & (log_p <= observed + 1e-7)
        out.append(torch.where(as_rare, log_p.exp(), 0.0).sum(1).clamp_max(1.0))
    return torch.cat(out)


def benjamini_hochberg(p_F: Tensor, tested_F: Tensor) -> Tensor:
    """q-values over the tested features (others get 1): the least false-discovery rate at which each would
    be called significant."""
    q_F = torch.ones_like(p_F)
    p = p_F[tested_F]
    m = p.numel()
    if m == 0:
        return q_F
    order = p.argsort()
    q = p[order] * m / torch.arange(1, m + 1, dtype=p.dtype)
    q = q.flip(0).cummin(0).values.flip(0).clamp_max(1.0)
    q_sorted = torch.empty_like(q).scatter_(0, order, q)
    q_F[tested_F] = q_sorted
    return q_F


def _differences(fired_a: Tensor, fired_b: Tensor, alpha: float, top: int) -> dict:
    n_a, n_b = fired_a.shape[0], fired_b.shape[0]
    x_F, y_F = fired_a.sum(0), fired_b.sum(0)
    p_F = fisher_exact(x_F, n_a, y_F, n_b)
    q_F = benjamini_hochberg(p_F, (x_F + y_F) > 0)
    diff_F = x_F / n_a - y_F / n_b

    def rows(order):
        return [
            {
                "feature": int(f),
                "rate_a": float(x_F[f] / n_a),
                "rate_b": float(y_F[f] / n_b),
                "diff": float(diff_F[f]),
                "p": float(p_F[f]),
                "q": float(q_F[f]),
                "significant": bool(q_F[f] < alpha),
            }
            for f in order.tolist()
        ]

    significant = q_F < alpha
    key_F = torch.where(significant, diff_F, torch.zeros_like(diff_F))
    more_a = key_F.argsort(descending=True, stable=True)[: min(top, int((key_F > 0).sum()))]
    more_b = key_F.argsort(stable=True)[: min(top, int((key_F < 0).sum()))]
    return {
        "more_in_a": rows(more_a),
        "more_in_b": rows(more_b),
        "significant": int(significant.sum()),
        "tested": int(((x_F + y_F) > 0).sum()),
        "p_F": p_F,
        "q_F": q_F,
        "diff_F": diff_F,
    }


def footprint(fired_a: Tensor, fired_b: Tensor) -> dict:
    """The share of features each set fires at all, and the share of one's footprint the other also fires."""
    a, b = fired_a.any(0), fired_b.any(0)
    both = int((a & b).sum())
    return {
        "share_a": float(a.float().mean()),
        "share_b": float(b.float().mean()),
        "b_covers_of_a": both / max(1, int(a.sum())),
        "a_covers_of_b": both / max(1, int(b.sum())),
    }


CANDIDATES = 256  # features the classifier's greedy selection looks at (the largest differences)


def _select(pos_NF: Tensor, neg_MF: Tensor, candidates: list[int], n_features: int) -> list[int]:
    """Greedy forward selection of the OR rule: add the candidate that raises the training F1 most, while
    it rises, up to n_features features."""
    chosen: list[int] = []
    flag_pos = torch.zeros(pos_NF.shape[0], dtype=torch.bool)
    flag_neg = torch.zeros(neg_MF.shape[0], dtype=torch.bool)
    best = 0.0
    cands = torch.tensor(candidates, dtype=torch.long)
    while cands.numel() and len(chosen) < n_features:
        tp = (flag_pos[:, None] | pos_NF[:, cands]).sum(0).double()
        fp = (flag_neg[:, None] | neg_MF[:, cands]).sum(0).double()
        f1 = 2 * tp / (2 * tp + fp + (pos_NF.shape[0] - tp)).clamp_min(1)
        i = int(f1.argmax())
        if float(f1[i]) <= best:
            break
        best, f = float(f1[i]), int(cands[i])
        chosen.append(f)
        flag_pos |= pos_NF[:, f]
        flag_neg |= neg_MF[:, f]
        cands = torch.cat([cands[:i], cands[i + 1 :]])
    return chosen


def classifier(
    fired_a: Tensor, fired_b: Tensor, train_a: Tensor, train_b: Tensor, alpha: float, n_features: int
) -> dict:
    """A text classifier for A: among the features significantly more frequent in A on the training texts
    (alpha, the CANDIDATES largest differences), a greedy selection of up to n_features whose OR (a text is
    flagged when any of them fires) has the best training F1; scored on the held-out texts (precision,
    recall and F1, A the positive class)."""
    d = _differences(fired_a[train_a], fired_b[train_b], alpha, CANDIDATES)
    chosen = _select(fired_a[train_a], fired_b[train_b], [r["feature"] for r in d["more_in_a"]], n_features)
    test_a, test_b = fired_a[~train_a], fired_b[~train_b]
    flag_a = test_a[:, chosen].any(1) if chosen else torch.zeros(test_a.shape[0], dtype=torch.bool)
    flag_b = test_b[:, chosen].any(1) if chosen else torch.zeros(test_b.shape[0], dtype=torch.bool)
    tp, fn, fp = int(flag_a.sum()), int((~flag_a).sum()), int(flag_b.sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "features": chosen,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "held_out_positive": int(test_a.shape[0]),
        "held_out_negative": int(test_b.shape[0]),
    }


def _split(n: int, share: float, g: random.Random) -> Tensor:
    order = list(range(n))
    g.shuffle(order)
    train = torch.zeros(n, dtype=torch.bool)
    train[order[: int(round(n * share))]] = True
    return train


def summarize(
    fa: dict,
    fb: dict,
    alpha: float = 0.05,
    top: int = 20,
    train_share: float = 0.5,
    classifier_features: int = 8,
    seed: int = 0,
) -> tuple[dict, dict[int, dict[str, Tensor]]]:
    """compare's result from two sides' `firing`, and per layer the per-feature arrays (rate_a, rate_b, q)."""
    layers = list(fa)
    n_a, n_b = fa[layers[0]][0].shape[0], fb[layers[0]][0].shape[0]
    g = random.Random(seed)
    train_a, train_b = _split(n_a, train_share, g), _split(n_b, train_share, g)
    tokens = [fa[layers[0]][2], fb[layers[0]][2]]
    result = {"texts": [n_a, n_b], "tokens": tokens, "alpha": alpha, "layers": {}}
    arrays = {}
    for n in layers:
        (fired_a, tok_a, n_tok_a), (fired_b, tok_b, n_tok_b) = fa[n], fb[n]
        d = _differences(fired_a, fired_b, alpha, top)
        for side in ("more_in_a", "more_in_b"):
            for r in d[side]:
                r["token_rate_a"] = float(tok_a[r["feature"]] / max(1, n_tok_a))
                r["token_rate_b"] = float(tok_b[r["feature"]] / max(1, n_tok_b))
        result["layers"][n] = {
            "more_in_a": d["more_in_a"],
            "more_in_b": d["more_in_b"],
            "significant": d["significant"],
            "tested": d["tested"],
            "footprint": footprint(fired_a, fired_b),
            "classifier": {  # one per side: the features more frequent there, flagging that side's texts
                "a": classifier(fired_a, fired_b, train_a, train_b, alpha, classifier_features),
                "b": classifier(fired_b, fired_a, train_b, train_a, alpha, classifier_features),
            },
        }
        arrays[n] = {"rate_a": fired_a.float().mean(0), "rate_b": fired_b.float().mean(0), "q": d["q_F"]}
    return result, arrays


def compare(
    an: Analyzer,
    a: Sequence[str],
    b: Sequence[str],
    layers: Optional[Sequence[int]] = None,
    alpha: float = 0.05,
    top: int = 20,
    train_share: float = 0.5,
    classifier_features: int = 8,
    seed: int = 0,
    max_tokens: Optional[int] = None,
) -> dict:
    """Per layer: the features that fire in more texts of A than of B and the reverse (Fisher's exact test
    per feature, Benjamini-Hochberg q < alpha over the features that fired; `top` of each, by the
    difference of the shares of texts), the footprints, and per side a feature classifier that flags that
    side's texts, trained on train_share of each set and scored on the rest. Each text is cut to max_tokens tokens (a longer text fires more
    features: give both sides the same cut). JSON-ready."""
    if len(a) < 2 or len(b) < 2:
        raise InputError(f"compare needs at least two texts on each side, got {len(a)} and {len(b)}")
    if not 0 < alpha < 1 or not 0 < train_share < 1:
        raise InputError(f"alpha and train_share must be in (0, 1), got {alpha} and {train_share}")
    layers = an.pick_layers(layers)
    fa, fb = firing(an, a, layers, max_tokens), firing(an, b, layers, max_tokens)
    return summarize(fa, fb, alpha, top, train_share, classifier_features, seed)[0]
