"""The run directory's layout and the checks on what earlier stages left there."""

from __future__ import annotations

from pathlib import Path

from . import release, shards
from .config import RunConfig
from .errors import InputError, MissingInputError


class RunDirs:
    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir
        self.cache, self.fit, self.eval, self.export = (run_dir / s for s in ("cache", "fit", "eval", "export"))


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
    path = dirs.fit / release.layer_filename(n)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist: run the fit stage first (stages=[fit,{stage}])")
    return path
