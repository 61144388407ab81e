"""Typed run configuration: dataclass schemas registered in Hydra's ConfigStore.

Defaults live here and only here; the YAML presets under configs/ override them. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from .errors import ConfigError

MISSING = "???"  # OmegaConf's marker for a value the user must give


class Stage(Enum):
    """Pipeline stages, always run in this order."""

    cache = "cache"
    fit = "fit"
    evaluate = "evaluate"
    export = "export"
    adapt = "adapt"  # before/after report and feature drift against init_from (adaptation runs)


class Activation(Enum):
    """How latents are selected from the pre-activations."""

    topk = "topk"  # the model card: topk(x @ W_enc.T + b_enc)
    relu_topk = "relu_topk"  # the official demo app: topk(relu(x @ W_enc.T + b_enc))


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    @property
    def torch(self):
        """The torch dtype of the same name (torch is imported here only when asked for)."""
        import torch

        return getattr(torch, self.value)


class SequenceMode(Enum):
    """How documents become fixed-length sequences."""

    packed = "packed"  # documents joined with EOS and cut every context_len tokens
    per_sequence = "per_sequence"  # one document / conversation per sequence, right-padded


class TextFormat(Enum):
    text = "text"  # text_field holds a string
    chat = "chat"  # text_field holds a list of {role, content} messages, rendered with the chat template


class ActivationSource(Enum):
    cache = "cache"  # train from the shards written by the cache stage
    live = "live"  # run the model during training; nothing is written to disk


class OnCorrupt(Enum):
    error = "error"  # stop with an error naming the shard
    skip = "skip"  # warn, leave the shard out, and go on


class Verify(Enum):
    """How a reader checks a shard before using its rows (the size is always checked)."""

    frame = "frame"  # zstd's content checksum, checked while decoding (sha256 for shards without one)
    sha256 = "sha256"  # sha256 of the whole file against the manifest, then decode (and the frame checksum)


class WandbMode(Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class ModelConfig:
    """The language model whose residual stream is read."""

    name_or_path: str = MISSING
    """Hub id (e.g. Qwen/Qwen3-1.7B-Base) or a local directory written by save_pretrained."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit); None for the default branch."""
    dtype: DType = DType.float32
    """Dtype of the LM weights during the forward pass (bfloat16 on GPUs)."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; Qwen3 and Qwen3.5 do not need it with transformers 5."""


@dataclass
class SAEConfig:
    """Shape and activation of each layer's TopK SAE."""

    d_sae: int = 32768
    """Number of latents (the release calls it the SAE width)."""
    k: int = 100
    """Latents kept non-zero per token."""
    activation: Activation = Activation.topk
    """topk: the card's encoder; relu_topk: ReLU before the top-k, as the official app does."""

    def __post_init__(self) -> None:
        if self.d_sae <= 0:
            raise ConfigError(f"sae.d_sae must be positive, got {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"sae.k must be in 1..d_sae ({self.d_sae}), got {self.k}")


@dataclass
class DataConfig:
    """Where tokens come from, which activations are kept, and how they are cached and read."""

    dataset: str = MISSING
    """Hub dataset id, or a local .txt / .json / .jsonl / .parquet file or a directory of them."""
    config_name: Optional[str] = None
    """Dataset configuration (subset) name on the hub, e.g. sample-10BT."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Column holding the document text (or, with format=chat, the list of messages)."""
    format: TextFormat = TextFormat.text
    """text: plain documents; chat: conversations rendered with the tokenizer's chat template."""
    mode: SequenceMode = SequenceMode.packed
    """packed: documents joined with EOS; per_sequence: one document / conversation per sequence."""
    streaming: bool = False
    """Stream the dataset instead of downloading it whole (large hub datasets)."""
    shuffle: bool = False
    """Shuffle documents with `seed` before tokenizing (streaming uses a 10k-document buffer)."""
    seed: int = 0
    """Seed of the document shuffle; the stream order is deterministic for a given seed."""
    context_len: int = 1024
    """Tokens per sequence fed to the model."""
    train_tokens: int = 10_000_000
    """Sequence tokens to run through the model for the training split (before filters)."""
    eval_tokens: int = 262_144
    """Sequence tokens for the held-out split; taken from sequences never used for training."""
    forward_batch_tokens: int = 16384
    """Tokens per language-model forward pass (a multiple of context_len is used)."""
    shard_tokens: int = 65536
    """Sequence tokens per cache shard (rounded down to whole sequences); every layer is cut alike."""
    cache_dtype: DType = DType.bfloat16
    """Dtype of cached (and live) activations."""
    byte_split: bool = True
    """Store the high and low bytes of 16-bit values apart, which compresses better."""
    zstd_level: int = 1
    """zstandard level of the shards."""
    store_tokens: bool = False
    """Also store token ids and, per layer, the position of every kept row."""
    drop_first_position: bool = True
    """Drop position 0 of each sequence (the attention sink, norm far above the rest)."""
    drop_special_tokens: bool = True
    """Drop activations at the tokenizer's special tokens (BOS/EOS/PAD and other added specials)."""
    drop_token_ids: list[int] = field(default_factory=list)
    """Further token ids whose activations are dropped."""
    outlier_norm_factor: float = 10.0
    """Drop activations whose norm exceeds this multiple of the layer's running median norm; 0 disables."""
    source: ActivationSource = ActivationSource.cache
    """Where the fit stage reads activations: the cache, or the model itself (live)."""
    shuffle_buffer_tokens: int = 131072
    """Activation rows per layer held in memory for shuffling while reading (sets the reader's memory)."""
    shuffle_shards: bool = True
    """Visit cache shards in a new random order each epoch (live mode keeps the stream order)."""
    reader_threads: int = 2
    """Background threads that read and decompress shards ahead of the trainer."""
    on_corrupt: OnCorrupt = OnCorrupt.error
    """What the reader does with a shard that fails its checksum: error, or skip with a warning."""
    verify_shards: Verify = Verify.frame
    """How the reader checks shards: frame (zstd's checksum, free while decoding) or sha256 (also hash the file)."""

    def __post_init__(self) -> None:
        for name in (
            "context_len",
            "train_tokens",
            "eval_tokens",
            "forward_batch_tokens",
            "shard_tokens",
            "shuffle_buffer_tokens",
            "reader_threads",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.context_len < 2:
            raise ConfigError(f"data.context_len must be at least 2, got {self.context_len}")
        if self.shard_tokens < self.context_len:
            raise ConfigError(
                f"data.shard_tokens ({self.shard_tokens}) must hold at least one sequence of {self.context_len}"
            )
        if self.outlier_norm_factor < 0:
            raise ConfigError(f"data.outlier_norm_factor must be >= 0, got {self.outlier_norm_factor}")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"data.zstd_level must be in 1..22, got {self.zstd_level}")

    @property
    def shard_sequences(self) -> int:
        return self.shard_tokens // self.context_len

    @property
    def forward_sequences(self) -> int:
        return max(1, self.forward_batch_tokens // self.context_len)


@dataclass
class TrainerConfig:
    """Optimisation of the SAEs."""

    batch_size: int = 4096
    """Activation rows (tokens) per optimizer step, per layer."""
    lr: Optional[float] = None
    """Adam learning rate; None means 2e-4 / sqrt(d_sae / 2**14)."""
    warmup_steps: int = 100
    """Linear learning-rate warmup from 0."""
    decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly to 0."""
    max_steps: Optional[int] = None
    """Stop after this many steps; None means one pass over the cached training split."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""
    grad_clip: Optional[float] = None
    """Clip each SAE's gradient to this global L2 norm; None: no clipping."""
    k_start: Optional[int] = None
    """Anneal k from this larger value down to sae.k over k_anneal_steps; None: fixed k."""
    k_anneal_steps: int = 0
    """Steps over which k decreases linearly from k_start to sae.k."""
    encoder_dtype: DType = DType.float32
    """Dtype of the dense encoder GEMM (bfloat16 pays off on GPUs and AVX512-BF16 CPUs); weights stay fp32."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss, in which dead latents reconstruct the residual; 0 turns it off."""
    auxk_k: Optional[int] = None
    """Dead latents used by AuxK per token; None means d_model // 2."""
    checkpoint_every: int = 1000
    """Steps between checkpoints under fit/checkpoints (0: none); a rerun resumes from the latest."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    layer_sharding: bool = False
    """With several processes: each one trains its share of the layers (layers[rank::world]) on full
    batches and exchanges nothing, instead of all of them splitting every batch (data parallel)."""
    log_every: int = 20
    """Steps between log lines (JSONL, progress bar, wandb)."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"trainer.batch_size must be positive, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"trainer.lr must be positive, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"trainer.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"trainer.grad_clip must be positive, got {self.grad_clip}")
        if self.k_start is not None and self.k_anneal_steps <= 0:
            raise ConfigError("trainer.k_start needs trainer.k_anneal_steps > 0")
        if self.auxk_coef < 0:
            raise ConfigError(f"trainer.auxk_coef must be >= 0, got {self.auxk_coef}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"trainer.max_steps must be positive, got {self.max_steps}")


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
class WandbConfig:
    """Weights & Biases logging (the JSONL log in the run directory is always written)."""

    mode: WandbMode = WandbMode.disabled
    """disabled, offline (local files, sync later) or online."""
    project: str = "qscope-train"
    """wandb project name."""
    entity: Optional[str] = None
    """wandb entity (user or team); None for the default."""


@dataclass
class RunConfig:
    """One run: which stages, on which layers, with which model, data, SAE and trainer."""

    name: str = "run"
    """Run name; the default run directory is outputs/<name>."""
    run_dir: str = "outputs/${name}"
    """Directory for every stage's outputs (cache/, fit/, eval/, export/, log.jsonl)."""
    stages: list[Stage] = field(default_factory=lambda: [Stage.cache, Stage.fit, Stage.evaluate, Stage.export])
    """Stages to run, e.g. [cache,fit,evaluate,export] or [fit,export]; always run in the order
    cache, fit, evaluate, export, adapt."""
    layers: list[int] = MISSING
    """Decoder layer indices n whose output (residual stream after block n) gets an SAE."""
    init_from: Optional[str] = None
    """Start each layer's SAE from a release: a layer<n>.sae.pt directory or a hub repo id (k and width
    come from it, e.g. Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_100); None trains from scratch."""
    init_from_revision: Optional[str] = None
    """Hub revision of init_from."""
    release_model_name: Optional[str] = None
    """Model name used in the export's release-style name SAE-Res-<name>-W<N>K-L0_<k>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers must list at least one decoder layer index")
        if any(n < 0 for n in self.layers):
            raise ConfigError(f"layers must be non-negative indices, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers has duplicates: {list(self.layers)}")
        if not self.stages:
            raise ConfigError("stages must name at least one of cache, fit, evaluate, export, adapt")
        if Stage.adapt in self.stages and self.init_from is None:
            raise ConfigError("stages has adapt, which compares against the source SAEs: set init_from")


def to_plain(obj: Any) -> Any:
    """A dataclass config as JSON-ready dicts, lists and scalars (enums by value)."""
    if is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The settings that differ between two fingerprints (cache, checkpoint), as `key: old -> new`, nested
    keys joined by dots."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = fingerprint_diff(a, b, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(parts)


def register_configs() -> None:
    """Register the schema so that config.yaml's defaults list can start from it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="qscope_schema", node=RunConfig)
