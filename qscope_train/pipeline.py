"""The recipe: the configured stages in order, cache -> fit -> evaluate -> export -> adapt -> browse -> compare, each reading and
writing the run directory (its layout is in rundir.py; each stage is a module of stages/)."""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig, Stage, to_plain
from .rundir import RunDirs, check_shared
from .stages import adapt, browse, cache, compare, evaluate, export, fit
from .tracking import Tracker


def run(cfg: RunConfig, accelerator) -> dict:
    """Run the configured stages; returns the evaluation result (eval.json's content; empty if not evaluated)."""
    if Stage.fit in cfg.stages:
        fit.check_processes(cfg, accelerator.num_processes)  # before caching, so a bad launch wastes nothing
    if Stage.export in cfg.stages:
        export.check_push_target(cfg)
    dirs = RunDirs(Path(cfg.run_dir))
    hosts = check_shared(dirs.root, accelerator)  # before any stage writes: nodes must share run_dir
    if accelerator.is_main_process and accelerator.num_processes > 1:
        print(f"run: {accelerator.num_processes} processes on {len(hosts)} node(s), one run_dir: {dirs.root}")
    tracker = Tracker(dirs.root, cfg.wandb, cfg.name, to_plain(cfg), accelerator.is_main_process)
    result: dict = {}
    try:
        # every process: each rank caches its own chunks, then trains its share
        if Stage.cache in cfg.stages:
            cache.run(cfg, dirs, accelerator, tracker)
        if Stage.fit in cfg.stages:
            fit.run(cfg, dirs, accelerator, tracker)
        accelerator.wait_for_everyone()
        # held-out evaluation, export and the adaptation report are small: the main process does them alone
        if accelerator.is_main_process:
            if Stage.evaluate in cfg.stages:
                result = evaluate.run(cfg, dirs, accelerator, tracker)
            if Stage.export in cfg.stages:
                export.run(cfg, dirs, accelerator, tracker)
            if Stage.adapt in cfg.stages:
                adapt.run(cfg, dirs, accelerator, tracker)
            if Stage.browse in cfg.stages:
                browse.run(cfg, dirs, accelerator, tracker)
            if Stage.compare in cfg.stages:
                compare.run(cfg, dirs, accelerator, tracker)
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
    return result
