"""Command line entry: Hydra composes configs/ into a typed RunConfig, one Accelerator, then pipeline.run.

This is the only module that imports hydra or omegaconf, and the only one that changes process-wide
settings (the CPU allocator).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import RunConfig
from .errors import QScopeError

CONFIG_MODULE = "qscope_train.configs"
# Ranks wait at barriers while others finish their share of the cache or of the layers; after a
# resume one rank may have far more left than another, so wait hours, not NCCL's default minutes.
BARRIER_TIMEOUT = timedelta(hours=6)


# Keys that moved to another group; old command lines keep working, with a note naming the new key.
MOVED_KEYS = {
    "data.source": "reader.source",
    "data.shuffle_buffer_tokens": "reader.shuffle_buffer_tokens",
    "data.shuffle_shards": "reader.shuffle_shards",
    "data.reader_threads": "reader.threads",
    "data.on_corrupt": "reader.on_corrupt",
    "data.verify_shards": "reader.verify_shards",
}
_OVERRIDE_KEY = re.compile(r"^(?P<prefix>[~+]*)(?P<key>[\w.]+)(?P<rest>(=.*)?)$", re.DOTALL)


def config_path() -> str:
    """Where Hydra finds the configs: inside the installed package (pkg://qscope_train.configs), or
    beside the package in a source checkout used without installing it (PYTHONPATH=<checkout>, as on
    a machine with no network to install from)."""
    try:
        if importlib.util.find_spec(CONFIG_MODULE) is not None:
            return f"pkg://{CONFIG_MODULE}"
    except ModuleNotFoundError:
        pass
    source = Path(__file__).resolve().parents[1] / "configs"
    return str(source) if (source / "config.yaml").is_file() else f"pkg://{CONFIG_MODULE}"


CONFIG_PATH = config_path()


def register_configs() -> None:
    """Register the schema so that config.yaml's defaults list can start from it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="qscope_schema", node=RunConfig)


def migrate_overrides(overrides: Sequence[str]) -> list[str]:
    """Overrides with moved keys renamed (e.g. data.source=live -> reader.source=live), each noted on stderr."""
    out = []
    for arg in overrides:
        m = _OVERRIDE_KEY.match(arg)
        if m and m["key"] in MOVED_KEYS:
            new = MOVED_KEYS[m["key"]]
            print(f"note: {m['key']} is now {new}; reading {arg!r} as {new}{m['rest']}", file=sys.stderr)
            arg = f"{m['prefix']}{new}{m['rest']}"
        out.append(arg)
    return out


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and build the dataclasses, which runs their __post_init__ checks."""
    return OmegaConf.to_object(cfg)


def compose(overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig that `qscope-train <overrides>` would run, for tests and notebooks."""
    return to_run_config(compose_dict(overrides))


def compose_dict(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config before it becomes a RunConfig (no checks run yet)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    register_configs()
    if CONFIG_PATH.startswith("pkg://"):
        where = initialize_config_module(CONFIG_MODULE, version_base="1.3")
    else:
        where = initialize_config_dir(CONFIG_PATH, version_base="1.3")
    with where:
        return hydra_compose("config", overrides=migrate_overrides(overrides))


def make_accelerator():
    """The run's one Accelerator, with the long barrier timeout."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)])


def _leave_together(accelerator) -> None:
    """All ranks tear the process group down together: a rank leaving while another still writes its
    files can abort the gloo or NCCL teardown (seen about once in six 2-process CPU runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from .pipeline import run

    try:
        run_cfg = to_run_config(cfg)
        if run_cfg.plan:  # the plan alone: no process group, no model weights
            from . import plan

            plan.run(run_cfg)
            return
        accelerator = make_accelerator()
        if accelerator.device.type == "cpu":
            from .allocator import keep_freed_memory_on_cpu

            keep_freed_memory_on_cpu()  # the training step's large temporaries stay in glibc's heap
        run(run_cfg, accelerator)
        _leave_together(accelerator)
    except QScopeError as e:  # the user's input: one line, no traceback (QSCOPE_DEBUG=1 shows it)
        if os.environ.get("QSCOPE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        print("(set QSCOPE_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


_UNSET_SIDE = re.compile(r"^compare\.(a|b)(=|\.)")


def unset_compare_side(overrides: Sequence[str]) -> Optional[str]:
    """A one-line error for overrides that set a key of compare.a / compare.b while the composed config
    leaves that side unset (OmegaConf cannot merge keys into a None node and fails with a traceback); None
    when there is nothing to say. Composes the other overrides once, only when such an override exists."""
    sides = {m[1] for arg in overrides if (m := _UNSET_SIDE.match(arg))}
    if not sides:
        return None
    others = [arg for arg in overrides if not _UNSET_SIDE.match(arg)]
    try:
        cfg = compose_dict(others)
    except Exception:  # noqa: BLE001 - the real run reports the other overrides' own errors
        return None
    for side in sorted(sides):
        if getattr(cfg.compare, side) is None:
            presets = _data_presets()
            shown = f" (presets: {', '.join(presets)})" if presets else ""
            return (
                f"compare.{side} is unset in this experiment, so its keys cannot be set one by one: choose a data "
                f"preset first, then override its keys, e.g. +data@compare.{side}=<preset>{shown} "
                f"compare.{side}.dataset=<files or hub id>"
            )
    return None


def _data_presets() -> list[str]:
    from importlib.resources import files

    try:
        names = [p.name for p in files(CONFIG_MODULE).joinpath("data").iterdir()]
    except (ModuleNotFoundError, FileNotFoundError):
        names = [p.name for p in (Path(__file__).resolve().parents[1] / "configs" / "data").iterdir()]
    return sorted(n.removesuffix(".yaml") for n in names if n.endswith(".yaml"))


def main() -> None:
    register_configs()
    sys.argv[1:] = migrate_overrides(sys.argv[1:])
    problem = unset_compare_side(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
