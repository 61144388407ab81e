"""The Qwen-Scope release format: layer<n>.sae.pt files, their validation, naming, sidecars and card.
Finding and loading SAEs from files, directories, hub repos or sparsify runs is load.py's job.

A release file is a torch.save'd flat dict of exactly W_enc (d_sae, d_model), W_dec (d_model,
d_sae), b_enc (d_sae,), b_dec (d_model,), fp32. Everything else goes in layer<n>.json / README.md.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .errors import QScopeError
from .fsutil import atomic_torch_save, atomic_write_json, atomic_write_text, read_json

RELEASE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")

HOOK_POINT = "residual stream: output of decoder layer n (model.layers[n])"
_REPO_NAME = re.compile(r"^SAE-Res-(?P<model>.+)-W(?P<width_k>\d+)K-L0_(?P<k>\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """owner/name as the hub spells it, and not a relative or home path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~", "/"))


class ReleaseFormatError(QScopeError, ValueError):
    """A checkpoint that is not a valid layer<n>.sae.pt; the message names file, key, expected, found."""


@dataclass(frozen=True)
class ReleaseName:
    """SAE-Res-{model}-W{width_k}K-L0_{k}, e.g. SAE-Res-Qwen3-1.7B-Base-W32K-L0_100."""

    model: str
    width_k: int
    k: int

    @classmethod
    def parse(cls, name: str) -> Optional[ReleaseName]:
        """Parse a repo id or directory name (owner prefix and trailing slash ignored); None if no match."""
        m = _REPO_NAME.match(name.rstrip("/").split("/")[-1])
        return cls(m["model"], int(m["width_k"]), int(m["k"])) if m else None

    @classmethod
    def for_sae(cls, model: str, d_sae: int, k: int) -> ReleaseName:
        if d_sae % 1024:
            raise ValueError(f"release names give the width in K (1024s); d_sae={d_sae} is not a multiple of 1024")
        return cls(model, d_sae // 1024, k)

    def __str__(self) -> str:
        return f"SAE-Res-{self.model}-W{self.width_k}K-L0_{self.k}"


def layer_filename(layer: int) -> str:
    return f"layer{layer}.sae.pt"


def sidecar_filename(layer: int) -> str:
    """layer<n>.json: the metadata beside layer<n>.sae.pt (never inside the .pt)."""
    return f"layer{layer}.json"


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """Read and validate one release file; never unpickles code (weights_only=True)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        culprit = next((line for line in lines if "global" in line.lower() and "unsupported" in line.lower()), None)
        raise ReleaseFormatError(
            f"{path}: refused by torch.load(weights_only=True), so it is not a plain dict of tensors "
            f"(it may contain code{': ' + culprit if culprit else ''}); never load it with weights_only=False"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ReleaseFormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    validate(obj, where=str(path))
    return obj


def validate(obj: Any, where: str = "checkpoint") -> tuple[int, int]:
    """Check keys, ranks, agreeing shapes, floating dtype and finite values; return (d_model, d_sae)."""
    if not isinstance(obj, dict):
        raise ReleaseFormatError(
            f"{where}: expected a dict of the four tensors {RELEASE_KEYS}, found {type(obj).__name__}"
        )
    missing = [k for k in RELEASE_KEYS if k not in obj]
    extra = sorted(str(k) for k in obj if k not in RELEASE_KEYS)
    if missing:
        raise ReleaseFormatError(f"{where}: missing key(s) {missing}; expected exactly {list(RELEASE_KEYS)}")
    if extra:
        raise ReleaseFormatError(f"{where}: unexpected key(s) {extra}; expected exactly {list(RELEASE_KEYS)}")
    for key in RELEASE_KEYS:
        t = obj[key]
        if not isinstance(t, Tensor):
            raise ReleaseFormatError(f"{where}: key {key!r}: expected a tensor, found {type(t).__name__}")
        if not t.is_floating_point():
            raise ReleaseFormatError(f"{where}: key {key!r}: expected a floating dtype (float32), found {t.dtype}")
    for key, rank in (("b_enc", 1), ("b_dec", 1), ("W_enc", 2), ("W_dec", 2)):
        if obj[key].dim() != rank:
            raise ReleaseFormatError(
                f"{where}: key {key!r}: expected a {rank}-D tensor, found shape {tuple(obj[key].shape)}"
            )
    d_sae, d_model = obj["b_enc"].shape[0], obj["b_dec"].shape[0]
    for key, want, names in (
        ("W_enc", (d_sae, d_model), "(d_sae, d_model)"),
        ("W_dec", (d_model, d_sae), "(d_model, d_sae)"),
    ):
        got = tuple(obj[key].shape)
        if got != want:
            hint = " (transposed?)" if got == want[::-1] else ""
            raise ReleaseFormatError(
                f"{where}: key {key!r}: expected shape {want} = {names} from b_enc/b_dec, found {got}{hint}"
            )
    for key in RELEASE_KEYS:
        bad = (~torch.isfinite(obj[key])).sum().item()
        if bad:
            raise ReleaseFormatError(f"{where}: key {key!r}: expected finite values, found {bad} NaN/inf entries")
    return d_model, d_sae


def read_sidecar(sae_file: Path) -> Optional[dict]:
    """layer<n>.json beside layer<n>.sae.pt, if present."""
    side = sae_file.with_name(sae_file.name.replace(".sae.pt", ".json"))
    return read_json(side) if side.is_file() else None


def save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> Path:
    """Write exactly the four tensors, fp32 and contiguous, atomically."""
    out = {key: tensors[key].detach().to(device="cpu", dtype=torch.float32).contiguous() for key in RELEASE_KEYS}
    validate(out, where=str(path))
    return atomic_torch_save(path, out)


def write_sidecar(path: str | Path, meta: dict) -> Path:
    return atomic_write_json(path, meta)


def _layers_text(layers: list[int]) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]} – {layers[-1]} ({len(layers)} layers total)"
    return f"{', '.join(map(str, layers))} ({len(layers)} layers)"


def write_model_card(directory: str | Path, info: dict, layer_metrics: dict[int, dict]) -> Path:
    """README.md for an export directory: the release card's property table plus our metrics.

    info: base_model, d_model, d_sae, k, activation, layers, release_name, tokens_trained, source (opt.).
    """
    d_model, d_sae, k = info["d_model"], info["d_sae"], info["k"]
    expansion = f"{d_sae / d_model:g}×"
    rows = [
        ("Base model", info["base_model"]),
        ("SAE width (d_sae)", d_sae),
        ("Hidden size (d_model)", d_model),
        ("Expansion factor", expansion),
        ("Top-K", k),
        ("Hook point", "Residual stream"),
        ("Layers covered", _layers_text(info["layers"])),
        ("File format", "PyTorch .pt dict"),
    ]
    lines = [
        "---",
        "tags: [sparse-autoencoder, sae, qwen-scope, qscope-train]",
        *([f"base_model: {info['base_model']}"] if is_hub_id(info["base_model"]) else []),
        "---",
        "",
        f"# {info['release_name']}",
        "",
        f"TopK sparse autoencoders on the residual stream of `{info['base_model']}`, one per layer, "
        "in the Qwen-Scope release format. Trained with qscope-train.",
        "",
        "## Model details",
        "",
        "| Property | Value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        f"Encoder: `topk({'relu(' if info['activation'] == 'relu_topk' else ''}x @ W_enc.T + b_enc"
        f"{')' if info['activation'] == 'relu_topk' else ''}, k={k})` scattered into zeros, on raw residuals "
        "(no b_dec subtraction, no input scaling). Decoder: `z @ W_dec.T + b_dec`.",
        "",
        "Each `layer<n>.sae.pt` is a dict of four fp32 tensors: `W_enc` (d_sae, d_model), `W_dec` "
        "(d_model, d_sae), `b_enc` (d_sae,), `b_dec` (d_model,). Training metadata is in `layer<n>.json`.",
    ]
    if info.get("source"):
        lines += [
            "",
            f"Adapted from the SAEs `{info['source']}` by continued training on the residual stream of "
            f"`{info['base_model']}`; see `adapt.json` and `report.md` of the adaptation run for before/after "
            "metrics and feature drift.",
        ]
    if info.get("tokens_trained"):
        lines += ["", f"Activation tokens trained per layer: {info['tokens_trained']:,}"]
    if layer_metrics:
        keys = ["fvu", "mse", "l0", "dead_frac", "delta_ce", "ce_recovered"]
        lines += [
            "",
            "## Held-out metrics",
            "",
            "| layer | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for layer in sorted(layer_metrics):
            m = layer_metrics[layer]
            lines.append(f"| {layer} | " + " | ".join(f"{m[key]:.4g}" if key in m else "-" for key in keys) + " |")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import torch",
        "",
        'sae = torch.load("layer0.sae.pt", map_location="cpu", weights_only=True)',
        "",
        "def get_feature_acts(x):  # x: (..., d_model) residual stream after decoder layer n",
        '    pre = x @ sae["W_enc"].T + sae["b_enc"]',
        *(["    pre = torch.relu(pre)"] if info["activation"] == "relu_topk" else []),
        f"    vals, idx = pre.topk({k}, dim=-1)",
        "    return torch.zeros_like(pre).scatter(-1, idx, vals)",
        "",
        "def reconstruct(z):",
        '    return z @ sae["W_dec"].T + sae["b_dec"]',
        "```",
        "",
    ]
    return atomic_write_text(Path(directory) / "README.md", "\n".join(lines))
