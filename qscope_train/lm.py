"""Load Qwen3 / Qwen3.5 models, find their text decoder layers, and capture layer outputs by hooks.

The residual stream after block n is the output of layers[n]; hidden_states[-1] from transformers
is taken after the final norm, so it is never used. The forward stops after the deepest layer asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import InputError, MissingInputError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_5", "qwen3_5_text")


class LoadedLM(NamedTuple):
    model: nn.Module
    tokenizer: object
    layers: nn.ModuleList
    d_model: int
    name: str


def is_local_path(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).expanduser().exists()


def load_lm(cfg: ModelConfig, device: torch.device | str = "cpu") -> LoadedLM:
    """AutoModelForCausalLM + AutoTokenizer from a local directory or hub id; eval mode, no KV cache."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = cfg.name_or_path
    if is_local_path(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise MissingInputError(
                f"model.name_or_path={source!r}: no config.json there. For the tiny offline models run "
                "`make fixtures` (or `python scripts/make_tiny_model.py`); for a real model give a hub id "
                "such as Qwen/Qwen3-1.7B-Base."
            )
        source = str(path)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(source, **kwargs)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"model {cfg.name_or_path!r} has model_type {config.model_type!r}; qscope-train supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen3 and Qwen3.5)"
        )
    # straight onto the device in the preset dtype: no full copy in host memory first
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=cfg.dtype.torch, device_map={"": torch.device(device)}, **kwargs
    )
    model.eval().requires_grad_(False)
    warn_if_slow_linear_attention(config, device)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    layers = find_decoder_layers(model)
    d_model = model.config.get_text_config().hidden_size
    return LoadedLM(model, tokenizer, layers, d_model, cfg.name_or_path)


# Qwen3.5's Gated DeltaNet layers run transformers' slow torch path unless both are importable
FAST_LINEAR_ATTENTION = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


def warn_if_slow_linear_attention(config, device: torch.device | str) -> Optional[str]:
    """On CUDA, warn (and return the message) when a Qwen3.5 model would run its linear-attention layers
    without the fast kernels, naming the extra that installs them."""
    import importlib.util
    import warnings

    text = config.get_text_config()
    if torch.device(device).type != "cuda" or "linear_attention" not in (getattr(text, "layer_types", None) or []):
        return None
    missing = [pkg for mod, pkg in FAST_LINEAR_ATTENTION.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return None
    n = list(text.layer_types).count("linear_attention")
    msg = (
        f"{n} of this model's {len(text.layer_types)} layers are Gated DeltaNet, which run transformers' slow "
        f"torch implementation without {' and '.join(missing)}: pip install 'qscope-train[gpu]'"
    )
    warnings.warn(msg, stacklevel=3)
    return msg


def weights_digest(name_or_path: str, revision: Optional[str] = None) -> str:
    """Names these exact weights, so a cache made from other weights at the same path is never reused.

    A local directory: sha256 over each weight file's name, size and bytes (a few seconds for a 2B model).
    A hub id: the commit its files resolve to (from the local hub cache when offline).
    """
    if is_local_path(name_or_path):
        h = hashlib.sha256()
        path = Path(name_or_path).expanduser()
        files = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
        for file in files:
            h.update(f"{file.name}:{file.stat().st_size}:".encode())
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
        return f"sha256:{h.hexdigest()[:32]}" if files else "no-weight-files"
    from huggingface_hub import hf_hub_download

    config_file = Path(hf_hub_download(name_or_path, "config.json", revision=revision))
    return f"commit:{config_file.parent.name}"  # .../snapshots/<commit>/config.json


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layer list, wherever the class keeps it (model.layers, model.language_model.layers, ...).

    Chosen as the ModuleList of *DecoderLayer modules whose length is the text config's num_hidden_layers,
    which skips vision blocks and multi-token-prediction heads.
    """
    n_layers = model.config.get_text_config().num_hidden_layers
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) == n_layers
        and all(type(child).__name__.endswith("DecoderLayer") for child in mod)
    ]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise RuntimeError(
            f"expected one list of {n_layers} decoder layers in {type(model).__name__}, found {len(found)}: {names}"
        )
    return found[0][1]


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer to skip the rest of the model."""


@contextmanager
def capture(layers: nn.ModuleList, layer_ids: Sequence[int], stop_early: bool = True) -> Iterator[dict[int, Tensor]]:
    """Forward hooks that store layers[n]'s output into the yielded dict, keyed by n.

    With stop_early the forward is cut after the deepest layer; run it through `run_captured`.
    """
    if not layer_ids:
        raise InputError("no layers to capture")
    bad = [n for n in layer_ids if not 0 <= n < len(layers)]
    if bad:
        raise InputError(
            f"layer indices {bad} out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})"
        )
    deepest = max(layer_ids)
    out: dict[int, Tensor] = {}

    def make_hook(n: int):
        def hook(_module, _inputs, output):
            out[n] = output[0] if isinstance(output, tuple) else output
            if stop_early and n == deepest:
                raise _StopForward

        return hook

    handles = [layers[n].register_forward_hook(make_hook(n)) for n in sorted(set(layer_ids))]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_captured(
    lm: LoadedLM, layer_ids: Sequence[int], input_ids: Tensor, attention_mask: Optional[Tensor] = None
) -> dict[int, Tensor]:
    """One forward pass, cut after the deepest layer; returns {n: output of layers[n]} as (B, T, d_model)."""
    with capture(lm.layers, layer_ids) as out:
        try:
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    missing = sorted(set(layer_ids) - set(out))
    if missing:
        raise RuntimeError(f"layers {missing} did not run during the forward pass")
    return out
