"""Ground-truth quality benchmark: qscope-train beside EleutherAI sparsify on activations made from a known
dictionary, both on their default recipes, the same batches in the same order, scored on the same rows.

The data are hard the way residual streams are: more true directions than d_model, Zipf-like feature
frequencies, per-feature scales and per-token magnitudes, a shared offset, Gaussian noise, and
hierarchies (a child feature only ever fires together with its parent). Every batch is generated from
(seed, batch index), so both trainers see identical rows without storing them.

Scores, at each token budget: recovered (the fraction of true directions with a decoder column at
cosine >= 0.9; also for parents and children apart), mean best cosine, columns near (decoder columns
at cosine >= 0.7 per true direction: above 1, features split between co-firing latents), held-out FVU
(about the held-out mean), dead (latents that never fire on the held-out rows), twins (live latents with
another live latent at decoder cosine >= 0.95), and the training wall time until 90 % of
the directions were recovered (checked every --eval-every tokens; data generation and scoring excluded).

qscope-train runs one fit per budget (its schedule depends on the run length); sparsify is
schedule-free, so one run to the largest budget is scored at each budget on the way. sparsify runs in
its own environment (../shared/anchors/setup.sh) through this same file, so nothing of qscope_train is
imported at the top.

Usage: python scripts/bench_quality.py [--shapes small,wide] [--budgets 1M,2M,8M] [--seed 0]
           [--ours trainer.lr=4e-3 ...] [--skip-sparsify] [--sparsify-python PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
ROOT = Path(__file__).resolve().parents[1]  # for qscope_train.scorecard (torch only) in sparsify's environment too


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_features: int  # true directions
    d_sae: int
    k: int
    mean_active: float  # true features active per token, on average
    batch: int = 4096
    hierarchy: bool = True  # 1/16 of the features are parents with 3 children each
    zipf_power: float = 1.0  # 0: every independent feature equally frequent
    # the hard shape's extras: each token's feature frequencies times a log-normal factor of mean 1 and log
    # standard deviation `density_spread`, so that the count of active features varies far more than a fixed rate's;
    # children at a fraction (0.2-0.6) of their parent's magnitude; noise stronger along a few directions
    density_spread: float = 0.0
    child_of_parent_magnitude: bool = False
    anisotropic_noise: bool = False


SHAPES = {
    "small": Shape(d_model=64, n_features=512, d_sae=1024, k=16, mean_active=10),
    "wide": Shape(d_model=512, n_features=4096, d_sae=8192, k=32, mean_active=20),
    # the easy case, where every trainer gets close to all directions: no hierarchy, equal frequencies
    "easy": Shape(d_model=64, n_features=256, d_sae=1024, k=16, mean_active=5, hierarchy=False, zipf_power=0.0),
    # k four times the mean number of active features, which itself varies widely from token to token
    "hard": Shape(
        d_model=128,
        n_features=1024,
        d_sae=2048,
        k=32,
        mean_active=8,
        density_spread=1.0,
        child_of_parent_magnitude=True,
        anisotropic_noise=True,
    ),
}
# the tiny Qwen3's layer-2 residual stream: one pass over its cached training rows (no ground truth)
TINY = Shape(d_model=64, n_features=0, d_sae=1024, k=16, mean_active=0, batch=1024)
TINY_LAYER = 2


class Dictionary:
    """The true features: unit directions, frequencies, scales, hierarchy, offset and noise level."""

    ZIPF_SHIFT, MAX_FREQ = 10.0, 0.3
    CHILDREN, CHILD_PROB = 3, 0.6  # each parent has 3 children; when it fires, one of them does with p 0.6

    def __init__(self, shape: Shape, seed: int) -> None:
        # a seed stream apart from the SAEs' own initialisation (which draws randn from `seed` itself)
        g = torch.Generator().manual_seed((seed + 1) * 0x9E3779B97F4A7C15 % 2**63)
        F, D = shape.n_features, shape.d_model
        self.shape, self.seed = shape, seed
        self.directions = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=-1)
        # hierarchy: the first n_parents features (the most frequent) each own CHILDREN children
        self.n_parents = F // 16 if shape.hierarchy else 0
        n_children = self.n_parents * self.CHILDREN
        self.parent_of = torch.full((F,), -1, dtype=torch.long)
        self.parent_of[self.n_parents : self.n_parents + n_children] = torch.arange(self.n_parents).repeat_interleave(
            self.CHILDREN
        )
        independent = torch.ones(F, dtype=torch.bool)
        independent[self.n_parents : self.n_parents + n_children] = False
        # Zipf-like frequencies over the independently firing features, in a random order of rank
        ranks = torch.randperm(int(independent.sum()), generator=g).float()
        p = 1.0 / (ranks + self.ZIPF_SHIFT) ** shape.zipf_power
        expected_children = self.CHILD_PROB  # per firing parent
        parents_p = p[: self.n_parents]
        target = shape.mean_active
        # scale so that the expected number of active features (children included) is mean_active
        scale = target / (p.sum() + expected_children * parents_p.sum())
        self.freq = torch.zeros(F)
        self.freq[independent] = (p * scale).clamp(max=self.MAX_FREQ)
        self.scales = torch.exp(0.4 * torch.randn(F, generator=g))
        self.offset = torch.randn(D, generator=g) * (2.0 / math.sqrt(D))
        self.noise = 0.02
        # anisotropic noise: per-axis scales from 4x down to 1/4 of `noise` in a random orthonormal basis
        if shape.anisotropic_noise:
            basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
            self.noise_DD = basis * torch.logspace(math.log10(4), math.log10(0.25), D)[:, None]

    def batch(self, index: int, rows: int | None = None) -> torch.Tensor:
        """Rows of batch `index` (negative indices are held-out batches), (rows, d_model) fp32."""
        rows = rows or self.shape.batch
        g = torch.Generator().manual_seed(((self.seed + 7) * 1_000_003 + index + (1 << 40)) % 2**63)
        F = self.shape.n_features
        freq = self.freq.expand(rows, F)
        if self.shape.density_spread > 0:
            sigma = self.shape.density_spread  # a log-normal factor of mean 1 per token
            density = torch.exp(sigma * torch.randn(rows, 1, generator=g) - sigma**2 / 2)
            freq = (freq * density).clamp(max=1.0)
        active = torch.rand(rows, F, generator=g) < freq
        # children: each active parent picks one of its children with probability CHILD_PROB
        parents = active[:, : self.n_parents]
        pick = torch.randint(0, self.CHILDREN, (rows, self.n_parents), generator=g)
        fire = parents & (torch.rand(rows, self.n_parents, generator=g) < self.CHILD_PROB)
        child_idx = self.n_parents + torch.arange(self.n_parents) * self.CHILDREN + pick
        active.scatter_(1, child_idx, fire)
        # sparse assembly: magnitudes only for the active (row, feature) pairs, summed per row
        row, feat = active.nonzero(as_tuple=True)  # row-major, so each row's pairs are contiguous
        magnitude = self.scales[feat] * (0.25 + torch.empty(feat.shape[0]).exponential_(generator=g))
        if self.shape.child_of_parent_magnitude and self.n_parents:
            # a child's magnitude is a fraction of its parent's on the same row (the parent is active there)
            lookup = torch.full((rows, F), -1, dtype=torch.long)
            lookup[row, feat] = torch.arange(feat.shape[0])
            child = self.parent_of[feat] >= 0
            parent_at = lookup[row[child], self.parent_of[feat[child]]]
            fraction = 0.2 + 0.4 * torch.rand(int(child.sum()), generator=g)
            magnitude[child] = magnitude[parent_at] * fraction
        offsets = torch.zeros(rows, dtype=torch.long)
        offsets[1:] = torch.bincount(row, minlength=rows).cumsum(0)[:-1]
        x = torch.nn.functional.embedding_bag(feat, self.directions, offsets, mode="sum", per_sample_weights=magnitude)
        x = x + self.offset
        noise = torch.randn(rows, self.shape.d_model, generator=g)
        return x + self.noise * (noise @ self.noise_DD if self.shape.anisotropic_noise else noise)

    def info(self) -> dict:
        return {
            "mean_active": round(float(self.freq.sum() + self.CHILD_PROB * self.freq[: self.n_parents].sum()), 3),
            "max_freq": round(float(self.freq.max()), 4),
            "min_freq": float(self.freq[self.freq > 0].min()),
            "parents": self.n_parents,
            "children": self.n_parents * self.CHILDREN,
        }

    def heldout(self, rows: int = 32768) -> torch.Tensor:
        return torch.cat([self.batch(-1 - i) for i in range(max(1, rows // self.shape.batch))])


class CachedRows:
    """Real activations with no ground truth (the tiny Qwen3's layer 2): training rows in a fixed
    shuffled order, batch i being rows [i * batch, (i + 1) * batch), and the held-out split's rows."""

    directions = None

    def __init__(self, shape: Shape, path: Path) -> None:
        self.shape, self.path = shape, path
        self.train, self.held = torch.load(path, weights_only=True)

    def batch(self, index: int) -> torch.Tensor:
        return self.train[index * self.shape.batch : (index + 1) * self.shape.batch]

    def heldout(self) -> torch.Tensor:
        return self.held

    def info(self) -> dict:
        return {"train_rows": self.train.shape[0], "held_out_rows": self.held.shape[0]}


# the scores that need the true directions (None for the tiny Qwen3's rows)
DIRECTION_SCORES = ("recovered", "recovered_parents", "recovered_children", "mean_best_cos", "columns_near")


def score(d, decoder_DF: torch.Tensor, reconstruct, fired, x: torch.Tensor) -> dict:
    """Recovery against the true directions (None without them), held-out FVU, dead fraction, twins (live
    latents, those firing on the held-out rows, with another live one at decoder cosine >= 0.95) and the
    mean over latents of the largest decoder cosine to another latent (SAEBench's)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from qscope_train.scorecard import max_cosines, twins

    err = var = 0.0
    mean = x.mean(0)
    ever = torch.zeros(decoder_DF.shape[1], dtype=torch.bool)
    for xb in x.split(4096):
        err += (xb - reconstruct(xb)).pow(2).sum().item()
        var += (xb - mean).pow(2).sum().item()
        ever |= fired(xb)
    tw = twins(decoder_DF.T, ever)
    out = {
        "heldout_fvu": round(err / var, 4),
        "dead_frac": round(1 - float(ever.float().mean()), 4),
        "twin_frac": round(tw["twin_frac"], 4),
        "twin_frac_99": round(tw["twin_frac_99"], 4),
        "avg_max_decoder_cos": round(float(max_cosines(decoder_DF.T)[0].mean()), 4),
    }
    if d.directions is None:
        return out | dict.fromkeys(DIRECTION_SCORES)
    cols = torch.nn.functional.normalize(decoder_DF.float(), dim=0)
    best, near = [], []
    for chunk in d.directions.split(1024):
        cos = chunk @ cols
        best.append(cos.max(dim=1).values)
        near.append((cos >= 0.7).sum(dim=1))
    best, near = torch.cat(best), torch.cat(near)
    is_child = d.parent_of >= 0
    is_parent = torch.zeros_like(is_child)
    is_parent[: d.n_parents] = True
    return out | {
        "recovered": round(float((best >= 0.9).float().mean()), 4),
        "recovered_parents": round(float((best[is_parent] >= 0.9).float().mean()), 4) if d.n_parents else None,
        "recovered_children": round(float((best[is_child] >= 0.9).float().mean()), 4) if d.n_parents else None,
        "mean_best_cos": round(float(best.mean()), 4),
        # decoder columns at cosine >= 0.7 per true direction: above 1, features held by several latents
        "columns_near": round(float(near.float().mean()), 3),
    }


class Clock:
    """Training wall time with the excluded spans (data generation, scoring) taken out."""

    def __init__(self) -> None:
        self.start, self.excluded = time.perf_counter(), 0.0

    def exclude(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.excluded += time.perf_counter() - t

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded


def run_ours(d, seed: int, tokens: int, eval_every: int, overrides: list[str]) -> tuple[dict, object]:
    """Our fit on `d`'s batches; returns the result row and the trained SAE."""
    from omegaconf import OmegaConf

    from qscope_train.config import SAEConfig, TrainerConfig
    from qscope_train.data.batches import Unseekable
    from qscope_train.sae import TopKSAE
    from qscope_train.tracking import NullBar
    from qscope_train.trainer import fit

    def build(schema, group: str, fixed: dict):
        """The dataclass defaults, this shape's fixed values, then the user's `group.key=value` overrides."""
        mine = [o.removeprefix(f"{group}.") for o in overrides if o.startswith(f"{group}.")]
        merged = OmegaConf.merge(OmegaConf.structured(schema), fixed, OmegaConf.from_dotlist(mine))
        return OmegaConf.to_object(merged)

    unknown = [o for o in overrides if not o.startswith(("trainer.", "sae."))]
    if unknown:
        raise SystemExit(f"--ours takes trainer.* and sae.* overrides, not {unknown}")
    shape, steps = d.shape, tokens // d.shape.batch
    every = max(1, eval_every // shape.batch)
    t = build(
        TrainerConfig, "trainer", {"batch_size": shape.batch, "log_every": every, "checkpoint_every": 0, "seed": seed}
    )
    sae_cfg = build(SAEConfig, "sae", {"d_sae": shape.d_sae, "k": shape.k})
    x_held = d.heldout()
    sae = TopKSAE(shape.d_model, sae_cfg.d_sae, sae_cfg.k, sae_cfg.activation)
    sae.init_weights_(generator=torch.Generator().manual_seed(seed))
    # the first torch Optimizer of a process imports torch._dynamo (~1.8 s here); sparsify's optimizer is
    # built before its clock starts, so that one-time import is kept off both clocks
    importlib.import_module("torch._dynamo")

    clock, curve = Clock(), []

    def batches():
        for i in range(steps):
            yield {0: clock.exclude(d.batch, i)}

    def probe(step: int, saes: dict) -> None:
        exported = saes[0]  # the weights the run would export now (schedule-free's average, uncentred)

        def measure():
            with torch.no_grad():
                return score(
                    d,
                    exported.W_dec,
                    lambda xb: exported(xb).x_hat_BD,
                    lambda xb: exported.encode_sparse(xb).fire_counts(exported.d_sae) > 0,
                    x_held,
                )

        s = clock.exclude(measure)
        curve.append({"tokens": (step + 1) * shape.batch, "seconds": round(clock.elapsed(), 2), **s})

    from qscope_train import duplicates

    merge_, pass_seconds = duplicates.merge_, []

    def timed_merge_(*args, **kwargs):  # the merge passes' wall time, inside the training clock
        start = time.perf_counter()
        try:
            return merge_(*args, **kwargs)
        finally:
            pass_seconds.append(time.perf_counter() - start)

    duplicates.merge_ = timed_merge_
    first_fvu = []  # the first logged training FVU (step 0's)

    def log(step: int, metrics: dict) -> None:
        if not first_fvu:
            first_fvu.append(metrics[0]["fvu"])

    try:
        summary = fit({0: sae}, Unseekable(batches()), t, steps, "cpu", log, NullBar, probe=probe)
    finally:
        duplicates.merge_ = merge_
    merged = summary[0]["duplicates_merged"]
    passes = {"merge_passes": len(pass_seconds), "merge_seconds": round(sum(pass_seconds), 2)}
    row = {"trainer": "qscope-train", "overrides": overrides, "curve": curve, "merged": merged, **passes}
    row["first_train_fvu"] = round(first_fvu[0], 4)
    return row | _summary(curve), sae


def run_sparsify(d, seed: int, budgets: list[int], eval_every: int, export: Path | None = None) -> list[dict]:
    """Inside sparsify's environment: its SparseCoder and default optimizer (signum, schedule-free), its
    trainer's step: b_dec = first batch mean, unit-norm decoder, FVU, parallel-gradient removal."""
    sys.path.insert(0, str(ANCHORS))
    from bench_sparsify import build_optimizer  # the anchors' copy of sparsify's Trainer set-up
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    shape, steps = d.shape, max(budgets) // d.shape.batch
    x_held = d.heldout()
    sae = SparseCoder(shape.d_model, SparseCoderConfig(num_latents=shape.d_sae, k=shape.k), device="cpu")
    opts, _, _ = build_optimizer(sae, "signum", None, steps)
    clock, curve = Clock(), []
    every = max(1, eval_every // shape.batch)
    for step in range(steps):
        x = clock.exclude(d.batch, step)
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(x=x, y=x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        done = (step + 1) * shape.batch
        if step % every == 0 or done in budgets:

            def measure():
                # schedule-free evaluates its averaged weights; eval() and train() move the parameters there and
                # back by two lerps, which round, so the training weights are restored exactly afterwards: a
                # probe must not change the run (with the round trip and 256K probes, hard 2M seed 2 recovered
                # 61.6 % against 63.6 % with none; docs/BENCHMARKS.md, session 18)
                kept = [p.detach().clone() for p in sae.parameters()]
                for opt in opts:
                    opt.eval()
                with torch.no_grad():
                    dec = sae.W_dec.detach().clone()
                    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

                    def fired(xb):
                        enc = sae.encode(xb)
                        hit = enc.top_indices[enc.top_acts != 0]
                        return torch.zeros(shape.d_sae, dtype=torch.bool).index_fill_(0, hit, True)

                    s = score(d, dec.T, lambda xb: sae(xb).sae_out, fired, x_held)
                for opt in opts:
                    opt.train()
                with torch.no_grad():
                    for p, k in zip(sae.parameters(), kept, strict=True):
                        p.copy_(k)
                return s

            s = clock.exclude(measure)
            curve.append({"tokens": done, "seconds": round(clock.elapsed(), 2), **s})
    if export is not None:  # the trained SAE in the release's form (b_dec folded into b_enc), for the splice
        for opt in opts:
            opt.eval()
        with torch.no_grad():
            W_enc, b_enc = sae.encoder.weight.detach(), sae.encoder.bias.detach()
            tensors = {
                "W_enc": W_enc,
                "W_dec": sae.W_dec.detach().T,
                "b_enc": b_enc - W_enc @ sae.b_dec,
                "b_dec": sae.b_dec,
            }
            torch.save({k: v.float().contiguous().clone() for k, v in tensors.items()}, export)
    return [
        {
            "trainer": "sparsify",
            "overrides": [],
            "curve": [c for c in curve if c["tokens"] <= b],
            **_summary([c for c in curve if c["tokens"] <= b]),
        }
        for b in budgets
    ]


def tiny_qwen3(root: Path) -> tuple[Path, dict]:
    """Cache the tiny Qwen3's layer-2 activations (our cache stage's writer); save (shuffled train rows,
    held-out rows) to root/tiny.pt. Returns that path and what the spliced loss needs."""
    from qscope_train.config import DataConfig, DType, ModelConfig
    from qscope_train.data import shards
    from qscope_train.data.activations import make_filter
    from qscope_train.data.tokens import heldout_sequences
    from qscope_train.data.writer import build_cache
    from qscope_train.lm import load_lm
    from qscope_train.tiny import build_fixtures
    from qscope_train.tracking import NullBar

    fx = build_fixtures(root / "fixtures")
    lm = load_lm(ModelConfig(name_or_path=str(fx["tiny-qwen3"])))
    cfg = DataConfig(
        dataset=str(fx["corpus"]),
        context_len=128,
        train_tokens=393216,
        eval_tokens=32768,
        shard_tokens=32768,
        cache_dtype=DType.float32,
    )
    m = build_cache(lm, [TINY_LAYER], cfg, root / "cache", "cpu", NullBar)
    codec = shards.Codec(**m["codec"])

    def rows(split):
        recs = shards.records(m["splits"][split]["layers"][str(TINY_LAYER)]["shards"])
        return torch.cat([shards.read_shard(root / "cache", r, m["d_model"], codec, torch.float32) for r in recs])

    train = rows("train")
    train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))]
    torch.save((train, rows("eval")), root / "tiny.pt")
    seqs = heldout_sequences(lm.tokenizer, cfg, cfg.eval_tokens)
    return root / "tiny.pt", {"lm": lm, "seqs": seqs, "filter": make_filter(lm, cfg)}


def spliced_loss(ctx: dict, saes: dict) -> dict:
    """Per trainer: next-token CE increase (delta_ce) and KL when the SAE replaces layer 2's output on
    the held-out sequences (qscope_train.splice, the evaluate stage's code)."""
    from qscope_train.splice import downstream_metrics

    sets = {name: {TINY_LAYER: sae} for name, sae in saes.items()}
    res = downstream_metrics(ctx["lm"], sets, ctx["seqs"], ctx["filter"], 16, "cpu")
    return {name: {k: round(res[name][TINY_LAYER][k], 5) for k in ("delta_ce", "kl", "ce_recovered")} for name in sets}


def _summary(curve: list[dict]) -> dict:
    final = curve[-1]
    to90 = next((c["seconds"] for c in curve if (c["recovered"] or 0) >= 0.9), None)
    return {"tokens": final["tokens"], "seconds": final["seconds"], "seconds_to_90": to90} | {
        k: final[k]
        for k in (*DIRECTION_SCORES, "heldout_fvu", "dead_frac", "twin_frac", "twin_frac_99", "avg_max_decoder_cos")
    }


def _tokens(text: str) -> int:
    """'2M' -> 2 * 2**20 tokens (binary, so that budgets are whole batches of 4096), '256K' -> 256 * 2**10."""
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * mult)


def table(rows: list[dict]) -> str:
    out = [
        "| shape | tokens | trainer | recovered | parents | children | mean best cos | columns ≥ 0.7 | held-out FVU | dead "
        "| twins | first train FVU | ΔCE | s to 90 % | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    for r in rows:
        name = r["trainer"] + (" " + " ".join(r["overrides"]) if r["overrides"] else "")
        cos = "-" if r["mean_best_cos"] is None else f"{r['mean_best_cos']:.3f}"
        near = "-" if r["columns_near"] is None else f"{r['columns_near']:.2f}"
        dce = f"{r['delta_ce']:.4f}" if "delta_ce" in r else "-"
        first = f"{r['first_train_fvu']:.3f}" if "first_train_fvu" in r else "-"
        to90 = r["seconds_to_90"] if r["seconds_to_90"] is not None else "-"
        out.append(
            f"| {r['shape']} | {r['tokens'] / 2**20:g}M | {name} | {pct(r['recovered'])} | {pct(r['recovered_parents'])} | "
            f"{pct(r['recovered_children'])} | {cos} | {near} | {r['heldout_fvu']:.4f} | {r['dead_frac']:.1%} | {r['twin_frac']:.1%} | {first} | {dce} | {to90} | {r['seconds']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="small,wide")
    p.add_argument("--budgets", default="1M,2M,8M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", default="256K", help="tokens between recovery checks")
    p.add_argument("--ours", nargs="*", default=[], help="config overrides for our run, e.g. trainer.lr=4e-3")
    p.add_argument("--skip-sparsify", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsify-python", default=str(Path.home() / ".cache/qscope-anchors/sparsify/bin/python"))
    p.add_argument("--_sparsify", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_rows", help=argparse.SUPPRESS)  # tiny-qwen3: the rows file
    p.add_argument("--_export", help=argparse.SUPPRESS)  # tiny-qwen3: where sparsify's SAE goes
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    budgets = sorted(_tokens(b) for b in a.budgets.split(","))
    eval_every = _tokens(a.eval_every)
    batch = {s.batch for s in SHAPES.values()}.pop()
    if any(b % batch for b in budgets):
        raise SystemExit(f"--budgets must be whole batches of {batch} tokens, got {budgets}")
    unknown = set(a.shapes.split(",")) - set(SHAPES) - {"tiny-qwen3"}
    if unknown:
        raise SystemExit(f"unknown --shapes {sorted(unknown)}; choose from {sorted(SHAPES)} and tiny-qwen3")
    if a._sparsify:
        name = a._sparsify[0]
        if name == "tiny-qwen3":
            d = CachedRows(TINY, Path(a._rows))
            res = run_sparsify(d, a.seed, [_one_pass(d)], eval_every, Path(a._export))
        else:
            res = run_sparsify(Dictionary(SHAPES[name], a.seed), a.seed, budgets, eval_every)
        print(json.dumps(res), file=open(a._sparsify[1], "w"))
        return
    rows = []
    for name in a.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cmd = [a.sparsify_python, __file__, "--_sparsify", name, str(tmp / "sp.json"), "--budgets", a.budgets]
            cmd += ["--seed", str(a.seed), "--eval-every", a.eval_every, "--threads", str(a.threads)]
            if name == "tiny-qwen3":
                path, ctx = tiny_qwen3(tmp)
                d = CachedRows(TINY, path)
                these = [_one_pass(d)]
                cmd += ["--_rows", str(path), "--_export", str(tmp / "sparsify.sae.pt")]
            else:
                d, these = Dictionary(SHAPES[name], a.seed), budgets
            meta = {"shape": name, **asdict(d.shape), "seed": a.seed, "data": d.info()}
            trained = []  # (row, SAE) pairs for the spliced loss
            if not a.skip_sparsify:
                subprocess.run(cmd, check=True)
                for r in json.loads((tmp / "sp.json").read_text()):
                    rows.append(meta | r)
                if name == "tiny-qwen3":
                    from qscope_train.sae import TopKSAE

                    trained.append((rows[-1], TopKSAE.from_release(torch.load(tmp / "sparsify.sae.pt"), TINY.k)))
            if not a.skip_ours:
                for tokens in these:
                    r, sae = run_ours(d, a.seed, tokens, eval_every, a.ours)
                    rows.append(meta | r)
                    trained.append((rows[-1], sae))
            if name == "tiny-qwen3":
                loss = spliced_loss(ctx, {str(i): sae for i, (_, sae) in enumerate(trained)})
                for i, (r, _) in enumerate(trained):
                    r.update(loss[str(i)])
            for r in rows:
                if r["shape"] == name:
                    print(json.dumps(r), flush=True)
    print(table(sorted(rows, key=lambda r: (r["shape"], r["tokens"], r["trainer"]))))


def _one_pass(d: CachedRows) -> int:
    return d.train.shape[0] // d.shape.batch * d.shape.batch


if __name__ == "__main__":
    main()
