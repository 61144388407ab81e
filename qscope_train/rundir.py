"""Every path of a run directory, and the "run stage X first" checks on what earlier stages left there.

run_dir/cache/   manifest.json + {train,eval}/layer<n>/shard-*.zst + progress/       (cache)
run_dir/fit/     layer<n>.sae.pt + layer<n>.json + checkpoints/                       (fit)
run_dir/eval/    eval.json + firing.pt + report.md + *.png                            (evaluate)
run_dir/export/  layer<n>.sae.pt + layer<n>.json + README.md                          (export)
run_dir/         adapt.json + report.md + *.png (adapt), log.jsonl, .hydra/
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import RunConfig
from .data import shards
from .errors import InputError, MissingInputError
from .fsutil import read_json
from .release import layer_filename, sidecar_filename


class RunDirs:
    def __init__(self, run_dir: Path) -> None:
        self.root = Path(run_dir)
        self.cache, self.fit, self.eval, self.export = (self.root / s for s in ("cache", "fit", "eval", "export"))
        self.checkpoints = self.fit / "checkpoints"
        self.eval_json, self.firing = self.eval / "eval.json", self.eval / "firing.pt"
        self.adapt_json = self.root / "adapt.json"

    @staticmethod
    def sae_file(directory: Path, layer: int) -> Path:
        return directory / layer_filename(layer)

    @staticmethod
    def sidecar(directory: Path, layer: int) -> Path:
        return directory / sidecar_filename(layer)


def cache_manifest(cfg: RunConfig, dirs: RunDirs) -> dict:
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


def fit_file(dirs: RunDirs, n: int, stage: str) -> Path:
    path = dirs.sae_file(dirs.fit, n)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist: run the fit stage first (stages=[fit,{stage}])")
    return path


def eval_result(dirs: RunDirs) -> Optional[dict]:
    """eval/eval.json as the evaluate stage wrote it, or None if it has not run."""
    return read_json(dirs.eval_json) if dirs.eval_json.is_file() else None
