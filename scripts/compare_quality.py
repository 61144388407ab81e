"""Final held-out FVU and dead fraction: qscope-train beside EleutherAI sparsify, same data, same budget.

Two data sets: the tiny random Qwen3's layer-2 residual stream (cached by our cache stage) and a
synthetic set (sparse combinations of 512 unit directions in 64 dimensions, plus an offset).
Both trainers see the same training rows in the same order, one pass, batch 1024, d_sae 1024,
k 16, each with its own default optimizer and learning rate; both are scored on the same held-out
rows with the same definitions (FVU about the held-out mean; dead = never fires on those rows).
sparsify runs in its own virtual environment (../shared/anchors/setup.sh), through this same file,
so the module imports nothing of qscope_train at the top.

Usage: python scripts/compare_quality.py [--sparsify-python ~/.cache/qscope-anchors/sparsify/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

D_SAE, K, BATCH = 1024, 16, 1024


def score(x_hat_fn, x: torch.Tensor, fired_fn) -> dict:
    err = var = 0.0
    fired = torch.zeros(D_SAE, dtype=torch.bool)
    mean = x.mean(0)
    for xb in x.split(BATCH):
        err += (xb - x_hat_fn(xb)).pow(2).sum().item()
        var += (xb - mean).pow(2).sum().item()
        fired |= fired_fn(xb)
    return {"fvu": err / var, "dead_frac": 1 - fired.float().mean().item()}


def run_sparsify(train: torch.Tensor, held: torch.Tensor) -> dict:
    """Runs inside sparsify's environment: its SparseCoder, its default optimizer, its trainer's step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "anchors"))
    from bench_sparsify import build_optimizer  # the anchors' copy of sparsify's Trainer set-up
    from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder(train.shape[1], SaeConfig(num_latents=D_SAE, k=K), device="cpu", dtype=torch.float32)
    batches = list(train.split(BATCH))
    opts, scheds, _ = build_optimizer(sae, "signum", None, len(batches))
    for step, x in enumerate(batches):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(x=x, y=x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for s in scheds:
            s.step()
    sae.set_decoder_norm_to_unit_norm()
    for opt in opts:  # schedule-free keeps training weights apart from the averaged ones it evaluates
        if hasattr(opt, "eval"):
            opt.eval()
    with torch.no_grad():

        def fired(xb):
            enc = sae.encode(xb)
            return torch.zeros(D_SAE, dtype=torch.bool).index_fill_(0, enc.top_indices[enc.top_acts != 0], True)

        return score(lambda xb: sae(xb).sae_out, held, fired)


def run_ours(train: torch.Tensor, held: torch.Tensor, lr: float | None = None) -> dict:
    from qscope_train.config import TrainerConfig
    from qscope_train.data.batches import Unseekable
    from qscope_train.sae import TopKSAE
    from qscope_train.tracking import NullBar
    from qscope_train.trainer import fit

    batches = [{0: x} for x in train.split(BATCH)]
    sae = TopKSAE(train.shape[1], D_SAE, K)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=BATCH, warmup_steps=20, checkpoint_every=0, lr=lr)
    fit({0: sae}, Unseekable(batches), cfg, len(batches), "cpu", lambda s, m: None, NullBar)
    with torch.no_grad():
        return score(lambda xb: sae(xb).x_hat_BD, held, lambda xb: sae.encode_sparse(xb).fire_counts(D_SAE) > 0)


def tiny_model_rows(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from qscope_train.config import DataConfig, DType, ModelConfig
    from qscope_train.data import shards
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
    m = build_cache(lm, [2], cfg, root / "cache", "cpu", NullBar)
    codec = shards.Codec(**m["codec"])

    def rows(split):
        recs = shards.records(m["splits"][split]["layers"]["2"]["shards"])
        return torch.cat([shards.read_shard(root / "cache", r, m["d_model"], codec, torch.float32) for r in recs])

    train = rows("train")
    return train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))], rows("eval")


def synthetic_rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(512, 64, generator=g), dim=-1)

    def make(n):
        idx = torch.randint(0, 512, (n, 8), generator=g)
        coef = torch.rand(n, 8, generator=g) * 3
        return (coef.unsqueeze(-1) * atoms[idx]).sum(1) + 0.5

    return make(393216), make(32768)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsify-python", default=str(Path.home() / ".cache/qscope-anchors/sparsify/bin/python"))
    p.add_argument("--lr", type=float, default=None, help="our Adam learning rate (default: 2e-4 / sqrt(d_sae / 2^14))")
    p.add_argument("--_sparsify", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(2)
    if a._sparsify:
        train, held = torch.load(a._sparsify[0], weights_only=True)
        Path(a._sparsify[1]).write_text(json.dumps(run_sparsify(train, held)))
        return
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (train, held) in {"tiny_qwen3_layer2": tiny_model_rows(tmp), "synthetic": synthetic_rows()}.items():
            torch.save((train, held), tmp / f"{name}.pt")
            subprocess.run(
                [a.sparsify_python, __file__, "--_sparsify", str(tmp / f"{name}.pt"), str(tmp / "sp.json")],
                check=True,
                capture_output=True,
            )
            out[name] = {
                "ours": run_ours(train, held, a.lr),
                "sparsify": json.loads((tmp / "sp.json").read_text()),
                "train_rows": train.shape[0],
                "held_out_rows": held.shape[0],
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
