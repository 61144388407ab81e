"""An Analyzer: a Qwen3 / Qwen3.5 model and SAEs for some of its layers, from any source load_saes reads,
with one forward that reads every layer's residual and its SAE code."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import convert
from ..config import DType, ModelConfig
from ..errors import InputError
from ..lm import LoadedLM, load_lm, run_captured
from ..load import check_d_model, load_saes
from ..release import is_hub_id
from ..sae import SparseCode, TopKSAE


class Encoded(NamedTuple):
    ids_T: Tensor  # the text's token ids
    resid: dict[int, Tensor]  # per layer: the residual after that layer, (T, d_model) fp32
    codes: dict[int, SparseCode]  # per layer: the SAE's top-k code of each position, (T, k)


def sae_layers(source: str | Path) -> list[int]:
    """The layers a source holds SAEs for: the layer<n>.sae.pt files of a directory or hub repo, or a
    sparsify run's hookpoints (convert.sparsify_layers)."""
    path = Path(source).expanduser()
    if path.is_dir() and convert.is_sparsify_dir(path):
        return sorted(convert.sparsify_layers(path))
    if path.is_file():
        names = [path.name]
    elif path.is_dir():
        names = [p.name for p in path.iterdir()]
    elif is_hub_id(str(source)):
        from huggingface_hub import list_repo_files

        names = list_repo_files(str(source))
    else:
        raise InputError(f"SAE source {str(source)!r} is neither a file, a directory nor a hub repo id")
    layers = sorted({int(m.group(1)) for name in names if (m := re.fullmatch(r"layer(\d+)\.sae\.pt", name))})
    if not layers:
        raise InputError(f"SAE source {str(source)!r} holds no layer<n>.sae.pt files (nor is it a sparsify run)")
    return layers


class Analyzer:
    """A model and its SAEs, keyed by layer. `norms` holds each layer's typical residual norm once measured
    (measure_norms): steering strengths relative to it mean the same at every layer and model."""

    def __init__(self, lm: LoadedLM, saes: dict[int, TopKSAE], device: torch.device | str = "cpu") -> None:
        if not saes:
            raise InputError("an Analyzer needs at least one SAE")
        check_d_model(saes, "the SAEs", lm.d_model, lm.name)
        self.lm, self.device = lm, torch.device(device)
        self.saes = {n: sae.to(self.device).eval().requires_grad_(False) for n, sae in sorted(saes.items())}
        self.norms: dict[int, float] = {}

    @classmethod
    def load(
        cls,
        model: str,
        saes: str | Path,
        layers: Optional[Sequence[int]] = None,
        device: torch.device | str = "cpu",
        dtype: DType = DType.float32,
    ) -> Analyzer:
        """The model (hub id or local directory) and the SAEs of `layers` (None: every layer the source holds)."""
        lm = load_lm(ModelConfig(name_or_path=model, dtype=dtype), device)
        layers = list(layers) if layers is not None else sae_layers(saes)
        return cls(lm, load_saes(saes, layers), device)

    @property
    def layers(self) -> list[int]:
        return list(self.saes)

    def sae(self, layer: int) -> TopKSAE:
        if layer not in self.saes:
            raise InputError(f"no SAE for layer {layer}: this analyzer has layers {self.layers}")
        return self.saes[layer]

    def pick_layers(self, layers: Optional[Sequence[int]]) -> list[int]:
        """The layers asked for (None: all), each checked to have an SAE."""
        picked = self.layers if layers is None else [int(n) for n in layers]
        for n in picked:
            self.sae(n)
        return picked

    def check_feature(self, layer: int, feature: int) -> None:
        d_sae = self.sae(layer).d_sae
        if not 0 <= feature < d_sae:
            raise InputError(f"feature {feature} is out of range: layer {layer}'s SAE has {d_sae} (0..{d_sae - 1})")

    def tokenize(self, text: str, max_tokens: Optional[int] = None) -> Tensor:
        """The text's token ids (no special tokens added), its first max_tokens if given."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text is empty: give at least one word")
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)

    def token_strings(self, ids_T: Tensor) -> list[str]:
        return [self.lm.tokenizer.decode([i]) for i in ids_T.tolist()]

    @torch.no_grad()
    def encode(self, text: str, max_tokens: Optional[int] = None) -> Encoded:
        """One forward over the text (its first max_tokens tokens), cut after the deepest SAE layer:
        residuals and codes of every layer."""
        ids_T = self.tokenize(text, max_tokens)
        out = run_captured(self.lm, self.layers, ids_T[None].to(self.device))
        resid = {n: out[n][0].float() for n in self.layers}
        return Encoded(ids_T, resid, {n: self.saes[n].encode_sparse(resid[n]) for n in self.layers})

    @torch.no_grad()
    def measure_norms(self, texts: Sequence[str]) -> dict[int, float]:
        """Each layer's median residual norm over the texts' tokens, position 0 left out (the attention
        sink's norm is orders of magnitude above the rest); kept in self.norms and returned."""
        norms: dict[int, list[Tensor]] = {n: [] for n in self.layers}
        for text in texts:
            enc = self.encode(text)
            for n in self.layers:
                norms[n].append(enc.resid[n][1:].norm(dim=1))
        for n, parts in norms.items():
            values = torch.cat(parts)
            if values.numel() == 0:
                raise InputError("measure_norms needs texts of at least two tokens")
            self.norms[n] = float(values.median())
        return dict(self.norms)
