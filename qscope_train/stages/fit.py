"""The fit stage: train one TopK SAE per layer from cached or live activations, data parallel over the
launched processes (or layer-sharded), and write fit/layer<n>.sae.pt + layer<n>.json."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .. import __version__, distributed, memory, release
from ..config import ActivationSource, RunConfig, fingerprint, to_plain
from ..data.batches import BatchSource, cached_batches, live_batches
from ..data.shards import Codec
from ..errors import ConfigError, InputError
from ..fsutil import atomic_write_json
from ..lm import load_lm
from ..load import check_d_model, load_saes
from ..rundir import RunDirs, cache_manifest
from ..sae import TopKSAE
from ..tracking import Tracker
from ..trainer import Checkpoints, fit
from ..trainer import gemm_dtype as trainer_gemm_dtype


class Source(NamedTuple):
    """The activations one rank trains on, and what the run needs to know about them."""

    batches: BatchSource
    steps: int
    d_model: int
    model_name: str
    cache_fingerprint: Optional[dict]  # None for a live source


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict[int, dict]:
    """Data parallel over the launched processes: rank r reads its own shards (or live chunks) and
    batch_size / world rows per step; gradients and dead-latent counts are summed over ranks.

    Layer-sharded (trainer.layer_sharding, by default whenever there are at least as many layers as
    processes), rank r instead trains layers[r::world] alone, on full batches of all shards, and writes
    their files itself; the main process logs its own layers. With
    trainer.layer_groups, a rank's layers train in sequential groups, each a pass of its own over the
    activations, each checkpointed apart and marked done once its files are written."""
    t = cfg.trainer
    rank, world = accelerator.process_index, accelerator.num_processes
    check_processes(cfg, world)
    sharded = t.sharded(len(cfg.layers), world)
    if accelerator.is_main_process and world > 1:
        print(f"fit: {_parallel_plan(cfg, world, sharded)}")
    layers = cfg.layers[rank::world] if sharded else list(cfg.layers)
    readers = (0, 1) if sharded else (rank, world)
    device = accelerator.device
    d_model = _d_model(cfg, dirs)
    mem = memory.plan(
        layers,
        d_model,
        cfg.sae.d_sae,
        cfg.sae.k,
        t.batch_size // (1 if sharded else world),
        t.optimizer,
        t.group_count(),
        device,
        data_parallel=world > 1 and not sharded,
        bf16_gemm=trainer_gemm_dtype(t, torch.device(device)) == torch.bfloat16,
    )
    if accelerator.is_main_process or sharded:
        print(f"fit: {mem.describe(device)}")
    summary: dict[int, dict] = {}
    for i, group in enumerate(mem.groups):
        summary.update(_fit_group(cfg, dirs, accelerator, tracker, group, i, len(mem.groups), sharded, readers))
    return summary


def _fit_group(cfg, dirs: RunDirs, accelerator, tracker: Tracker, layers, i, n_groups, sharded, readers) -> dict:
    """Train one group of layers (all of this rank's, without layer groups) and write their files."""
    t = cfg.trainer
    rank, world = accelerator.process_index, accelerator.num_processes
    ckpt_dir = dirs.checkpoints / (f"rank{rank}-of-{world}" if sharded else "")
    if n_groups > 1:
        ckpt_dir = ckpt_dir / f"group{i}-of-{n_groups}"
    source = activation_source(cfg, dirs, layers, accelerator.device, *readers)
    resume_key = {
        "layers": layers,
        "sae": fingerprint(cfg.sae),
        "trainer": fingerprint(t),
        "steps": source.steps,
        "model": cfg.model.name_or_path,
        "init_from": cfg.init_from,
        "reader": fingerprint(cfg.reader),
        "cache": source.cache_fingerprint,
        "world": world,
    }
    done = ckpt_dir / "done.json"
    if n_groups > 1 and done.is_file() and all(dirs.sae_file(dirs.fit, n).is_file() for n in layers):
        record = json.loads(done.read_text())
        if record["resume_key"] == json.loads(json.dumps(resume_key)):
            print(f"fit: layer group {i + 1} of {n_groups} ({layers}) is done already: {done}")
            return {int(n): m for n, m in record["summary"].items()}
    saes = initial_saes(cfg, source.d_model, layers)
    if t.k_start is not None and not saes[layers[0]].k < t.k_start <= saes[layers[0]].d_sae:
        raise ConfigError(f"trainer.k_start={t.k_start} must lie between k ({saes[layers[0]].k}) and d_sae")
    if n_groups > 1:
        print(f"fit: layer group {i + 1} of {n_groups}: layers {layers}")
    ckpts = Checkpoints(ckpt_dir, t.checkpoint_every, t.keep_checkpoints, resume_key)
    with distributed.local() if sharded else nullcontext():
        summary = fit(
            saes,
            source.batches,
            t,
            source.steps,
            accelerator.device,
            lambda s, m: tracker.log("fit", s, m),
            tracker.progress,
            init_b_dec=cfg.init_from is None,
            merge=cfg.init_from is None,  # a continued release keeps every latent the drift report follows
            checkpoints=ckpts,
        )
    if sharded or accelerator.is_main_process:
        for n, sae in saes.items():
            release.save_tensors(dirs.sae_file(dirs.fit, n), sae.to_release())
            meta = layer_meta(cfg, source.model_name, n, sae, summary[n])
            release.write_sidecar(dirs.sidecar(dirs.fit, n), meta)
        if n_groups > 1:
            atomic_write_json(done, {"resume_key": resume_key, "summary": summary})
    for sae in saes.values():
        sae.to("cpu")  # the next group gets the device to itself
    return summary


def _parallel_plan(cfg: RunConfig, world: int, sharded: bool) -> str:
    """One line saying how the processes share the work, and why."""
    n = len(cfg.layers)
    chosen = "set by trainer.layer_sharding" if cfg.trainer.layer_sharding is not None else "auto"
    if sharded:
        most = -(-n // world)
        return (
            f"layer-sharded over {world} processes ({chosen}): each trains {most if n % world == 0 else f'{n // world}-{most}'}"
            f" of the {n} layers on full batches, with no collectives"
        )
    return (
        f"data parallel over {world} processes ({chosen}): {cfg.trainer.batch_size // world} rows each per step, "
        "2 all-reduces per step"
    )


def _d_model(cfg: RunConfig, dirs: RunDirs) -> int:
    """The residual width, from the cache's manifest or the model's config (without loading weights)."""
    if cfg.reader.source is ActivationSource.live:
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
        return getattr(mc, "text_config", mc).hidden_size
    return cache_manifest(cfg, dirs)["d_model"]


def check_processes(cfg: RunConfig, world: int) -> None:
    """Refuse a process count the fit cannot use: before any stage runs, so no caching is wasted."""
    t = cfg.trainer
    if t.layer_sharding and world > len(cfg.layers) > 0:
        raise ConfigError(f"trainer.layer_sharding: {world} processes for {len(cfg.layers)} layers leaves some idle")
    if world > 1 and not t.sharded(len(cfg.layers), world) and t.batch_size % world:
        raise ConfigError(f"trainer.batch_size={t.batch_size} must divide evenly over {world} processes")


def activation_source(cfg: RunConfig, dirs: RunDirs, layers: list[int], device, rank: int, world: int) -> Source:
    """This rank's batches (batch_size / world rows per layer and step), from the model or the cache.
    rank and world say who splits the activation stream (0 and 1 when each rank reads all of it)."""
    local_batch = cfg.trainer.batch_size // world
    if cfg.reader.source is ActivationSource.live:
        lm = load_lm(cfg.model, device)
        steps = cfg.trainer.max_steps or max(1, cfg.data.train_tokens // cfg.trainer.batch_size)
        # as from the cache: on a GPU the rows cross the bus in the cache dtype and widen there
        out_dtype = cfg.data.cache_dtype.torch if torch.device(device).type == "cuda" else torch.float32
        batches = live_batches(
            lm,
            layers,
            local_batch,
            cfg.data,
            cfg.reader,
            cfg.trainer.seed,
            device,
            rank=rank,
            world=world,
            out_dtype=out_dtype,
        )
        return Source(batches, steps, lm.d_model, lm.name, None)
    manifest = cache_manifest(cfg, dirs)
    steps = cfg.trainer.max_steps or _cached_steps(manifest, cfg, world)
    # on a GPU the rows cross the bus in the cache's dtype (bf16: half the bytes) and widen there
    out_dtype = Codec(**manifest["codec"]).torch_dtype if torch.device(device).type == "cuda" else torch.float32
    batches = cached_batches(
        dirs.cache,
        manifest,
        layers,
        local_batch,
        cfg.reader,
        cfg.trainer.seed,
        rank=rank,
        world=world,
        out_dtype=out_dtype,
    )
    return Source(batches, steps, manifest["d_model"], manifest["model"], manifest["fingerprint"])


def _cached_steps(manifest: dict, cfg: RunConfig, readers: int) -> int:
    """One pass over the smallest layer's training rows (the same for every rank and every sharding)."""
    train = manifest["splits"]["train"]["layers"]
    few = [n for n in cfg.layers if len(train[str(n)]["shards"]) < readers]
    if few:
        raise InputError(
            f"layers {few} have fewer training shards than the {readers} processes: cache more tokens "
            "(data.train_tokens) or smaller shards (data.shard_tokens), or launch fewer processes"
        )
    rows = min(train[str(n)]["rows"] for n in cfg.layers)
    if rows < cfg.trainer.batch_size:
        raise InputError(
            f"the cached training split has {rows:,} rows on its smallest layer, fewer than one batch "
            f"(trainer.batch_size={cfg.trainer.batch_size}): cache more tokens (data.train_tokens) or lower the batch size"
        )
    return max(1, rows // cfg.trainer.batch_size)


def initial_saes(cfg: RunConfig, d_model: int, layers: Optional[list[int]] = None) -> dict[int, TopKSAE]:
    """Fresh SAEs (unit-norm random decoder, tied encoder; layer n from seed + n, so a layer starts the
    same whichever other layers train beside it), or the release named by init_from."""
    layers = list(cfg.layers) if layers is None else layers
    if cfg.init_from is None:
        saes = {}
        for n in layers:
            saes[n] = TopKSAE(d_model, cfg.sae.d_sae, cfg.sae.k, cfg.sae.activation)
            saes[n].init_weights_(generator=torch.Generator().manual_seed(cfg.trainer.seed + n))
        return saes
    saes = load_saes(cfg.init_from, layers, cfg.init_from_revision, cfg.sae.activation)
    check_d_model(saes, f"init_from={cfg.init_from!r}", d_model, cfg.model.name_or_path)
    first = saes[layers[0]]
    if (first.d_sae, first.k) != (cfg.sae.d_sae, cfg.sae.k):
        print(f"init_from: using the checkpoint's d_sae={first.d_sae}, k={first.k} (sae.* settings ignored)")
    return saes


def release_name(cfg: RunConfig, d_sae: int, k: int) -> str:
    model = cfg.release_model_name or Path(cfg.model.name_or_path.rstrip("/")).name
    if d_sae % 1024 == 0:
        return str(release.ReleaseName.for_sae(model, d_sae, k))
    return f"SAE-Res-{model}-W{d_sae}-L0_{k}"


def layer_meta(cfg: RunConfig, model_name: str, n: int, sae: TopKSAE, summary: Optional[dict]) -> dict:
    """The layer<n>.json sidecar: what the SAE reads, its shape, and how it was trained."""
    return {
        "format": "qwen-scope layer<n>.sae.pt",
        "release_name": release_name(cfg, sae.d_sae, sae.k),
        "model": model_name,
        "model_revision": cfg.model.revision,
        "layer": n,
        "hook_point": release.HOOK_POINT,
        "d_model": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "activation": sae.activation.value,
        "init_from": cfg.init_from,
        "tokens_trained": (summary or {}).get("tokens_trained", 0),
        "train": summary or {},
        "data": to_plain(cfg.data),
        "reader": to_plain(cfg.reader),
        # the settings this run used: warmup, decay and dead window resolved for its length
        "trainer": to_plain(cfg.trainer.resolved(summary["steps"]) if summary else cfg.trainer),
        "qscope_train_version": __version__,
    }
