"""The stages, in order: cache -> fit -> evaluate -> export -> adapt, each reading and writing the run directory.

run_dir/cache/   manifest.json + {train,eval}/layer<n>/shard-*.zst   (cache)
run_dir/fit/     layer<n>.sae.pt + layer<n>.json                      (fit)
run_dir/eval/    eval.json + firing.pt + report.md + *.png            (evaluate)
run_dir/export/  layer<n>.sae.pt + layer<n>.json + README.md          (export)
run_dir/         adapt.json + report.md + *.png                       (adapt: before/after, drift)
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from . import __version__, distributed, release
from .cache import build_cache
from .config import ActivationSource, RunConfig, Stage, to_plain
from .errors import ConfigError, InputError
from .evaluate import scalar_metrics
from .fsutil import read_json
from .lm import load_lm
from .reader import cached_batches, live_batches
from .rundir import RunDirs, cache_manifest, fit_file
from .sae import TopKSAE
from .stages_eval import adapt_stage, eval_result, evaluate_stage, summary_table
from .tracking import Tracker
from .trainer import Checkpoints, fit


def run(cfg: RunConfig, accelerator) -> dict:
    """Run the configured stages; returns the evaluation result (eval.json's content; empty if not evaluated)."""
    world = accelerator.num_processes
    data_parallel = world > 1 and not cfg.trainer.layer_sharding
    if data_parallel and Stage.fit in cfg.stages and cfg.trainer.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must divide evenly over {world} processes")
    dirs = RunDirs(Path(cfg.run_dir))
    tracker = Tracker(dirs.root, cfg.wandb, cfg.name, to_plain(cfg), accelerator.is_main_process)
    device = accelerator.device
    result: dict = {}
    try:
        if Stage.cache in cfg.stages:
            cache_stage(cfg, dirs, accelerator, tracker)
        if Stage.fit in cfg.stages:
            fit_stage(cfg, dirs, accelerator, tracker)
        accelerator.wait_for_everyone()
        # held-out evaluation and export are small: the main process does them alone
        if Stage.evaluate in cfg.stages and accelerator.is_main_process:
            result = evaluate_stage(cfg, dirs, device, tracker)
            print(summary_table(result))
        if Stage.export in cfg.stages and accelerator.is_main_process:
            export_stage(cfg, dirs)
        if Stage.adapt in cfg.stages and accelerator.is_main_process:
            adapt_stage(cfg, dirs)
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
    return result


def cache_stage(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict:
    lm = load_lm(cfg.model, accelerator.device)
    manifest = build_cache(
        lm,
        cfg.layers,
        cfg.data,
        dirs.cache,
        accelerator.device,
        tracker.progress,
        cfg.model.revision,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )
    for split, info in manifest["splits"].items():
        tracker.log("cache", 0, {int(n): lay["filters"] for n, lay in info["layers"].items()}, split=split)
    if accelerator.is_main_process:
        print(cache_summary(manifest, dirs.cache))
    return manifest


def cache_summary(manifest: dict, root: Path) -> str:
    train = manifest["splits"]["train"]
    n_layers = len(manifest["layers"])
    rows = sum(lay["rows"] for sp in manifest["splits"].values() for lay in sp["layers"].values())
    drops = {
        k: sum(lay["filters"][k] for lay in train["layers"].values()) // n_layers
        for k in ("dropped_position0", "dropped_padding", "dropped_special", "dropped_outlier")
    }
    return (
        f"cache: {train['tokens']:,} train + {manifest['splits']['eval']['tokens']:,} held-out tokens, "
        f"{n_layers} layers -> {root}\n"
        f"  {manifest['compressed_bytes'] / max(rows, 1):.0f} bytes/token/layer on disk, "
        f"compression {manifest['raw_bytes'] / max(manifest['compressed_bytes'], 1):.3f}x "
        f"({manifest['codec']['dtype']}, byte_split={manifest['codec']['byte_split']})\n"
        f"  dropped per layer (train, mean): "
        + ", ".join(f"{k.removeprefix('dropped_')} {v:,}" for k, v in drops.items())
    )


def fit_stage(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict[int, dict]:
    """Data parallel over the launched processes: rank r reads its own shards (or live chunks) and
    batch_size / world rows per step; gradients and dead-latent counts are summed over ranks.

    With trainer.layer_sharding, rank r instead trains layers[r::world] alone, on full batches of all
    shards, and writes their files itself; the main process logs its own layers."""
    t, device = cfg.trainer, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    sharded = t.layer_sharding and world > 1
    if sharded and world > len(cfg.layers):
        raise ConfigError(f"trainer.layer_sharding: {world} processes for {len(cfg.layers)} layers leaves some idle")
    layers = cfg.layers[rank::world] if sharded else list(cfg.layers)
    r_read, w_read = (0, 1) if sharded else (rank, world)  # who splits the activation stream
    local_batch = t.batch_size // w_read
    if cfg.data.source is ActivationSource.live:
        lm = load_lm(cfg.model, device)
        d_model, model_name = lm.d_model, lm.name
        batches = live_batches(lm, layers, local_batch, cfg.data, t.seed, device, rank=r_read, world=w_read)
        steps = t.max_steps or max(1, cfg.data.train_tokens // t.batch_size)
    else:
        manifest = cache_manifest(cfg, dirs)
        d_model, model_name = manifest["d_model"], manifest["model"]
        steps = t.max_steps or _cached_steps(manifest, cfg, w_read)
        batches = cached_batches(dirs.cache, manifest, layers, local_batch, cfg.data, t.seed, rank=r_read, world=w_read)
    saes = initial_saes(cfg, d_model, layers)
    if t.k_start is not None and not saes[layers[0]].k < t.k_start <= saes[layers[0]].d_sae:
        raise ConfigError(f"trainer.k_start={t.k_start} must lie between k ({saes[layers[0]].k}) and d_sae")
    fingerprint = {
        "layers": layers,
        "sae": to_plain(cfg.sae),
        "trainer": {
            k: v for k, v in to_plain(t).items() if k not in ("checkpoint_every", "keep_checkpoints", "log_every")
        },
        "steps": steps,
        "model": cfg.model.name_or_path,
        "init_from": cfg.init_from,
        "source": cfg.data.source.value,
        "reader": {"shuffle_buffer_tokens": cfg.data.shuffle_buffer_tokens, "shuffle_shards": cfg.data.shuffle_shards},
        "cache": None if cfg.data.source is ActivationSource.live else manifest["fingerprint"],
        "world": world,
    }
    ckpt_dir = dirs.fit / "checkpoints" / (f"rank{rank}-of-{world}" if sharded else "")
    ckpts = Checkpoints(ckpt_dir, t.checkpoint_every, t.keep_checkpoints, fingerprint)
    with distributed.local() if sharded else nullcontext():
        summary = fit(
            saes,
            batches,
            t,
            steps,
            device,
            lambda s, m: tracker.log("fit", s, m),
            tracker.progress,
            init_b_dec=cfg.init_from is None,
            checkpoints=ckpts,
        )
    if sharded or accelerator.is_main_process:
        for n, sae in saes.items():
            release.save_tensors(dirs.fit / release.layer_filename(n), sae.to_release())
            release.write_sidecar(dirs.fit / f"layer{n}.json", layer_meta(cfg, model_name, n, sae, summary[n]))
    return summary


def _cached_steps(manifest: dict, cfg: RunConfig, readers: int) -> int:
    """One pass over the smallest layer's training rows (the same for every rank and every sharding)."""
    train = manifest["splits"]["train"]["layers"]
    few = [n for n in cfg.layers if len(train[str(n)]["shards"]) < readers]
    if few:
        raise InputError(
            f"layers {few} have fewer training shards than the {readers} processes: cache more tokens "
            "(data.train_tokens) or smaller shards (data.shard_tokens), or launch fewer processes"
        )
    rows = min(train[str(n)]["rows"] for n in cfg.layers)
    if rows < cfg.trainer.batch_size:
        raise InputError(
            f"the cached training split has {rows:,} rows on its smallest layer, fewer than one batch "
            f"(trainer.batch_size={cfg.trainer.batch_size}): cache more tokens (data.train_tokens) or lower the batch size"
        )
    return max(1, rows // cfg.trainer.batch_size)


def initial_saes(cfg: RunConfig, d_model: int, layers: Optional[list[int]] = None) -> dict[int, TopKSAE]:
    """Fresh SAEs (unit-norm random decoder, tied encoder; layer n from seed + n, so a layer starts the
    same whichever other layers train beside it), or the release named by init_from."""
    layers = list(cfg.layers) if layers is None else layers
    if cfg.init_from is None:
        saes = {}
        for n in layers:
            saes[n] = TopKSAE(d_model, cfg.sae.d_sae, cfg.sae.k, cfg.sae.activation)
            saes[n].init_weights_(generator=torch.Generator().manual_seed(cfg.trainer.seed + n))
        return saes
    saes = release.load_saes(cfg.init_from, layers, cfg.init_from_revision, cfg.sae.activation)
    release.check_d_model(saes, f"init_from={cfg.init_from!r}", d_model, cfg.model.name_or_path)
    first = saes[layers[0]]
    if (first.d_sae, first.k) != (cfg.sae.d_sae, cfg.sae.k):
        print(f"init_from: using the checkpoint's d_sae={first.d_sae}, k={first.k} (sae.* settings ignored)")
    return saes


def export_stage(cfg: RunConfig, dirs: RunDirs) -> Path:
    result = eval_result(dirs)
    trained = (result or {}).get("sets", {}).get("trained", {}).get("layers", {})
    metrics = {int(n): scalar_metrics(m) for n, m in trained.items()}
    metas = {}
    for n in cfg.layers:
        src = fit_file(dirs, n, "export")
        release.save_tensors(dirs.export / src.name, release.load_tensors(src))
        meta = read_json(dirs.fit / f"layer{n}.json")
        if n in metrics:
            meta["metrics"] = metrics[n]
        release.write_sidecar(dirs.export / f"layer{n}.json", meta)
        metas[n] = meta
    first = metas[cfg.layers[0]]
    info = {
        "base_model": first["model"],
        "d_model": first["d_model"],
        "d_sae": first["d_sae"],
        "k": first["k"],
        "activation": first["activation"],
        "layers": list(cfg.layers),
        "release_name": first["release_name"],
        "tokens_trained": first["tokens_trained"],
        "source": first.get("init_from"),
    }
    release.write_model_card(dirs.export, info, {n: m.get("metrics", {}) for n, m in metas.items()})
    print(f"export: {len(metas)} layer files + sidecars + README.md -> {dirs.export}")
    return dirs.export


def release_name(cfg: RunConfig, d_sae: int, k: int) -> str:
    model = cfg.release_model_name or Path(cfg.model.name_or_path.rstrip("/")).name
    if d_sae % 1024 == 0:
        return str(release.ReleaseName.for_sae(model, d_sae, k))
    return f"SAE-Res-{model}-W{d_sae}-L0_{k}"


def layer_meta(cfg: RunConfig, model_name: str, n: int, sae: TopKSAE, summary: Optional[dict]) -> dict:
    """The layer<n>.json sidecar: what the SAE reads, its shape, and how it was trained."""
    return {
        "format": "qwen-scope layer<n>.sae.pt",
        "release_name": release_name(cfg, sae.d_sae, sae.k),
        "model": model_name,
        "model_revision": cfg.model.revision,
        "layer": n,
        "hook_point": release.HOOK_POINT,
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "activation": sae.activation.value,
        "init_from": cfg.init_from,
        "tokens_trained": (summary or {}).get("tokens_trained", 0),
        "train": summary or {},
        "data": to_plain(cfg.data),
        "trainer": to_plain(cfg.trainer),
        "qscope_train_version": __version__,
    }
