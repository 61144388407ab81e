"""Import SAEs saved by EleutherAI sparsify (one `<hookpoint>/cfg.json + sae.safetensors` per layer).

sparsify encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)); folding the b_dec
subtraction into b_enc gives the same function as the release's relu_topk encoder on raw residuals.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .config import Activation
from .errors import InputError, MissingInputError, QScopeError
from .fsutil import read_json
from .release import HOOK_POINT, ReleaseName, layer_filename, save_tensors, sidecar_filename, validate, write_sidecar

SPARSIFY_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"
# sparsify names hookpoints after model.base_model's modules: "layers.5" for Qwen3, "language_model.layers.5"
# for Qwen3.5's multimodal class. Only a whole decoder layer is the residual stream the release reads.
_RESIDUAL_HOOKPOINT = re.compile(r"^(?:[\w.]*\.)?layers\.(\d+)$")
# cfg.json flags that change what the SAE computes, so the release's four tensors cannot express them.
_REFUSED_FLAGS = {
    "transcode": "a transcoder predicts another module's output, not its own input",
    "skip_connection": "a skip connection adds x @ W_skip.T to the output",
    "signed": "signed top-k (by |pre|, no ReLU) is not a release encoder",
}


class SparsifyFormatError(QScopeError, ValueError):
    """A sparsify checkpoint that cannot be folded into the release format; names the file and the culprit."""


def is_sparsify_dir(path: str | Path) -> bool:
    """A sparsify hookpoint directory, or a run directory holding some."""
    path = Path(path)
    return path.is_dir() and (
        (path / CFG_FILE).is_file() or any(p.is_dir() and (p / CFG_FILE).is_file() for p in path.iterdir())
    )


def _read_cfg(hook_dir: Path) -> dict[str, Any]:
    cfg_path = hook_dir / CFG_FILE
    if not cfg_path.is_file():
        raise MissingInputError(f"{cfg_path} does not exist: not a sparsify hookpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsifyFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SparsifyFormatError(f"{cfg_path}: expected a JSON object, found {type(cfg).__name__}")
    for flag, why in _REFUSED_FLAGS.items():
        if cfg.get(flag):
            raise SparsifyFormatError(f"{cfg_path}: {flag}=true is not supported ({why})")
    activation = cfg.get("activation", "topk")  # absent in sparsify versions before groupmax existed
    if activation != "topk":
        raise SparsifyFormatError(
            f"{cfg_path}: activation {activation!r} is not supported (only 'topk' folds into a release)"
        )
    for key in ("d_in", "k"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise SparsifyFormatError(f"{cfg_path}: key {key!r}: expected a positive integer, found {cfg.get(key)!r}")
    return cfg


def _read_weights(hook_dir: Path) -> dict[str, Tensor]:
    path = hook_dir / WEIGHTS_FILE
    if not path.is_file():
        raise MissingInputError(
            f"{path} does not exist: a sparsify hookpoint directory holds cfg.json and {WEIGHTS_FILE}"
        )
    try:
        weights = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise SparsifyFormatError(f"{path}: not a readable safetensors file ({e})") from None
    if "W_skip" in weights:
        raise SparsifyFormatError(
            f"{path}: holds 'W_skip' (a skip connection), which the release format cannot express"
        )
    missing = [key for key in SPARSIFY_KEYS if key not in weights]
    extra = sorted(key for key in weights if key not in SPARSIFY_KEYS)
    if missing:
        raise SparsifyFormatError(f"{path}: missing key(s) {missing}; expected exactly {list(SPARSIFY_KEYS)}")
    if extra:
        raise SparsifyFormatError(f"{path}: unexpected key(s) {extra}; expected exactly {list(SPARSIFY_KEYS)}")
    return weights


def _cfg_d_sae(cfg: dict[str, Any]) -> Optional[int]:
    """The latent count cfg.json implies, if it says: num_latents, else d_sae (old EleutherAI/sae), else d_in x expansion."""
    for key in ("num_latents", "d_sae"):  # sparsify writes num_latents=0 to mean "use expansion_factor"
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    factor = cfg.get("expansion_factor")
    return cfg["d_in"] * factor if isinstance(factor, int) and factor > 0 else None


def _check_shapes(weights: dict[str, Tensor], cfg: dict[str, Any], hook_dir: Path) -> None:
    """Shapes agree with each other and with cfg.json, and k fits."""
    d_in = cfg["d_in"]
    bias = weights["encoder.bias"]
    want_sae = _cfg_d_sae(cfg) or (bias.shape[0] if bias.dim() == 1 else weights["encoder.weight"].shape[0])
    for key, want in (
        ("encoder.weight", (want_sae, d_in)),
        ("encoder.bias", (want_sae,)),
        ("W_dec", (want_sae, d_in)),
        ("b_dec", (d_in,)),
    ):
        got = tuple(weights[key].shape)
        if got != want:
            raise SparsifyFormatError(
                f"{hook_dir / WEIGHTS_FILE}: key {key!r}: expected shape {want} from cfg.json "
                f"(d_in={d_in}, d_sae={want_sae}), found {got}"
            )
        if not weights[key].is_floating_point():
            raise SparsifyFormatError(
                f"{hook_dir / WEIGHTS_FILE}: key {key!r}: expected a float dtype, found {weights[key].dtype}"
            )
    if cfg["k"] > want_sae:
        raise SparsifyFormatError(f"{hook_dir / CFG_FILE}: k={cfg['k']} exceeds the {want_sae} latents")


def from_sparsify(path: str | Path) -> tuple[dict[str, Tensor], int, Activation]:
    """The four fp32 release tensors, k and activation (relu_topk) of one sparsify hookpoint directory.

    b_enc = encoder.bias - encoder.weight @ b_dec moves sparsify's input centering into the bias.
    """
    hook_dir = Path(path)
    cfg = _read_cfg(hook_dir)
    weights = _read_weights(hook_dir)
    _check_shapes(weights, cfg, hook_dir)
    # float64 for the fold: checkpoints may be bf16, and the bias should not pick up rounding from it.
    W, b, W_dec, b_dec = (weights[key].double() for key in SPARSIFY_KEYS)
    tensors = {"W_enc": W, "b_enc": b - W @ b_dec, "W_dec": W_dec.T, "b_dec": b_dec}
    tensors = {key: t.float().contiguous() for key, t in tensors.items()}
    validate(tensors, where=str(hook_dir / WEIGHTS_FILE))
    return tensors, cfg["k"], Activation.relu_topk


def hookpoint_layer(name: str) -> Optional[int]:
    """The decoder layer index of a residual-stream hookpoint name (layers.5, model.layers.5, ...), else None."""
    m = _RESIDUAL_HOOKPOINT.match(name)
    return int(m[1]) if m else None


def sparsify_layers(path: str | Path) -> dict[int, Path]:
    """Layer index -> hookpoint directory, for a sparsify run directory or one hookpoint directory.

    Hookpoints that are not a whole decoder layer (layers.5.mlp, embed_tokens) are left out.
    """
    path = Path(path)
    if (path / CFG_FILE).is_file():
        layer = hookpoint_layer(path.name)
        if layer is None:
            raise InputError(f"{path}: cannot tell the layer of this hookpoint (its name should end in layers.<n>)")
        return {layer: path}
    if not path.is_dir():
        raise MissingInputError(f"{path} is not a directory")
    hookpoints = sorted(p for p in path.iterdir() if p.is_dir() and (p / CFG_FILE).is_file())
    layers: dict[int, Path] = {}
    for hook_dir in hookpoints:
        layer = hookpoint_layer(hook_dir.name)
        if layer is not None and layer in layers:
            raise InputError(f"{path}: hookpoints {layers[layer].name!r} and {hook_dir.name!r} both name layer {layer}")
        if layer is not None:
            layers[layer] = hook_dir
    if not layers:
        names = [p.name for p in hookpoints]
        raise MissingInputError(
            f"{path}: no residual-stream hookpoint directories (layers.<n>/{CFG_FILE}); found {names or 'none'}"
        )
    return dict(sorted(layers.items()))


def sparsify_hookpoint(path: str | Path, layer: Optional[int]) -> Path:
    """The hookpoint directory for `layer` in a sparsify run directory (or `path` itself if it is one)."""
    path = Path(path)
    if (path / CFG_FILE).is_file() and layer is None:
        return path
    layers = sparsify_layers(path)
    if layer is None:
        raise InputError(f"{path} is a sparsify run directory: say which layer to load (it has {list(layers)})")
    if layer not in layers:
        raise MissingInputError(f"{path}: no sparsify hookpoint for layer {layer}; it has layers {list(layers)}")
    return layers[layer]


def import_sparsify(
    src: str | Path, out_dir: str | Path, layers: Optional[Sequence[int]] = None, model_name: Optional[str] = None
) -> dict[int, Path]:
    """Write layer<n>.sae.pt + layer<n>.json for each (chosen) layer of a sparsify run; return the .pt paths."""
    found = sparsify_layers(src)
    chosen = sorted(found) if layers is None else sorted(set(layers))
    if missing := [n for n in chosen if n not in found]:
        raise MissingInputError(f"{src}: no sparsify hookpoint for layer(s) {missing}; it has layers {list(found)}")
    out_dir = Path(out_dir)
    written = {}
    for n in chosen:
        tensors, k, activation = from_sparsify(found[n])
        written[n] = save_tensors(out_dir / layer_filename(n), tensors)
        meta = _sidecar(src, found[n], n, tensors["W_enc"].shape, k, activation, model_name)
        write_sidecar(out_dir / sidecar_filename(n), meta)
    return written


def _sidecar(
    src: str | Path,
    hook_dir: Path,
    n: int,
    shape: tuple[int, int],
    k: int,
    activation: Activation,
    model_name: Optional[str],
) -> dict[str, Any]:
    """layer<n>.json: the keys export writes, plus where the SAE came from and sparsify's own cfg.json."""
    d_sae, d_model = shape
    meta = {
        "format": "qwen-scope layer<n>.sae.pt",
        "imported_from": str(src),
        "source_format": "eleutherai-sparsify",
        "hookpoint": hook_dir.name,
        "model": model_name,
        "layer": n,
        "hook_point": HOOK_POINT,
        "d_model": d_model,
        "d_sae": d_sae,
        "k": k,
        "activation": activation.value,
        "sparsify_cfg": json.loads((hook_dir / CFG_FILE).read_text()),
    }
    if model_name and d_sae % 1024 == 0:
        meta["release_name"] = str(ReleaseName.for_sae(model_name.rstrip("/").split("/")[-1], d_sae, k))
    return meta


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qscope_train.convert",
        description="Convert other libraries' SAE checkpoints to the release format.",
    )
    sub = parser.add_subparsers(dest="source_format", required=True)
    sp = sub.add_parser(
        "sparsify",
        help="EleutherAI sparsify run directory (layers.<n>/cfg.json + sae.safetensors)",
        description="Fold sparsify's b_dec input centering into b_enc and write layer<n>.sae.pt + layer<n>.json.",
    )
    sp.add_argument("src", help="sparsify run directory (or one hookpoint directory such as layers.5)")
    sp.add_argument("out", help="output directory for layer<n>.sae.pt and layer<n>.json")
    sp.add_argument("--layers", type=int, nargs="+", help="layer indices to import (default: every residual hookpoint)")
    sp.add_argument("--model-name", help="base model name or hub id, recorded in the sidecars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        written = import_sparsify(args.src, args.out, args.layers, args.model_name)
    except QScopeError as e:  # the user's input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    side = read_json(Path(args.out) / sidecar_filename(next(iter(written))))
    print(
        f"imported {len(written)} sparsify layer(s) {list(written)} from {args.src} -> {args.out} "
        f"(d_model={side['d_model']}, d_sae={side['d_sae']}, k={side['k']}, activation={side['activation']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
