"""Every path of a run directory, and the "run stage X first" checks on what earlier stages left there.

run_dir/cache/   manifest.json + {train,eval}/layer<n>/shard-*.zst + progress/       (cache)
run_dir/fit/     layer<n>.sae.pt + layer<n>.json + checkpoints/                       (fit)
run_dir/eval/    eval.json + firing.pt + report.md + *.png                            (evaluate)
run_dir/export/  layer<n>.sae.pt + layer<n>.json + README.md                          (export)
run_dir/         adapt.json + report.md + *.png (adapt), log.jsonl, .hydra/
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Optional

from .config import RunConfig
from .data import shards
from .errors import ConfigError, InputError, MissingInputError
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


def node_name() -> str:
    """This process's node: its host name, with the launcher's node rank where torchrun set one (GROUP_RANK;
    two launches on one machine are then two nodes)."""
    group = os.environ.get("GROUP_RANK")
    return socket.gethostname() + (f" (node {group})" if group is not None else "")


def check_shared(root: Path, accelerator) -> dict[str, list[int]]:
    """With several processes, prove that they all see one run directory: the main process writes a file
    with a fresh name there and every process looks for it. Processes on a node whose run_dir is a local
    disk (or another mount) do not see it: every process then raises the same ConfigError naming the hosts
    and processes that could not, before any stage writes anything. Returns {host: [global ranks]}."""
    if accelerator.num_processes == 1:
        return {node_name(): [0]}
    from accelerate.utils import broadcast_object_list, gather_object

    root.mkdir(parents=True, exist_ok=True)
    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]
    probe = root / f".shared-check-{token}"
    if accelerator.is_main_process:
        probe.write_text(token)
    accelerator.wait_for_everyone()
    try:
        seen = probe.is_file() and probe.read_text() == token
    except OSError:
        seen = False
    me = (accelerator.process_index, node_name(), seen)
    everyone = gather_object([me])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    hosts: dict[str, list[int]] = {}
    for rank, host, _ in sorted(everyone):
        hosts.setdefault(host, []).append(rank)
    blind = [(rank, host) for rank, host, ok in sorted(everyone) if not ok]
    if blind:
        main_host = next(host for rank, host, _ in everyone if rank == 0)
        who = ", ".join(f"process {rank} on {host}" for rank, host in blind)
        raise ConfigError(
            f"run_dir={root} is not one directory for every process: {who} cannot see the file process 0 on "
            f"{main_host} wrote there. Put run_dir on a filesystem every node mounts (NFS, Lustre, GPFS, a "
            f"cluster's shared scratch) and pass each node its path there"
        )
    return hosts
