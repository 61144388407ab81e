"""Find and load SAEs from anywhere: a layer<n>.sae.pt file, a release directory, a hub repo id, or an
EleutherAI sparsify run (folded on the fly by convert.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from . import convert
from .config import Activation
from .errors import InputError, MissingInputError, QScopeError
from .release import ReleaseName, is_hub_id, layer_filename, load_tensors, read_sidecar
from .sae import TopKSAE


def resolve(source: str | Path, layer: Optional[int] = None, revision: Optional[str] = None) -> Path:
    """A local path for `source`: a .pt file, a directory (+ layer), or a hub repo id (+ layer).

    Hub files come through huggingface_hub, which serves its local cache when HF_HUB_OFFLINE=1.
    A sparsify run directory (+ layer) resolves to its hookpoint directory (layers.<n>/), the only
    case where the result is a directory.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if convert.is_sparsify_dir(path):
            return convert.sparsify_hookpoint(path, layer)
        if layer is None:
            raise InputError(f"{path} is a directory: say which layer to load (layer<n>.sae.pt)")
        file = path / layer_filename(layer)
        if not file.is_file():
            found = sorted(p.name for p in path.glob("layer*.sae.pt"))
            raise MissingInputError(f"{file} does not exist; the directory holds {found or 'no layer*.sae.pt files'}")
        return file
    if is_hub_id(str(source)):
        if layer is None:
            raise InputError(f"hub repo {source}: say which layer to load (layer<n>.sae.pt)")
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(source), layer_filename(layer), revision=revision))
    raise MissingInputError(f"SAE source {str(source)!r} is neither an existing file or directory nor a hub repo id")


def infer_k(source: str | Path, sae_file: Path) -> Optional[int]:
    """k from the sidecar, else from a release-style name of the source or its directory."""
    side = read_sidecar(sae_file)
    if side and "k" in side:
        return int(side["k"])
    for name in (str(source), sae_file.parent.name, *(p.name for p in sae_file.parents)):
        parsed = ReleaseName.parse(name)
        if parsed:
            return parsed.k
    return None


def load_sae(
    source: str | Path,
    layer: Optional[int] = None,
    k: Optional[int] = None,
    activation: Optional[Activation] = None,
    revision: Optional[str] = None,
    default_activation: Activation = Activation.topk,
) -> TopKSAE:
    """A TopKSAE from a release file, directory + layer, or hub repo id + layer.

    k and activation default to the sidecar's (layer<n>.json), else k comes from a release-style
    name and the activation is default_activation (the card's plain top-k unless told otherwise).
    A sparsify directory is folded on the fly (convert.from_sparsify): its cfg.json gives k, relu_topk.
    """
    file = resolve(source, layer, revision)
    if file.is_dir():  # resolve returns a directory only for a sparsify hookpoint
        tensors, sparsify_k, sparsify_activation = convert.from_sparsify(file)
        return TopKSAE.from_release(tensors, k or sparsify_k, activation or sparsify_activation)
    tensors = load_tensors(file)
    if k is None:
        k = infer_k(source, file)
    if k is None:
        raise InputError(
            f"cannot tell k for {file}: no layer<n>.json sidecar and no SAE-Res-...-L0_<k> name; pass k explicitly"
        )
    if activation is None:
        side = read_sidecar(file) or {}
        activation = Activation(side.get("activation", default_activation.value))
    return TopKSAE.from_release(tensors, k, activation)


def load_saes(
    source: str | Path,
    layers: Sequence[int],
    revision: Optional[str] = None,
    default_activation: Activation = Activation.topk,
) -> dict[int, TopKSAE]:
    """load_sae for each layer of one source (release directory, hub repo id or sparsify run)."""
    return {n: load_sae(source, layer=n, revision=revision, default_activation=default_activation) for n in layers}


def check_d_model(saes: dict[int, TopKSAE], source: str | Path, d_model: int, model: str) -> None:
    """Refuse SAEs whose d_model is not the model's: they were trained on another model."""
    for n, sae in saes.items():
        if sae.d_model != d_model:
            raise InputError(
                f"{source} layer {n} has d_model {sae.d_model}, but {model!r} has d_model {d_model}: "
                "the SAE was trained on another model"
            )


def source_model(source: str | Path, layer: int, revision: Optional[str] = None) -> Optional[str]:
    """The model an SAE release was trained on: its sidecar's `model`, else the model in a release-style name."""
    try:
        side = read_sidecar(resolve(source, layer, revision))
    except QScopeError:
        side = None
    if side and side.get("model"):
        return str(side["model"])
    parsed = ReleaseName.parse(str(source))
    return parsed.model if parsed else None
