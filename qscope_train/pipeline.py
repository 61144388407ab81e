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
from .activations import build_cache, cached_eval_rows, cached_train_batches, check_cache, split_rows
from .config import RunConfig, Stage, to_plain
from .evaluate import evaluate_sae
from .fsutil import atomic_write_json, read_json
from .lm import load_lm
from .sae import TopKSAE
from .tracking import Tracker
from .trainer import fit

EVAL_BATCH = 4096


class RunDirs:
    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir
        self.cache, self.fit, self.eval, self.export = (run_dir / s for s in ("cache", "fit", "eval", "export"))


def run(cfg: RunConfig, accelerator) -> dict[int, dict]:
    """Run the configured stages; returns the held-out metrics per layer (empty if not evaluated)."""
    if accelerator.num_processes > 1:
        raise NotImplementedError(
            f"this version runs as a single process (got {accelerator.num_processes}); "
            "multi-process caching and training are tracked in the cache and trainer issues"
        )
    dirs = RunDirs(Path(cfg.run_dir))
    tracker = Tracker(dirs.root, cfg.wandb, cfg.name, to_plain(cfg), accelerator.is_main_process)
    device = accelerator.device
    metrics: dict[int, dict] = {}
    try:
        if Stage.cache in cfg.stages:
            cache_stage(cfg, dirs, device, tracker)
        if Stage.fit in cfg.stages:
            fit_stage(cfg, dirs, device, tracker)
        if Stage.evaluate in cfg.stages:
            metrics = evaluate_stage(cfg, dirs, device, tracker)
        if Stage.export in cfg.stages:
            export_stage(cfg, dirs)
    finally:
        tracker.close()
    if metrics:
        print(summary_table(metrics))
    return metrics


def cache_stage(cfg: RunConfig, dirs: RunDirs, device, tracker: Tracker) -> dict:
    lm = load_lm(cfg.model, device)
    manifest = build_cache(lm, cfg.layers, cfg.data, dirs.cache, device, tracker.progress, cfg.model.revision)
    for split in ("train", "eval"):
        for n in cfg.layers:
            f = manifest["splits"][split][str(n)]["filters"]
            tracker.log("cache", 0, {n: f}, split=split)
    n0 = str(cfg.layers[0])
    f = manifest["splits"]["train"][n0]["filters"]
    print(
        f"cache: {f['seen']:,} train tokens/layer seen, {f['kept']:,} kept "
        f"(dropped: position 0 {f['dropped_position0']:,}, special {f['dropped_special']:,}, "
        f"outlier {f['dropped_outlier']:,} on layer {n0}) -> {dirs.cache}"
    )
    return manifest


def _manifest(cfg: RunConfig, dirs: RunDirs) -> dict:
    manifest = shards.read_manifest(dirs.cache)
    check_cache(manifest, cfg.layers, dirs.cache)
    return manifest


def fit_stage(cfg: RunConfig, dirs: RunDirs, device, tracker: Tracker) -> dict[int, dict]:
    manifest = _manifest(cfg, dirs)
    d_model = manifest["d_model"]
    rows = min(split_rows(manifest, "train", n) for n in cfg.layers)
    steps = cfg.trainer.max_steps or max(1, rows // cfg.trainer.batch_size)
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    saes = {}
    for n in cfg.layers:
        saes[n] = TopKSAE(d_model, cfg.sae.d_sae, cfg.sae.k, cfg.sae.activation)
        saes[n].init_weights_(generator=g)
    batches = cached_train_batches(
        dirs.cache, manifest, cfg.layers, cfg.trainer.batch_size, cfg.trainer.shuffle_buffer_shards, cfg.trainer.seed
    )
    summary = fit(saes, batches, cfg.trainer, steps, device, lambda s, m: tracker.log("fit", s, m), tracker.progress)
    for n, sae in saes.items():
        release.save_tensors(dirs.fit / release.layer_filename(n), sae.to_release())
        release.write_sidecar(dirs.fit / f"layer{n}.json", layer_meta(cfg, manifest, n, sae, summary[n]))
    return summary


def evaluate_stage(cfg: RunConfig, dirs: RunDirs, device, tracker: Tracker) -> dict[int, dict]:
    manifest = _manifest(cfg, dirs)
    metrics = {}
    for n in cfg.layers:
        sae = release.load_sae(dirs.fit, layer=n)
        metrics[n] = evaluate_sae(sae, cached_eval_rows(dirs.cache, manifest, n, EVAL_BATCH), device)
        metrics[n]["filters"] = manifest["splits"]["eval"][str(n)]["filters"]
    tracker.log("evaluate", 0, metrics)
    atomic_write_json(dirs.eval / "metrics.json", {"layers": {str(n): m for n, m in metrics.items()}})
    return metrics


def export_stage(cfg: RunConfig, dirs: RunDirs) -> Path:
    eval_file = dirs.eval / "metrics.json"
    metrics = {int(n): m for n, m in read_json(eval_file)["layers"].items()} if eval_file.is_file() else {}
    metas = {}
    for n in cfg.layers:
        src = dirs.fit / release.layer_filename(n)
        if not src.is_file():
            raise FileNotFoundError(f"{src} does not exist: run the fit stage first (stages=[fit,export])")
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
    }
    release.write_model_card(dirs.export, info, {n: m.get("metrics", {}) for n, m in metas.items()})
    print(f"export: {len(metas)} layer files + sidecars + README.md -> {dirs.export}")
    return dirs.export


def release_name(cfg: RunConfig, d_sae: int, k: int) -> str:
    model = cfg.release_model_name or Path(cfg.model.name_or_path.rstrip("/")).name
    if d_sae % 1024 == 0:
        return str(release.ReleaseName.for_sae(model, d_sae, k))
    return f"SAE-Res-{model}-W{d_sae}-L0_{k}"


def layer_meta(cfg: RunConfig, manifest: dict, n: int, sae: TopKSAE, summary: Optional[dict]) -> dict:
    """The layer<n>.json sidecar: what the SAE reads, its shape, and how it was trained."""
    return {
        "format": "qwen-scope layer<n>.sae.pt",
        "release_name": release_name(cfg, sae.d_sae, sae.k),
        "model": manifest["model"],
        "model_revision": manifest.get("revision"),
        "layer": n,
        "hook_point": release.HOOK_POINT,
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "activation": sae.activation.value,
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
