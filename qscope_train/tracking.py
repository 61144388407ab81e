"""Run logging: a JSONL log in the run directory, tqdm progress bars, and (only here) wandb."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from .config import WandbConfig, WandbMode


class Tracker:
    """Per-step metrics {layer: {name: value}} go to log.jsonl and, when enabled, to wandb."""

    def __init__(
        self, run_dir: Path, wandb_cfg: WandbConfig, run_name: str, config: dict, is_main: bool = True
    ) -> None:
        self.is_main = is_main
        self.path = run_dir / "log.jsonl"
        self._wandb = None
        self._wandb_step = 0
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_cfg.mode is not WandbMode.disabled:
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=run_name,
                mode=wandb_cfg.mode.value,
                dir=str(run_dir),
                config=config,
            )

    def log(self, stage: str, step: int, metrics: dict[Any, dict], **extra: Any) -> None:
        if not self.is_main:
            return
        record = {
            "time": round(time.time(), 3),
            "stage": stage,
            "step": step,
            **extra,
            "layers": {str(k): v for k, v in metrics.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            # wandb refuses steps that go backwards, so a later stage's step 0 is logged at the latest step;
            # extra labels (e.g. the cache split) become part of the key so splits do not overwrite each other.
            prefix = "/".join([stage, *(str(v) for v in extra.values())])
            flat = {
                f"{prefix}/layer{layer}/{name}": value
                for layer, m in metrics.items()
                for name, value in m.items()
                if isinstance(value, (int, float))
            }
            self._wandb_step = max(self._wandb_step, step)
            self._wandb.log(flat, step=self._wandb_step)

    def progress(self, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0):
        if not self.is_main:
            return NullBar()
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
            initial=initial,
        )

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class NullBar:
    """A progress bar that shows nothing: for ranks other than the main one, scripts and tests.

    Use the class itself where a `progress(total=..., desc=..., unit=...)` callable is expected.
    """

    def __init__(self, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass
