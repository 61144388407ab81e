"""The stages, in order: cache -> fit -> evaluate -> export, each reading and writing the run directory.

run_dir/cache/   manifest.json + {train,eval}/layer<n>/shard-*.zst   (cache)
run_dir/fit/     layer<n>.sae.pt + layer<n>.json                      (fit)
run_dir/eval/    metrics.json                                         (evaluate)
run_dir/export/  layer<n>.sae.pt + layer<n>.json + README.md          (export)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from . import __version__, release, shards
from .cache import build_cache
from .config import ActivationSource, RunConfig, Stage, to_plain
from .errors import ConfigError, InputError, MissingInputError
from .evaluate import Evaluator
from .fsutil import atomic_write_json, read_json
from .lm import load_lm
from .reader import cached_batches, eval_rows, live_batches, live_chunks
from .sae import TopKSAE
from .tracking import Tracker
from .trainer import Checkpoints, fit

EVAL_BATCH = 4096


class RunDirs:
    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir
        self.cache, self.fit, self.eval, self.export = (run_dir / s for s in ("cache", "fit", "eval", "export"))


def run(cfg: RunConfig, accelerator) -> dict[int, dict]:
    """Run the configured stages; returns the held-out metrics per layer (empty if not evaluated)."""
    world = accelerator.num_processes
    if world > 1 and Stage.fit in cfg.stages and cfg.trainer.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must divide evenly over {world} processes")
    dirs = RunDirs(Path(cfg.run_dir))
    tracker = Tracker(dirs.root, cfg.wandb, cfg.name, to_plain(cfg), accelerator.is_main_process)
    device = accelerator.device
    metrics: dict[int, dict] = {}
    try:
        if Stage.cache in cfg.stages:
            cache_stage(cfg, dirs, accelerator, tracker)
        if Stage.fit in cfg.stages:
            fit_stage(cfg, dirs, accelerator, tracker)
        accelerator.wait_for_everyone()
        # held-out evaluation and export are small: the main process does them alone
        if Stage.evaluate in cfg.stages and accelerator.is_main_process:
            metrics = evaluate_stage(cfg, dirs, device, tracker)
        if Stage.export in cfg.stages and accelerator.is_main_process:
            export_stage(cfg, dirs)
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
    if metrics:
        print(summary_table(metrics))
    return metrics


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


def _manifest(cfg: RunConfig, dirs: RunDirs) -> dict:
    manifest = shards.read_manifest(dirs.cache)
    missing = sorted(set(cfg.layers) - set(manifest["layers"]))
    if missing:
        raise InputError(
            f"the cache at {dirs.cache} has layers {manifest['layers']}, not {missing}: re-run the cache stage"
        )
    if manifest["model"] != cfg.model.name_or_path:
        raise InputError(
            f"the cache at {dirs.cache} holds activations of {manifest['model']!r}, not {cfg.model.name_or_path!r}"
        )
    return manifest


def fit_stage(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict[int, dict]:
    """Data parallel over the launched processes: rank r reads its own shards (or live chunks) and
    batch_size / world rows per step; gradients and dead-latent counts are summed over ranks."""
    t, device = cfg.trainer, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    local_batch = t.batch_size // world
    if cfg.data.source is ActivationSource.live:
        lm = load_lm(cfg.model, device)
        d_model, model_name = lm.d_model, lm.name
        batches = live_batches(lm, cfg.layers, local_batch, cfg.data, t.seed, device, rank=rank, world=world)
        steps = t.max_steps or max(1, cfg.data.train_tokens // t.batch_size)
    else:
        manifest = _manifest(cfg, dirs)
        d_model, model_name = manifest["d_model"], manifest["model"]
        few = [n for n in cfg.layers if len(manifest["splits"]["train"]["layers"][str(n)]["shards"]) < world]
        if few:
            raise InputError(
                f"layers {few} have fewer training shards than the {world} processes: cache more tokens "
                "(data.train_tokens) or smaller shards (data.shard_tokens), or launch fewer processes"
            )
        rows = min(manifest["splits"]["train"]["layers"][str(n)]["rows"] for n in cfg.layers)
        if rows < t.batch_size:
            raise InputError(
                f"the cached training split has {rows:,} rows on its smallest layer, fewer than one batch "
                f"(trainer.batch_size={t.batch_size}): cache more tokens (data.train_tokens) or lower the batch size"
            )
        steps = t.max_steps or max(1, rows // t.batch_size)
        batches = cached_batches(
            dirs.cache, manifest, cfg.layers, local_batch, cfg.data, t.seed, rank=rank, world=world
        )
    saes = initial_saes(cfg, d_model)
    if t.k_start is not None and not saes[cfg.layers[0]].k < t.k_start <= saes[cfg.layers[0]].d_sae:
        raise ConfigError(f"trainer.k_start={t.k_start} must lie between k ({saes[cfg.layers[0]].k}) and d_sae")
    fingerprint = {
        "layers": list(cfg.layers),
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
    ckpts = Checkpoints(dirs.fit / "checkpoints", t.checkpoint_every, t.keep_checkpoints, fingerprint)
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

    if not accelerator.is_main_process:
        return summary
    for n, sae in saes.items():
        release.save_tensors(dirs.fit / release.layer_filename(n), sae.to_release())
        release.write_sidecar(dirs.fit / f"layer{n}.json", layer_meta(cfg, model_name, n, sae, summary[n]))
    return summary


def _fit_file(dirs: RunDirs, n: int, stage: str) -> Path:
    path = dirs.fit / release.layer_filename(n)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist: run the fit stage first (stages=[fit,{stage}])")
    return path


def initial_saes(cfg: RunConfig, d_model: int) -> dict[int, TopKSAE]:
    """Fresh SAEs (unit-norm random decoder, tied encoder), or the release named by init_from."""
    if cfg.init_from is None:
        g = torch.Generator().manual_seed(cfg.trainer.seed)
        saes = {}
        for n in cfg.layers:
            saes[n] = TopKSAE(d_model, cfg.sae.d_sae, cfg.sae.k, cfg.sae.activation)
            saes[n].init_weights_(generator=g)
        return saes
    saes = {}
    for n in cfg.layers:
        sae = release.load_sae(
            cfg.init_from, layer=n, revision=cfg.init_from_revision, default_activation=cfg.sae.activation
        )
        if sae.d_model != d_model:
            raise InputError(
                f"init_from={cfg.init_from!r} layer {n} has d_model {sae.d_model}, but {cfg.model.name_or_path!r} "
                f"has d_model {d_model}: the SAE was trained on another model"
            )
        saes[n] = sae
    first = saes[cfg.layers[0]]
    if (first.d_sae, first.k) != (cfg.sae.d_sae, cfg.sae.k):
        print(f"init_from: using the checkpoint's d_sae={first.d_sae}, k={first.k} (sae.* settings ignored)")
    return saes


def evaluate_stage(cfg: RunConfig, dirs: RunDirs, device, tracker: Tracker) -> dict[int, dict]:
    evals = {n: Evaluator(release.load_sae(_fit_file(dirs, n, "evaluate")), device, EVAL_BATCH) for n in cfg.layers}
    if cfg.data.source is ActivationSource.live:
        lm = load_lm(cfg.model, device)
        for rows in live_chunks(lm, cfg.layers, cfg.data, "eval", device):
            for n, x in rows.items():
                evals[n].update(x)
        filters = {}
    else:
        manifest = _manifest(cfg, dirs)
        for n in cfg.layers:
            for x in eval_rows(dirs.cache, manifest, n, EVAL_BATCH):
                evals[n].update(x)
        filters = {n: manifest["splits"]["eval"]["layers"][str(n)]["filters"] for n in cfg.layers}
    metrics = {n: {**ev.result(), **({"filters": filters[n]} if n in filters else {})} for n, ev in evals.items()}
    tracker.log("evaluate", 0, metrics)
    atomic_write_json(dirs.eval / "metrics.json", {"layers": {str(n): m for n, m in metrics.items()}})
    return metrics


def export_stage(cfg: RunConfig, dirs: RunDirs) -> Path:
    eval_file = dirs.eval / "metrics.json"
    metrics = {int(n): m for n, m in read_json(eval_file)["layers"].items()} if eval_file.is_file() else {}
    metas = {}
    for n in cfg.layers:
        src = _fit_file(dirs, n, "export")
        release.save_tensors(dirs.export / src.name, release.load_tensors(src))
        meta = read_json(dirs.fit / f"layer{n}.json")
        if n in metrics:
            meta["metrics"] = {k: v for k, v in metrics[n].items() if k != "filters"}
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


def summary_table(metrics: dict[int, dict]) -> str:
    lines = [
        "",
        "layer      FVU       L0   dead %   held-out tokens",
        "-----  -------  -------  -------  ---------------",
    ]
    for n in sorted(metrics):
        m = metrics[n]
        lines.append(f"{n:>5}  {m['fvu']:7.4f}  {m['l0']:7.2f}  {100 * m['dead_frac']:6.2f}%  {m['n_tokens']:>15,}")
    return "\n".join(lines)
