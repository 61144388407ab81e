"""Command line entry: Hydra composes configs/ into a typed RunConfig, one Accelerator, then pipeline.run.

This is the only module that imports hydra or omegaconf.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import timedelta

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import RunConfig, register_configs
from .errors import QScopeError

CONFIG_MODULE = "qscope_train.configs"
# Ranks wait at barriers while others finish their share of the cache or of the layers; after a
# resume one rank may have far more left than another, so wait hours, not NCCL's default minutes.
BARRIER_TIMEOUT = timedelta(hours=6)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and build the dataclasses, which runs their __post_init__ checks."""
    return OmegaConf.to_object(cfg)


def compose(overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig that `qscope-train <overrides>` would run, for tests and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return to_run_config(hydra_compose("config", overrides=list(overrides)))


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


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from .pipeline import run

    try:
        run_cfg = to_run_config(cfg)
        accelerator = make_accelerator()
        run(run_cfg, accelerator)
        _leave_together(accelerator)
    except QScopeError as e:  # the user's input: one line, no traceback (QSCOPE_DEBUG=1 shows it)
        if os.environ.get("QSCOPE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        print("(set QSCOPE_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
