"""The cache stage: run the model over the dataset once and write every layer's activations as shards."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..data.writer import build_cache
from ..lm import load_lm, weights_digest
from ..rundir import RunDirs
from ..tracking import Tracker


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict:
    """Write (or finish, or reuse) the cache under run_dir/cache; every rank writes its own chunks.
    Returns the manifest."""
    lm = load_lm(cfg.model, accelerator.device)
    digest = None
    if accelerator.is_main_process:  # one process reads the weight files; the others get its digest
        digest = weights_digest(cfg.model.name_or_path, cfg.model.revision)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        digest = broadcast_object_list([digest])[0]
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
        digest=digest,
    )
    for split, info in manifest["splits"].items():
        tracker.log("cache", 0, {int(n): lay["filters"] for n, lay in info["layers"].items()}, split=split)
    if accelerator.is_main_process:
        print(summary(manifest, dirs.cache))
    return manifest


def summary(manifest: dict, root: Path) -> str:
    """Tokens per split, bytes per token per layer on disk, the compression ratio and the mean drops."""
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
