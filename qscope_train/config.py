"""Typed run configuration: the RunConfig schema (registered in Hydra's ConfigStore by cli.py) and the
configs of the model, SAE, trainer, evaluation and logging; the activation path's are in data/config.py.

Defaults live in these dataclasses and only here; the YAML presets under configs/ override them. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional

from .data.config import ActivationSource, DataConfig, OnCorrupt, ReaderConfig, SequenceMode, TextFormat, Verify
from .errors import ConfigError
from .output_config import BrowseConfig, CompareConfig, EvalConfig, ExportConfig, WandbConfig, WandbMode
from .schema import MISSING, DType, fingerprint, fingerprint_diff, operational, to_plain

__all__ = [
    "MISSING",
    "ActivationSource",
    "Activation",
    "DataConfig",
    "DecoderInit",
    "DType",
    "EvalConfig",
    "ModelConfig",
    "OnCorrupt",
    "Objective",
    "OptimizerName",
    "ReaderConfig",
    "RunConfig",
    "SAEConfig",
    "SequenceMode",
    "Stage",
    "TextFormat",
    "TrainerConfig",
    "Verify",
    "WandbConfig",
    "WandbMode",
    "fingerprint",
    "fingerprint_diff",
    "to_plain",
]


class Stage(Enum):
    """Pipeline stages, always run in this order."""

    cache = "cache"
    fit = "fit"
    evaluate = "evaluate"
    export = "export"
    adapt = "adapt"  # before/after report and feature drift against init_from (adaptation runs)
    browse = "browse"  # per-feature pages: top contexts, logit lens, histograms, as a static site
    compare = "compare"  # features firing more on one set of texts than on another (compare.a / compare.b)


class Activation(Enum):
    """How latents are selected from the pre-activations."""

    topk = "topk"  # the model card: topk(x @ W_enc.T + b_enc)
    relu_topk = "relu_topk"  # the official demo app: topk(relu(x @ W_enc.T + b_enc))


class OptimizerName(Enum):
    adam = "adam"  # fused Adam with warmup and linear decay
    signum = "signum"  # sign descent under schedule-free averaging, as sparsify trains


class Objective(Enum):
    """What the SAE is trained to minimise (objectives.py); every one keeps the per-token TopK code."""

    topk = "topk"  # FVU of the top-k reconstruction
    multi_topk = "multi_topk"  # + multi_topk_coef * FVU of the top-(multi_topk_factor * k) one
    matryoshka = "matryoshka"  # mean FVU over nested prefixes of the latents


class DecoderInit(Enum):
    random = "random"  # unit-norm Gaussian directions
    data = "data"  # directions of distinct training rows minus b_dec


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
class TrainerConfig:
    """Optimisation of the SAEs."""

    batch_size: int = 4096
    """Activation rows (tokens) per optimizer step, per layer."""
    optimizer: OptimizerName = OptimizerName.signum
    """signum (sign descent under schedule-free averaging; the run exports the averaged weights) or adam."""
    lr: Optional[float] = None
    """Learning rate; None means 2.5e-3 (signum) or 2e-4 (adam) / sqrt(d_sae / 2**14), and for signum also
    times sqrt(2**20 / the run's tokens) when the run is longer than 2**20 tokens (at most 4x lower)."""
    objective: Objective = Objective.topk
    """topk, multi_topk (Gao et al.'s L(k) + L(4k)/8) or matryoshka (nested prefixes each reconstruct)."""
    multi_topk_factor: int = 4
    """multi_topk: the second term reconstructs from the top (this * k) latents."""
    multi_topk_coef: float = 1 / 8
    """multi_topk: weight of the second term."""
    matryoshka_prefixes: list[float] = field(default_factory=lambda: [1 / 16, 1 / 8, 1 / 4, 1 / 2])
    """matryoshka: prefix sizes as fractions of d_sae (all latents are always the last prefix)."""
    average_power: float = 1.0
    """signum: schedule-free averages iterate t with weight t^average_power (0: all alike; larger values
    favour the recent iterates over the early, still random ones)."""
    center_input: bool = True
    """Train with the encoder reading x - b_dec, so that b_dec also moves the encoder's origin (sparsify's
    and Gao et al.'s form). The export folds it into b_enc: the released encoder is the card's."""
    decoder_init: DecoderInit = DecoderInit.data
    """random, or data: each decoder direction starts as a distinct training row minus b_dec (fresh runs)."""
    warmup_steps: Optional[int] = None
    """Linear learning-rate warmup from 0 over this many steps; None: 100 with adam, 0 with signum."""
    decay_fraction: Optional[float] = None
    """Final fraction of steps over which the learning rate decays linearly to 0; None: 0.2 with adam, 0 with
    signum (schedule-free averaging stands in for the decay)."""
    max_steps: Optional[int] = None
    """Stop after this many steps; None means one pass over the cached training split."""
    dead_after_tokens: Optional[int] = None
    """A latent that has not fired for this many tokens counts as dead (and AuxK trains it); None: 1/64 of
    the run's tokens, at most 10M (Gao et al.'s window, which a short run would never reach). A short
    window lets AuxK reach latents that went quiet while the dictionary takes shape: 1/64 rather than 1/16
    recovered more true directions on bench_quality (docs/BENCHMARKS.md, session 24)."""
    grad_clip: Optional[float] = None
    """Clip each SAE's gradient to this global L2 norm; None: no clipping."""
    k_start: Optional[int] = None
    """Anneal k from this larger value down to sae.k over k_anneal_steps; None: fixed k."""
    k_anneal_steps: int = 0
    """Steps over which k decreases linearly from k_start to sae.k."""
    encoder_dtype: Optional[DType] = None
    """Dtype of the training encoder GEMM (weights, optimizer and gradients stay fp32); None: bfloat16 on
    CUDA, float32 elsewhere. encode() for users is always the card's exact fp32."""
    auxk_coef: float = 1 / 256
    """Weight of the AuxK loss, in which dead latents reconstruct the residual; 0 turns it off. Our AuxK is
    normalised by the residual's variance, not the input's (Gao et al.'s 1/32 is about 1/256 here at FVU 0.1)."""
    auxk_k: Optional[int] = None
    """Dead latents used by AuxK per token; None means d_model // 2."""
    merge_cos: Optional[float] = 0.5
    """Merge pairs of live latents whose decoders are at cosine >= this and that fire on the same rows,
    every merge_every_tokens from the end of the first dead window on (in the run's last quarter and
    last four dead windows, only pairs at cosine >= 0.95, twins): one latent takes the pair's direction
    and output, the other is re-seeded on a direction the step reconstructed worst (duplicates.py). Such
    copies tilt apart, each holding a tilted share of one feature, so that no decoder is the feature's
    own. Fresh runs only (init_from keeps every source latent as it is); None: never merge."""
    merge_every_tokens: Optional[int] = None
    """Tokens between merge passes (each a d_sae x d_sae cosine product, only the rows that can hold a
    twin at the run's end, and co-firing sums from the code of the step it follows); None: 1/32 of
    the run's tokens."""
    checkpoint_every: int = operational(1000)
    """Steps between checkpoints under fit/checkpoints (0: none); a rerun resumes from the latest."""
    keep_checkpoints: int = operational(2)
    """Checkpoints kept on disk (the newest ones)."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    layer_groups: str = "1"
    """Train the layers in this many sequential groups, each a full pass over the batches with only its
    own SAEs in memory (each group resumable; a layer's weights do not depend on its group), or auto:
    as few groups as fit in the device's free memory (the fit stage prints the plan)."""
    layer_sharding: Optional[bool] = None
    """With several processes: true, each one trains its share of the layers (layers[rank::world]) on full
    batches and exchanges nothing; false, all of them split every batch (data parallel); None (auto):
    sharded when there are at least as many layers as processes, data parallel otherwise."""
    log_every: int = operational(20)
    """Steps between log lines (JSONL, progress bar, wandb); metrics are read from the device only then."""
    prefetch_batches: int = operational(2)
    """Batches a background thread prepares ahead of the training step (in pinned memory on CUDA); 0 reads
    each batch on the training thread when it is needed."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"trainer.batch_size must be positive, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"trainer.lr must be positive, got {self.lr}")
        if self.decay_fraction is not None and not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"trainer.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"trainer.grad_clip must be positive, got {self.grad_clip}")
        if self.k_start is not None and self.k_anneal_steps <= 0:
            raise ConfigError("trainer.k_start needs trainer.k_anneal_steps > 0")
        if self.auxk_coef < 0:
            raise ConfigError(f"trainer.auxk_coef must be >= 0, got {self.auxk_coef}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"trainer.max_steps must be positive, got {self.max_steps}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"trainer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.dead_after_tokens is not None and self.dead_after_tokens <= 0:
            raise ConfigError(f"trainer.dead_after_tokens must be positive, got {self.dead_after_tokens}")
        if self.average_power < 0:
            raise ConfigError(f"trainer.average_power must be >= 0, got {self.average_power}")
        self.group_count()  # validates layer_groups
        if self.prefetch_batches < 0:
            raise ConfigError(f"trainer.prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.merge_cos is not None and not 0 < self.merge_cos < 1:
            raise ConfigError(f"trainer.merge_cos must be in (0, 1) or null, got {self.merge_cos}")
        if self.merge_every_tokens is not None and self.merge_every_tokens <= 0:
            raise ConfigError(f"trainer.merge_every_tokens must be positive, got {self.merge_every_tokens}")

    def sharded(self, n_layers: int, world: int) -> bool:
        """Whether a fit of n_layers on world processes is layer-sharded (see layer_sharding)."""
        if world <= 1:
            return False
        if self.layer_sharding is None:
            return n_layers >= world
        return self.layer_sharding

    def group_count(self) -> Optional[int]:
        """layer_groups as a number of groups, or None for auto."""
        value = str(self.layer_groups).strip().lower()
        if value == "auto":
            return None
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"trainer.layer_groups must be a positive number of groups or auto, got {self.layer_groups!r}"
            )
        return int(value)

    def resolved(self, total_steps: int) -> TrainerConfig:
        """This config with every None that depends on the optimizer or the run's length filled in."""
        adam = self.optimizer is OptimizerName.adam
        window = self.dead_after_tokens
        if window is None:
            window = max(self.batch_size, min(10_000_000, total_steps * self.batch_size // 64))
        return replace(
            self,
            warmup_steps=(100 if adam else 0) if self.warmup_steps is None else self.warmup_steps,
            decay_fraction=(0.2 if adam else 0.0) if self.decay_fraction is None else self.decay_fraction,
            dead_after_tokens=window,
            merge_every_tokens=self.merge_every_tokens or max(self.batch_size, total_steps * self.batch_size // 32),
        )


@dataclass
class PlanConfig:
    """What `plan=true` assumes about the machines it plans for (qscope_train/plan.py)."""

    processes: list[int] = field(default_factory=lambda: [1, 8, 16])
    """GPU counts to plan for, one process each."""
    gpus_per_node: int = 8
    """GPUs in one node: data parallel past it crosses the network."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU."""
    step_tokens_per_s: float = 291_006.0
    """One layer's training step, tokens/s, at d_model 2048 x d_sae 32768 (scaled by d_model x d_sae for
    other shapes). The default was measured on one H200 (bf16, k 100, batch 4096; docs/BENCHMARKS.md
    session 16); set your GPU's figure (scripts/bench_train.py) where it differs."""
    forward_tflops: float = 300.0
    """Assumed useful bf16 throughput of the model's forward per GPU, TFLOP/s (about a third of an
    H100's dense peak; not measured here)."""
    node_link_gb_s: float = 150.0
    """Assumed all-reduce bandwidth inside a node, GB/s per GPU (NVLink class)."""
    network_gb_s: float = 25.0
    """Assumed all-reduce bandwidth between nodes, GB/s per GPU (200 Gb/s InfiniBand class)."""

    def __post_init__(self) -> None:
        if not self.processes or any(int(p) <= 0 for p in self.processes):
            raise ConfigError(f"planner.processes must list positive GPU counts, got {list(self.processes)}")
        for name in (
            "gpus_per_node",
            "gpu_memory_gib",
            "step_tokens_per_s",
            "forward_tflops",
            "node_link_gb_s",
            "network_gb_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"planner.{name} must be positive, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """One run: which stages, on which layers, with which model, data, SAE and trainer."""

    name: str = "run"
    """Run name; the default run directory is outputs/<name>."""
    run_dir: str = "outputs/${name}"
    """Directory for every stage's outputs (cache/, fit/, eval/, export/, log.jsonl)."""
    stages: list[Stage] = field(default_factory=lambda: [Stage.cache, Stage.fit, Stage.evaluate, Stage.export])
    """Stages to run, e.g. [cache,fit,evaluate,export] or [fit,export]; always run in the order
    cache, fit, evaluate, export, adapt, browse, compare."""
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
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    browse: BrowseConfig = field(default_factory=BrowseConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plan: bool = False
    """Print the memory and time plan for planner.processes GPUs and exit (no weights are loaded)."""
    planner: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers must list at least one decoder layer index")
        if any(n < 0 for n in self.layers):
            raise ConfigError(f"layers must be non-negative indices, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers has duplicates: {list(self.layers)}")
        if not self.stages:
            raise ConfigError("stages must name at least one of cache, fit, evaluate, export, adapt, browse, compare")
        if Stage.compare in self.stages and self.compare.b is None:
            raise ConfigError("stages has compare: set compare.b (a data preset, e.g. `+data@compare.b=tiny_chat`)")
        if Stage.adapt in self.stages and self.init_from is None:
            raise ConfigError("stages has adapt, which compares against the source SAEs: set init_from")
