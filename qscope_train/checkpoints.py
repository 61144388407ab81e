"""Training checkpoints: atomic step-<n>.pt files holding every layer's SAE, optimizer, schedule and
dead-latent counters plus each rank's reader position, refused when the run's settings differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed
from .config import fingerprint_diff
from .data.batches import BatchSource
from .errors import InputError
from .fsutil import atomic_torch_save, atomic_write_json


class Checkpoints:
    """Atomic step-<n>.pt files in one directory, the last `keep` kept, refused if the settings differ."""

    def __init__(self, directory: Path, every: int, keep: int, fingerprint: dict) -> None:
        self.dir, self.every, self.keep, self.fingerprint = Path(directory), every, keep, fingerprint

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.pt"))

    def latest(self) -> Optional[dict]:
        files = self._files()
        if not files:
            return None
        ckpt = torch.load(files[-1], map_location="cpu", weights_only=True, mmap=True)
        if ckpt["fingerprint"] != self.fingerprint:
            raise InputError(
                f"{files[-1]} was written by a run with other settings; delete {self.dir} to start over "
                f"(differs: {fingerprint_diff(ckpt['fingerprint'], self.fingerprint)})"
            )
        return ckpt

    def save(self, step: int, payload: dict) -> Path:
        payload = {"fingerprint": self.fingerprint, "step": step, **payload}
        path = atomic_torch_save(self.dir / f"step-{step:09d}.pt", payload)
        atomic_write_json(self.dir / "latest.json", {"step": step, "file": path.name})
        for old in self._files()[: -self.keep]:
            old.unlink()
        return path


def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().cpu()


def state_payload(states: dict[int, Any], position: Optional[dict]) -> dict:
    """What a checkpoint holds of the trainer's LayerStates (typed loosely: trainer imports this module).
    position: this rank's reader state after the last trained batch (None if
    its source cannot seek); every rank's is gathered, in rank order."""
    layers = {
        str(n): {
            "sae": s.sae.state_dict(),
            "opt": s.opt.state_dict(),
            "sched": s.sched.state_dict(),
            "since_fired": s.since_fired_F.cpu(),
            "tokens": s.tokens,
            "fvu_ema": _cpu(s.fvu_ema),
            "resid_var": _cpu(s.resid_var),
        }
        for n, s in states.items()
    }
    return {"layers": layers, "readers": distributed.gather(position)}


def restore(states: dict[int, Any], reader: BatchSource, ckpt: dict) -> None:
    """Put every layer and this rank's reader back where the checkpoint left them."""
    for n, s in states.items():
        saved = ckpt["layers"][str(n)]
        s.sae.load_state_dict(saved["sae"])
        s.opt.load_state_dict(saved["opt"])
        s.sched.load_state_dict(saved["sched"])
        s.since_fired_F.copy_(saved["since_fired"])
        s.tokens = saved["tokens"]
        device = s.since_fired_F.device
        for key in ("fvu_ema", "resid_var"):  # plain floats or absent in checkpoints of earlier versions
            value = saved.get(key)
            setattr(s, key, None if value is None else torch.as_tensor(value, dtype=torch.float32).to(device))
    readers = ckpt["readers"]
    if len(readers) != distributed.world():
        raise InputError(f"the checkpoint was written by {len(readers)} processes, this run has {distributed.world()}")
    if readers[distributed.rank()] is not None:
        reader.load_state_dict(readers[distributed.rank()])
    else:
        print("resume: this activation source cannot seek, so its stream starts again from the beginning")
