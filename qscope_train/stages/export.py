"""The export stage: copy the fit stage's layer files into export/ with sidecars that carry the held-out
metrics (when the evaluate stage ran) and a README.md model card in the release's style."""

from __future__ import annotations

from pathlib import Path

from .. import release
from ..config import RunConfig
from ..errors import ConfigError, InputError
from ..fsutil import atomic_write_json, read_json
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
    if cfg.export.push_to_hub is not None:
        push(cfg, dirs.export, cfg.layers, info)
    return dirs.export


def check_push_target(cfg: RunConfig) -> None:
    """Refuse an export.push_to_hub that is not owner/SAE-Res-<model>-W<N>K-L0_<k>, before any stage runs."""
    repo = cfg.export.push_to_hub
    if repo is not None and (not release.is_hub_id(repo) or release.ReleaseName.parse(repo) is None):
        raise ConfigError(
            f"export.push_to_hub={repo!r} must be owner/SAE-Res-<model>-W<N>K-L0_<k> "
            "(e.g. me/SAE-Res-Qwen3-1.7B-Instruct-W32K-L0_100): SAELens's qwen_scope converter reads the "
            "width and k from that name"
        )


def push(cfg: RunConfig, folder: Path, layers: list[int], info: dict) -> list[str]:
    """Upload the export's layer files, sidecars and card to export.push_to_hub (or, with export.dry_run,
    print and record the plan in push_plan.json); returns the files. The repo name must state this
    export's width and k, as the release names do, or SAELens would load it with the wrong shape."""
    check_push_target(cfg)
    repo = cfg.export.push_to_hub
    name = release.ReleaseName.parse(repo)
    if (name.width_k * 1024, name.k) != (info["d_sae"], info["k"]):
        raise InputError(
            f"export.push_to_hub={repo!r} names width {name.width_k}K and k {name.k}, but these SAEs have "
            f"d_sae {info['d_sae']} and k {info['k']}: use {repo.split('/')[0]}/"
            f"{release.ReleaseName.for_sae(name.model, info['d_sae'], info['k'])}"
        )
    files = [release.layer_filename(n) for n in layers] + [release.sidecar_filename(n) for n in layers] + ["README.md"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise InputError(f"cannot push {folder}: {missing} missing (run the export stage)")
    plan = {"repo_id": repo, "private": cfg.export.private, "files": sorted(files), "dry_run": cfg.export.dry_run}
    atomic_write_json(folder / "push_plan.json", plan)
    if cfg.export.dry_run:
        print(f"export: dry run, would upload to https://huggingface.co/{repo}: {', '.join(sorted(files))}")
        return sorted(files)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=cfg.export.private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, allow_patterns=files, commit_message="qscope-train export")
    print(f"export: uploaded {len(files)} files to https://huggingface.co/{repo}")
    return sorted(files)
