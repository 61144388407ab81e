"""plan=true: what the configured run needs on N GPUs, printed before any GPU is paid for.

For each GPU count in planner.processes (one process per GPU): how the fit is laid out (layer-sharded or
data parallel, layer groups), device memory per process for the cache stage and the fit (from the fit
stage's own memory model, memory.py, which tests/test_plan.py checks against real steps), host memory
for the shuffle buffers, the cache's size on disk, forward passes and SAE steps, and the wall time. The
model's shape comes from its config.json (or, when that cannot be reached, a built-in copy of the
released models' shapes); its weights are never loaded: the parameters are counted on the meta device.

Every figure says where it comes from: counted (shapes), measured (memory model and step throughput,
with their sources) or assumed (the planner.* settings a user should set for their cluster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import memory
from .config import ActivationSource, ModelConfig, RunConfig
from .errors import ConfigError, MissingInputError

GiB = 2**30
REF_D_MODEL, REF_D_SAE = 2048, 32768  # the shape planner.step_tokens_per_s was measured at
DISK_BYTES_PER_VALUE = 1.46  # bf16 cache on disk per value, after byte-split zstd (measured; README)

# Qwen3-1.7B's config.json (its base and post-trained checkpoints share it), for planning offline
QWEN3_1_7B = dict(
    hidden_size=2048,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=6144,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1_000_000,
    rms_norm_eps=1e-6,
)
KNOWN_SHAPES = {"Qwen/Qwen3-1.7B-Base": QWEN3_1_7B, "Qwen/Qwen3-1.7B": QWEN3_1_7B}


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    n_layers: int
    intermediate: int
    params: int  # all parameters
    layer_params: list[int]  # each decoder layer's
    source: str  # where the shape came from


def model_shape(m: ModelConfig) -> ModelShape:
    """The model's shape from its config.json alone: parameters counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    from .lm import find_decoder_layers, is_local_path

    try:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        source = f"{m.name_or_path}'s config.json"
    except (OSError, ValueError) as e:
        if m.name_or_path not in KNOWN_SHAPES or is_local_path(m.name_or_path):
            raise MissingInputError(
                f"plan needs model.name_or_path={m.name_or_path!r}'s config.json (not its weights) and could "
                f"not read it ({type(e).__name__}); give a local directory holding it, or plan where the hub "
                f"is reachable. Built in for offline planning: {', '.join(KNOWN_SHAPES)}"
            ) from None
        config = Qwen3Config(**KNOWN_SHAPES[m.name_or_path])
        source = f"a built-in copy of {m.name_or_path}'s config (its config.json was not reachable)"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = find_decoder_layers(model)
    text = config.get_text_config()
    return ModelShape(
        d_model=text.hidden_size,
        n_layers=text.num_hidden_layers,
        intermediate=text.intermediate_size,
        params=sum(p.numel() for p in model.parameters()),
        layer_params=[sum(p.numel() for p in layer.parameters()) for layer in layers],
        source=source,
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


@dataclass(frozen=True)
class Job:
    """The run's figures that do not depend on the GPU count."""

    d_model: int
    d_sae: int
    k: int
    batch: int
    n_layers: int
    steps: int
    train_tokens: int  # steps x batch
    tokens: int  # forwarded by the cache stage: training and held-out
    dtype_bytes: int  # of the model's weights
    bf16_gemm: bool
    live: bool
    forward_flops: float  # one token's forward through the layers the capture runs
    forward_bytes: int  # the model and one forward batch's temporaries on the device
    layer_rate: float  # one layer's training step, tokens/s
    sae_bytes: int  # one SAE's fp32 parameters (its gradients' size too)
    headroom: float  # usable bytes of one GPU


def job_of(cfg: RunConfig, shape: ModelShape) -> Job:
    p, t, data = cfg.planner, cfg.trainer, cfg.data
    bad = [n for n in cfg.layers if n >= shape.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist: the model has {shape.n_layers} decoder layers")
    D, F = shape.d_model, cfg.sae.d_sae
    steps = t.max_steps or max(1, data.train_tokens // t.batch_size)
    dtype_bytes = cfg.model.dtype.torch.itemsize
    deepest, rows = max(cfg.layers), data.forward_batch_tokens
    return Job(
        d_model=D,
        d_sae=F,
        k=cfg.sae.k,
        batch=t.batch_size,
        n_layers=len(cfg.layers),
        steps=steps,
        train_tokens=steps * t.batch_size,
        tokens=data.train_tokens + data.eval_tokens,
        dtype_bytes=dtype_bytes,
        bf16_gemm=t.encoder_dtype is None or t.encoder_dtype.torch == torch.bfloat16,  # the CUDA default
        live=cfg.reader.source is ActivationSource.live,
        # the capture stops after the deepest hooked layer; attention adds about 2 x context x d_model a layer
        forward_flops=2 * sum(shape.layer_params[: deepest + 1]) + 2 * (deepest + 1) * data.context_len * D,
        forward_bytes=shape.params * dtype_bytes
        + rows * (3 * shape.intermediate + 8 * D) * dtype_bytes  # one layer's temporaries at a time
        + rows * len(cfg.layers) * D * dtype_bytes,  # the captured rows before they go to the host
        layer_rate=p.step_tokens_per_s * (REF_D_MODEL * REF_D_SAE) / (D * F),
        sae_bytes=(2 * F * D + F + D) * 4,
        headroom=memory.HEADROOM * p.gpu_memory_gib * GiB,
    )


def _header(cfg: RunConfig, shape: ModelShape, j: Job) -> list[str]:
    p = cfg.planner
    disk = j.tokens * j.n_layers * j.d_model * DISK_BYTES_PER_VALUE
    return [
        f"plan: {cfg.name}: {cfg.model.name_or_path}, {shape.params / 1e9:.2f} B parameters "
        f"({shape.params * j.dtype_bytes / GiB:.2f} GiB in {cfg.model.dtype.value}; shape from {shape.source}; "
        "no weights loaded)",
        f"  {j.n_layers} layers of {shape.n_layers} (d_model {j.d_model}), SAEs {j.d_sae:,} latents, k {j.k}; "
        f"{j.train_tokens:,} training tokens in {j.steps:,} steps of {j.batch:,}; "
        f"{cfg.data.eval_tokens:,} held out",
        f"  activations: {'live (no cache)' if j.live else f'cache on the shared run_dir, {disk / 1e9:,.1f} GB'}"
        f" ({DISK_BYTES_PER_VALUE} bytes per value on disk, measured)",
        f"  assumed: {p.gpu_memory_gib:g} GiB per GPU ({memory.HEADROOM:.0%} usable), {p.gpus_per_node} per node, "
        f"forward {p.forward_tflops:g} TFLOP/s, all-reduce {p.node_link_gb_s:g} GB/s in a node and "
        f"{p.network_gb_s:g} GB/s between nodes",
        f"  measured: a layer's step {p.step_tokens_per_s:,.0f} tokens/s at {REF_D_MODEL} x {REF_D_SAE} "
        f"(planner.step_tokens_per_s), so {j.layer_rate:,.0f} tokens/s at {j.d_model} x {j.d_sae}; the times "
        "assume the fit loop keeps pace with the bare step (the 28-layer fit measured on an H200 did not: "
        "docs/BENCHMARKS.md)",
    ]


@dataclass(frozen=True)
class Layout:
    """How n GPUs split the fit, and what a process holds."""

    head: str  # "8 GPUs (1 node)"
    sharded: bool
    dp: bool
    mine: int  # layers per process
    rows: int  # rows per step per process
    per_layer: int
    per_step: int
    batches: int  # per layer being trained
    model_on_device: int  # the live source's model and forward


def layout_of(cfg: RunConfig, j: Job, n: int) -> Layout:
    t = cfg.trainer
    sharded = t.sharded(j.n_layers, n)
    dp = n > 1 and not sharded
    rows = j.batch if sharded or n == 1 else j.batch // n
    nodes = math.ceil(n / cfg.planner.gpus_per_node)
    return Layout(
        head=f"{n} GPU{'s' if n > 1 else ''} ({nodes} node{'s' if nodes > 1 else ''})",
        sharded=sharded,
        dp=dp,
        mine=math.ceil(j.n_layers / n) if sharded else j.n_layers,
        rows=rows,
        per_layer=memory.layer_bytes(j.d_model, j.d_sae, t.optimizer, dp),
        per_step=memory.step_bytes(j.d_model, j.d_sae, j.k, rows, dp, j.bf16_gemm),
        batches=2 * rows * j.d_model * 4,  # a batch in use and the next one prefetched
        model_on_device=j.forward_bytes if j.live else 0,
    )


def _for_count(cfg: RunConfig, shape: ModelShape, j: Job, n: int) -> tuple[list[str], list[str]]:
    """One GPU count's lines and refusals."""
    lay, fixed, refusals = layout_of(cfg, j, n), cfg.trainer.group_count(), []
    room = j.headroom - lay.per_step - lay.model_on_device
    if room < lay.per_layer + lay.batches:
        need = lay.per_layer + lay.batches + lay.per_step + lay.model_on_device
        return [f"\n{lay.head}: DOES NOT FIT (see below)"], [
            f"{lay.head}: one layer's fit needs {need / GiB:.1f} GiB of {j.headroom / GiB:.1f} usable: lower "
            f"trainer.batch_size (now {j.batch}) or sae.d_sae (now {j.d_sae})"
        ]
    groups = math.ceil(lay.mine / int(room // (lay.per_layer + lay.batches))) if fixed is None else min(fixed, lay.mine)
    per_group = math.ceil(lay.mine / groups)
    fit_total = per_group * (lay.per_layer + lay.batches) + lay.per_step + lay.model_on_device
    if fit_total > j.headroom:
        refusals.append(
            f"{lay.head}: trainer.layer_groups={fixed} puts {per_group} layers in a group, "
            f"{fit_total / GiB:.1f} GiB of {j.headroom / GiB:.1f} usable: set trainer.layer_groups=auto"
        )
    if not j.live and j.forward_bytes > j.headroom:
        refusals.append(
            f"{lay.head}: the cache stage's model and forward need {j.forward_bytes / GiB:.1f} GiB of "
            f"{j.headroom / GiB:.1f} usable: lower data.forward_batch_tokens (now {cfg.data.forward_batch_tokens:,})"
        )
    layout = (
        f"layer-sharded: {lay.mine} of the {j.n_layers} layers per process, full batches"
        if lay.sharded
        else ("one process" if n == 1 else f"data parallel: every layer on every process, {lay.rows:,} rows each")
    )
    host = cfg.reader.shuffle_buffer_tokens * j.d_model * 2 * per_group
    lines = [
        f"\n{lay.head}: {layout}; {groups} layer group(s) of up to {per_group}",
        f"  device memory per process, fit: {per_group} x {lay.per_layer / GiB:.2f} GiB (SAE, optimizer state, "
        f"counters{', gradients' if lay.dp else ''}) + {lay.per_step / GiB:.2f} GiB step peak + "
        f"{per_group * lay.batches / GiB:.2f} GiB batches"
        + (f" + {lay.model_on_device / GiB:.2f} GiB model and forward (live)" if j.live else "")
        + f" = {fit_total / GiB:.1f} GiB of {cfg.planner.gpu_memory_gib:g}",
        f"  device memory per process, cache stage: {j.forward_bytes / GiB:.1f} GiB (model "
        f"{shape.params * j.dtype_bytes / GiB:.2f}, forward of {cfg.data.forward_batch_tokens:,} tokens; estimated)"
        if not j.live
        else "  (no cache stage: reader.source=live)",
        f"  host memory per process: {host / GiB:.2f} GiB of shuffle buffers "
        f"({cfg.reader.shuffle_buffer_tokens:,} rows x {per_group} layers)",
    ]
    return lines + _times(cfg, j, lay, n, groups, per_group), refusals


def _times(cfg: RunConfig, j: Job, lay: Layout, n: int, groups: int, per_group: int) -> list[str]:
    """Work and wall time per process: the forward over its share (every token for each process of a live
    sharded fit), its SAE steps at the measured rate, and data parallel's all-reduce."""
    p = cfg.planner
    fwd_tokens = j.tokens / n if not (j.live and lay.sharded) else j.tokens
    forward_s = fwd_tokens * j.forward_flops / (p.forward_tflops * 1e12)
    fit_s = lay.mine * j.train_tokens / (1 if lay.sharded else n) / j.layer_rate
    comm_s = 0.0
    if lay.dp:
        link = p.node_link_gb_s if n <= p.gpus_per_node else p.network_gb_s
        comm_s = j.steps * j.n_layers * j.sae_bytes * 2 * (n - 1) / n / (link * 1e9)
    read_rate = (j.train_tokens * lay.mine / (1 if lay.sharded else n)) * j.d_model * DISK_BYTES_PER_VALUE / fit_s
    return [
        f"  work per process: forward over {fwd_tokens:,.0f} tokens "
        f"({fwd_tokens / cfg.data.context_len:,.0f} sequences of {cfg.data.context_len}); "
        f"{j.steps * groups:,} SAE steps of {per_group} layers x {lay.rows:,} rows",
        f"  time: forward {_hours(forward_s)}, SAE steps {_hours(fit_s)}"
        + (f", all-reduce {_hours(comm_s)} ({j.n_layers * j.sae_bytes / GiB:.1f} GiB a step)" if lay.dp else "")
        + f"; about {_hours(forward_s + fit_s + comm_s)} in all",
    ] + ([] if j.live else [f"  the fit reads the cache at {read_rate / 1e9:,.1f} GB/s per process to keep that pace"])


def plan_text(cfg: RunConfig, shape: ModelShape) -> tuple[str, list[str]]:
    """The plan for every planner.processes count, and the refusals (one line each: what does not fit and
    the setting to change)."""
    j = job_of(cfg, shape)
    out, refusals = _header(cfg, shape, j), []
    for n in cfg.planner.processes:
        lines, refused = _for_count(cfg, shape, j, n)
        out += lines
        refusals += refused
    if refusals:
        out.append("\ndoes not fit:\n" + "\n".join(f"  {r}" for r in refusals))
    return "\n".join(out), refusals


def run(cfg: RunConfig) -> str:
    """Print the plan; raises ConfigError (after printing) when a planned count does not fit."""
    text, refusals = plan_text(cfg, model_shape(cfg.model))
    print(text)
    if refusals:
        raise ConfigError(f"the plan does not fit on {len(refusals)} of the GPU counts planned (above)")
    return text
