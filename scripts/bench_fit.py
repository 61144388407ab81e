"""The fit loop against its bare step: does anything but the step cost time? Prints one JSON line.

A cache in the real on-disk format (bf16, byte-split, zstd, manifest) is written from synthetic rows
(a sparse code over a random dictionary, a shared offset, noise; rows the reader must really decode
and shuffle). Then, in one process and alternately:
- fit: trainer.fit reading that cache through cached_batches (reader threads, shuffle buffer, the
  prefetch thread, host-to-device copies, log steps), timed from its first timed step's start to the
  end of its last step;
- step: trainer.train_steps alone on the same batches, already in memory (on the device).
fit_tokens_per_s / step_tokens_per_s is the loop's efficiency; 1.0 means the reader and the loop are
entirely hidden behind the step.

Usage: python scripts/bench_fit.py [--d-model 1024 --d-sae 16384 --k 64] [--batch 4096] [--steps 6]
           [--layers 1] [--layer-groups 1|n|auto] [--device cpu|cuda] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from qscope_train import allocator, memory, trainer
from qscope_train.config import DecoderInit, ReaderConfig, TrainerConfig
from qscope_train.data import shards
from qscope_train.data.batches import cached_batches
from qscope_train.data.shards import Codec
from qscope_train.sae import TopKSAE
from qscope_train.tracking import NullBar

SHARD_ROWS = 8192


def write_cache(root: Path, layers: list[int], d_model: int, rows: int, seed: int = 0, device="cpu") -> dict:
    """A train split of `rows` rows per layer in the cache's own format (format 3, bf16, byte-split); the
    rows are generated on `device` (a GPU makes a 28-layer cache in seconds)."""
    codec = Codec("bfloat16", True, 1, frame_checksum=True)
    g = torch.Generator(device).manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d_model, d_model, generator=g, device=device), dim=-1)
    offset = torch.randn(d_model, generator=g, device=device)
    layer_entries = {}
    for n in layers:
        recs = []
        for i in range(0, rows, SHARD_ROWS):
            m = min(SHARD_ROWS, rows - i)
            shape = (m, atoms.shape[0])
            codes = torch.rand(shape, generator=g, device=device)
            codes *= torch.rand(shape, generator=g, device=device) < 0.01
            x = codes @ atoms + offset + 0.05 * torch.randn(m, d_model, generator=g, device=device)
            name = f"train/layer{n}/shard-{i // SHARD_ROWS:06d}.zst"
            recs.append(shards.write_shard(root, name, x.cpu(), codec))
        layer_entries[str(n)] = {"rows": sum(r.rows for r in recs), "shards": shards.as_dicts(recs)}
    manifest = {
        "format": 3,
        "fingerprint": {"bench_fit": seed},
        "model": "synthetic",
        "d_model": d_model,
        "layers": layers,
        "codec": {"dtype": codec.dtype, "byte_split": True, "level": 1, "frame_checksum": True},
        "splits": {"train": {"layers": layer_entries}},
    }
    shards.write_manifest(root, manifest)
    return manifest


def saes_for(layers: list[int], a) -> dict[int, TopKSAE]:
    out = {}
    for n in layers:
        out[n] = TopKSAE(a.d_model, a.d_sae, a.k)
        out[n].init_weights_(generator=torch.Generator().manual_seed(n), encoder_norm=3**-0.5)
    return out


def time_fit(root: Path, manifest: dict, layers: list[int], cfg: TrainerConfig, total: int, a, device) -> float:
    """Seconds per step of trainer.fit over the steps after a.warmup, wall clock between step starts."""
    batches = cached_batches(
        root, manifest, layers, a.batch, ReaderConfig(threads=a.threads), seed=0, out_dtype=a.out_dtype
    )
    starts, original = [], trainer.train_steps

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        return original(*args, **kwargs)

    trainer.train_steps = timed
    try:
        trainer.fit(saes_for(layers, a), batches, cfg, total, device, lambda s, m: None, NullBar, init_b_dec=False)
    finally:
        trainer.train_steps = original
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()  # fit returns after its last step (and the final read of the metrics)
    return (end - starts[a.warmup]) / (total - a.warmup)


def time_steps(batches: list[dict], layers: list[int], cfg: TrainerConfig, total: int, a, device) -> float:
    states = {n: trainer.new_state(sae, cfg, total, device) for n, sae in saes_for(layers, a).items()}
    for s in states.values():
        s.sae.center_input_(cfg.center_input)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step, b in enumerate(batches[: a.warmup]):
        trainer.train_steps(states, b, cfg, step)
    sync()
    t0 = time.perf_counter()
    for step, b in enumerate(batches[a.warmup :], start=a.warmup):
        trainer.train_steps(states, b, cfg, step)
    sync()
    torch.stack([s.last for s in states.values()]).tolist()  # what fit's last log step reads
    return (time.perf_counter() - t0) / (total - a.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument(
        "--layer-groups",
        default="1",
        help="train the layers in this many sequential groups, or auto (as the fit stage plans them); "
        "the figures are then for one step of every group",
    )
    p.add_argument("--rounds", type=int, default=2, help="fit and step are timed alternately this many times")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cpu":
        allocator.keep_freed_memory_on_cpu()  # what the CLI does before a fit on a CPU
    a.out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the fit stage asks for
    layers = list(range(a.layers))
    total = a.warmup + a.steps
    # log_every as in the presets' order of magnitude; the last step is a log step too
    cfg = TrainerConfig(
        batch_size=a.batch,
        decoder_init=DecoderInit.random,
        checkpoint_every=0,
        log_every=20,
        layer_groups=a.layer_groups,
    )
    groups = memory.plan(layers, a.d_model, a.d_sae, a.k, a.batch, cfg.optimizer, cfg.group_count(), device).groups
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_cache(root, layers, a.d_model, total * a.batch + SHARD_ROWS, device=device)
        write_s = time.perf_counter() - t0
        print(f"bench_fit: cache of {len(layers)} layers written in {write_s:.1f} s; groups {groups}", file=sys.stderr)
        resolved = cfg.resolved(total)
        fit_s, step_s = [0.0] * a.rounds, [0.0] * a.rounds
        for group in groups:  # a layer group is a pass of its own: its time per step adds to the others'
            it = iter(cached_batches(root, manifest, group, a.batch, ReaderConfig(), seed=0, out_dtype=a.out_dtype))
            batches = [{n: t.to(device) for n, t in next(it).items()} for _ in range(total)]
            for r in range(a.rounds):
                fit_s[r] += time_fit(root, manifest, group, cfg, total, a, device)
                step_s[r] += time_steps(batches, group, resolved, total, a, device)
                print(f"bench_fit: group {group} round {r}: {time.perf_counter() - t0:.1f} s so far", file=sys.stderr)
            del batches, it
    rows = a.batch
    fit_rate, step_rate = rows / statistics.median(fit_s), rows / statistics.median(step_s)
    print(
        json.dumps(
            {
                "fit_tokens_per_s": round(fit_rate, 1),
                "step_tokens_per_s": round(step_rate, 1),
                "ratio": round(fit_rate / step_rate, 3),
                "fit_s_per_step": [round(s, 3) for s in fit_s],
                "step_s_per_step": [round(s, 3) for s in step_s],
                "cache_write_s": round(write_s, 1),
                "settings": {
                    "d_model": a.d_model,
                    "d_sae": a.d_sae,
                    "k": a.k,
                    "batch": a.batch,
                    "layers": a.layers,
                    "layer_groups": len(groups),
                    "steps": a.steps,
                    "warmup": a.warmup,
                    "threads": a.threads,
                    "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "torch": torch.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
