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


def plan_text(cfg: RunConfig, shape: ModelShape) -> tuple[str, list[str]]:
    """The plan for every planner.processes count, and the refusals (one line each: what does not fit and
    the setting to change)."""
    p, t, data = cfg.planner, cfg.trainer, cfg.data
    bad = [n for n in cfg.layers if n >= shape.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist: the model has {shape.n_layers} decoder layers")
    D, F, k, B = shape.d_model, cfg.sae.d_sae, cfg.sae.k, t.batch_size
    n_layers, deepest = len(cfg.layers), max(cfg.layers)
    steps = t.max_steps or max(1, data.train_tokens // B)
    train_tokens = steps * B
    tokens = data.train_tokens + data.eval_tokens
    dtype_bytes = cfg.model.dtype.torch.itemsize
    bf16 = t.encoder_dtype is None or t.encoder_dtype.torch == torch.bfloat16  # the CUDA default
    live = cfg.reader.source is ActivationSource.live
    # a token's forward through the layers the capture runs (it stops after the deepest hooked layer)
    forward_flops = 2 * sum(shape.layer_params[: deepest + 1]) + 2 * (deepest + 1) * data.context_len * D
    forward_rows = data.forward_batch_tokens
    forward_bytes = (
        shape.params * dtype_bytes
        + forward_rows * (3 * shape.intermediate + 8 * D) * dtype_bytes  # one layer's temporaries at a time
        + forward_rows * n_layers * D * dtype_bytes  # the captured rows before they go to the host
    )
    layer_rate = p.step_tokens_per_s * (REF_D_MODEL * REF_D_SAE) / (D * F)
    sae_bytes = (2 * F * D + F + D) * 4
    disk = tokens * n_layers * D * DISK_BYTES_PER_VALUE
    headroom = memory.HEADROOM * p.gpu_memory_gib * GiB

    out = [
        f"plan: {cfg.name}: {cfg.model.name_or_path}, {shape.params / 1e9:.2f} B parameters "
        f"({shape.params * dtype_bytes / GiB:.2f} GiB in {cfg.model.dtype.value}; shape from {shape.source}; "
        "no weights loaded)",
        f"  {n_layers} layers of {shape.n_layers} (d_model {D}), SAEs {F:,} latents, k {k}; "
        f"{train_tokens:,} training tokens in {steps:,} steps of {B:,}; {data.eval_tokens:,} held out",
        f"  activations: {'live (no cache)' if live else f'cache on the shared run_dir, {disk / 1e9:,.1f} GB'}"
        f" ({DISK_BYTES_PER_VALUE} bytes per value on disk, measured)",
        f"  assumed: {p.gpu_memory_gib:g} GiB per GPU ({memory.HEADROOM:.0%} usable), {p.gpus_per_node} per node, "
        f"forward {p.forward_tflops:g} TFLOP/s, all-reduce {p.node_link_gb_s:g} GB/s in a node and "
        f"{p.network_gb_s:g} GB/s between nodes",
        f"  measured: a layer's step {p.step_tokens_per_s:,.0f} tokens/s at {REF_D_MODEL} x {REF_D_SAE} "
        f"(planner.step_tokens_per_s), so {layer_rate:,.0f} tokens/s at {D} x {F}; the times assume the fit "
        "loop keeps pace with the bare step (the 28-layer fit measured on an H200 did not: docs/BENCHMARKS.md)",
    ]
    refusals: list[str] = []
    for n in p.processes:
        sharded = t.sharded(n_layers, n)
        dp = n > 1 and not sharded
        mine = math.ceil(n_layers / n) if sharded else n_layers
        rows = B if sharded or n == 1 else B // n
        per_layer = memory.layer_bytes(D, F, t.optimizer, dp)
        per_step = memory.step_bytes(D, F, k, rows, dp, bf16)
        batches = 2 * rows * D * 4  # a batch in use and the next one prefetched, per layer being trained
        model_on_device = forward_bytes if live else 0
        room = headroom - per_step - model_on_device
        nodes = math.ceil(n / p.gpus_per_node)
        head = f"{n} GPU{'s' if n > 1 else ''} ({nodes} node{'s' if nodes > 1 else ''})"
        if room < per_layer + batches:
            refusals.append(
                f"{head}: one layer's fit needs {(per_layer + batches + per_step + model_on_device) / GiB:.1f} GiB "
                f"of {headroom / GiB:.1f} usable: lower trainer.batch_size (now {B}) or sae.d_sae (now {F})"
            )
            out.append(f"\n{head}: DOES NOT FIT (see below)")
            continue
        fixed = t.group_count()
        fit_in_group = int(room // (per_layer + batches))
        groups = math.ceil(mine / fit_in_group) if fixed is None else min(fixed, mine)
        per_group = math.ceil(mine / groups)
        fit_total = per_group * (per_layer + batches) + per_step + model_on_device
        if fit_total > headroom:
            refusals.append(
                f"{head}: trainer.layer_groups={fixed} puts {per_group} layers in a group, "
                f"{fit_total / GiB:.1f} GiB of {headroom / GiB:.1f} usable: set trainer.layer_groups=auto"
            )
        if not live and forward_bytes > headroom:
            refusals.append(
                f"{head}: the cache stage's model and forward need {forward_bytes / GiB:.1f} GiB of "
                f"{headroom / GiB:.1f} usable: lower data.forward_batch_tokens (now {forward_rows:,})"
            )
        # time: the forward over this process's share (every token for each process of a live sharded fit)
        fwd_tokens = tokens / n if not (live and sharded) else tokens
        forward_s = fwd_tokens * forward_flops / (p.forward_tflops * 1e12)
        fit_s = mine * train_tokens / n ** (0 if sharded else 1) / layer_rate
        comm_s = 0.0
        if dp:
            link = p.node_link_gb_s if n <= p.gpus_per_node else p.network_gb_s
            comm_s = steps * n_layers * sae_bytes * 2 * (n - 1) / n / (link * 1e9)
        layout = (
            f"layer-sharded: {mine} of the {n_layers} layers per process, full batches"
            if sharded
            else ("one process" if n == 1 else f"data parallel: every layer on every process, {rows:,} rows each")
        )
        host = cfg.reader.shuffle_buffer_tokens * D * 2 * per_group
        read_rate = (train_tokens * mine / (1 if sharded else n)) * D * DISK_BYTES_PER_VALUE / fit_s
        out += [
            f"\n{head}: {layout}; {groups} layer group(s) of up to {per_group}",
            f"  device memory per process, fit: {per_group} x {per_layer / GiB:.2f} GiB (SAE, optimizer state, "
            f"counters{', gradients' if dp else ''}) + {per_step / GiB:.2f} GiB step peak + "
            f"{per_group * batches / GiB:.2f} GiB batches"
            + (f" + {model_on_device / GiB:.2f} GiB model and forward (live)" if live else "")
            + f" = {fit_total / GiB:.1f} GiB of {p.gpu_memory_gib:g}",
            f"  device memory per process, cache stage: {forward_bytes / GiB:.1f} GiB (model "
            f"{shape.params * dtype_bytes / GiB:.2f}, forward of {forward_rows:,} tokens; estimated)"
            if not live
            else "  (no cache stage: reader.source=live)",
            f"  host memory per process: {host / GiB:.2f} GiB of shuffle buffers "
            f"({cfg.reader.shuffle_buffer_tokens:,} rows x {per_group} layers)",
            f"  work per process: forward over {fwd_tokens:,.0f} tokens "
            f"({fwd_tokens / data.context_len:,.0f} sequences of {data.context_len}); "
            f"{steps * groups:,} SAE steps of {per_group} layers x {rows:,} rows",
            f"  time: forward {_hours(forward_s)}, SAE steps {_hours(fit_s)}"
            + (f", all-reduce {_hours(comm_s)} ({n_layers * sae_bytes / GiB:.1f} GiB a step)" if dp else "")
            + f"; about {_hours(forward_s + fit_s + comm_s)} in all"
            + (
                ""
                if live
                else f"\n  the fit reads the cache at {read_rate / 1e9:,.1f} GB/s per process to keep that pace"
            ),
        ]
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
