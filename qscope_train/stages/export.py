"""The export stage: copy the fit stage's layer files into export/ with sidecars that carry the held-out
metrics (when the evaluate stage ran) and a README.md model card in the release's style."""

from __future__ import annotations

from pathlib import Path

from .. import release
from ..config import RunConfig
from ..fsutil import read_json
from ..metrics import scalar_metrics
from ..rundir import RunDirs, eval_result, fit_file
from ..tracking import Tracker


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> Path:
    """Returns the export directory."""
    result = eval_result(dirs)
    trained = (result or {}).get("sets", {}).get("trained", {}).get("layers", {})
    metrics = {int(n): scalar_metrics(m) for n, m in trained.items()}
    metas = {}
    for n in cfg.layers:
        release.save_tensors(dirs.sae_file(dirs.export, n), release.load_tensors(fit_file(dirs, n, "export")))
        meta = read_json(dirs.sidecar(dirs.fit, n))
        if n in metrics:
            meta["metrics"] = metrics[n]
        release.write_sidecar(dirs.sidecar(dirs.export, n), meta)
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
        "source": first.get("init_from"),
    }
    release.write_model_card(dirs.export, info, {n: m.get("metrics", {}) for n, m in metas.items()})
    print(f"export: {len(metas)} layer files + sidecars + README.md -> {dirs.export}")
    return dirs.export
