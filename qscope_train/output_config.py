"""The configs of what a run reports and publishes: held-out evaluation, export, the feature browser and
wandb logging (RunConfig in config.py holds them; config.py re-exports every name here). No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from .data.config import DataConfig
from .errors import ConfigError


class WandbMode(Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class EvalConfig:
    """Held-out evaluation: which SAEs, how many tokens for the spliced loss, what the report shows."""

    saes: Optional[str] = None
    """SAEs to evaluate instead of this run's fit outputs: a release file or directory, a hub repo id, or a
    sparsify checkpoint directory (e.g. Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_100 on any Qwen3 checkpoint)."""
    saes_revision: Optional[str] = None
    """Hub revision of evaluate.saes."""
    compare_source: bool = True
    """With init_from set, also evaluate those source SAEs on the same tokens (the 'before' of an adaptation)."""
    downstream_tokens: int = 65536
    """Held-out sequence tokens for the spliced next-token loss (delta CE, CE recovered, KL); 0 skips it."""
    downstream_batch_tokens: int = 8192
    """Tokens per spliced forward pass; its logits are (tokens, vocab) fp32, so keep it moderate."""
    splice_filtered: bool = False
    """Also splice the positions the filters drop (position 0, padding, special tokens); by default those
    keep their clean activations, as the SAE never trained on them."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of held-out tokens counts as dense."""

    def __post_init__(self) -> None:
        if self.downstream_tokens < 0:
            raise ConfigError(f"evaluate.downstream_tokens must be >= 0, got {self.downstream_tokens}")
        if self.downstream_batch_tokens <= 0:
            raise ConfigError(f"evaluate.downstream_batch_tokens must be positive, got {self.downstream_batch_tokens}")
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError(f"evaluate.dense_threshold must be in (0, 1], got {self.dense_threshold}")


@dataclass
class ExportConfig:
    """Where the export goes beyond run_dir/export."""

    push_to_hub: Optional[str] = None
    """Upload the export (layer files, sidecars, card) to this hub repo, owner/SAE-Res-<model>-W<N>K-L0_<k>:
    the release's naming, which SAELens's qwen_scope converter reads the width and k from."""
    dry_run: bool = False
    """With push_to_hub: print and record (export/push_plan.json) what would be uploaded, upload nothing."""
    private: bool = False
    """With push_to_hub: create the repo private."""


@dataclass
class BrowseConfig:
    """The feature browser (browse stage): what it computes per feature over the held-out split."""

    tokens: int = 0
    """Held-out tokens to scan (the model runs over them twice); 0: the whole held-out split."""
    top_n: int = 20
    """Top-activating examples kept per feature."""
    window: int = 8
    """Context tokens shown on each side of an example's token."""
    bands: int = 4
    """Lower examples come from the ranges (0, max/bands], ... below the top range."""
    per_band: int = 2
    """Examples per lower range (the first ones met in the held-out stream)."""
    logit_tokens: int = 10
    """Tokens listed at each end of a feature's logit lens."""
    neighbours: int = 8
    """Nearest features by decoder cosine listed per feature."""
    prompts: list[str] = field(default_factory=list)
    """Texts whose tokens get a page of the features firing on each (the release app's analyze view)."""
    prompt_features: int = 5
    """Features listed per prompt token."""
    neuronpedia_model_id: Optional[str] = None
    """model_id in the Neuronpedia export; None: the model name's last part, lowercased (qwen3-1.7b-base)."""
    neuronpedia_sae_set: Optional[str] = None
    """sae_set in the Neuronpedia export; None: qscope-res-<width in thousands>k."""
    delphi: bool = False
    """Also write every held-out activation in EleutherAI delphi's latent cache (browse/delphi/latents/), for
    delphi to explain and score the features without the model; held in memory until written, about 14 bytes
    per activation (tokens x k per layer)."""
    delphi_splits: int = 5
    """delphi: files per layer, each a contiguous range of the latents (delphi's n_splits)."""

    def __post_init__(self) -> None:
        for name in ("top_n", "bands", "per_band", "logit_tokens", "neighbours", "prompt_features", "delphi_splits"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"browse.{name} must be positive, got {getattr(self, name)}")
        if self.window < 0 or self.tokens < 0:
            raise ConfigError("browse.window and browse.tokens must be >= 0")
        if self.bands < 2:
            raise ConfigError(f"browse.bands must be at least 2 (the top range and one below), got {self.bands}")


@dataclass
class WandbConfig:
    """Weights & Biases logging (the JSONL log in the run directory is always written)."""

    mode: WandbMode = WandbMode.disabled
    """disabled, offline (local files, sync later) or online."""
    project: str = "qscope-train"
    """wandb project name."""
    entity: Optional[str] = None
    """wandb entity (user or team); None for the default."""


@dataclass
class CompareConfig:
    """The compare stage: which features fire in more texts of one set than of the other (analysis/compare.py)."""

    a: Optional[DataConfig] = None
    """Side A's texts: a data preset or files (as `data`); None: this run's data. In an experiment:
    `- /data@compare.a: <preset>` in its defaults."""
    b: Optional[DataConfig] = None
    """Side B's texts, as `a`; required when the stage runs."""
    texts: int = 200
    """Documents read from each side (its first ones, in the dataset's order), each cut to its context_len."""
    saes: Optional[str] = None
    """SAEs to compare with instead of this run's export: anything evaluate.saes takes."""
    alpha: float = 0.05
    """Benjamini-Hochberg false-discovery rate at which a feature's difference counts as significant."""
    top: int = 20
    """Features listed per side and layer."""
    classifier_features: int = 8
    """Features the classifier may select (those significantly more frequent in A on its training half)."""

    def __post_init__(self) -> None:
        if self.texts < 4:
            raise ConfigError(
                f"compare.texts must be at least 4 (two to train and two to test the classifier), got {self.texts}"
            )
        if not 0 < self.alpha < 1:
            raise ConfigError(f"compare.alpha must be in (0, 1), got {self.alpha}")
        if self.top < 1 or self.classifier_features < 1:
            raise ConfigError(
                f"compare.top and compare.classifier_features must be positive, got {self.top}, {self.classifier_features}"
            )
