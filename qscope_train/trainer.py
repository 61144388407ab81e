"""The training loop: one TopK SAE per layer, all fed from the same stream of per-layer batches.

Per step and layer: forward, FVU loss, backward, drop the gradient parallel to each decoder column,
optimizer step (optim.py), renormalise decoder columns, update the tokens-since-fired counters.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import distributed, objectives
from .config import Activation, DecoderInit, TrainerConfig, fingerprint_diff
from .data.batches import BatchSource
from .errors import InputError, QScopeError
from .fsutil import atomic_torch_save, atomic_write_json
from .losses import auxk, dead_topk, global_mean
from .optim import averaged_weight, build, use_averaged_weights_
from .sae import ForwardOutput, TopKSAE


def keep_freed_memory_on_cpu() -> bool:
    """Ask glibc to serve every allocation from its heap and keep freed memory there.

    By default glibc maps each block above 32 MiB fresh from the OS and unmaps it on free, so every
    CPU training step page-faults its (B, d_sae) pre-activations and (d_sae, d_model) gradients in
    again: 10-20 % of a step at d_sae 16384 (docs/BENCHMARKS.md). Process-wide, so the CLI calls it
    (never an import or fit); a no-op where the C library is not glibc. Returns whether it took effect.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


@dataclass
class LayerState:
    sae: TopKSAE
    opt: torch.optim.Optimizer  # or schedulefree's wrapper around one
    sched: torch.optim.lr_scheduler.LambdaLR
    since_fired_F: Tensor  # tokens since each latent last fired
    tokens: int = 0
    fvu_ema: Optional[float] = None


class NonFiniteLossError(QScopeError, FloatingPointError):
    """The loss became NaN or inf."""


def auxk_loss(sae: TopKSAE, x_BD: Tensor, out: ForwardOutput, dead_F: Tensor, k_aux: int, reduce=None) -> Tensor:
    """AuxK for one SAE: its top k_aux dead latents (losses.dead_topk) reconstruct the detached residual
    (losses.auxk); the gradient reaches only the dead rows of W_dec, W_enc and b_enc (never b_dec)."""
    n_dead = int(dead_F.sum())
    relu = sae.activation is Activation.relu_topk
    idx_BA = dead_topk(out.pre_BF, dead_F, min(k_aux, n_dead), n_dead, relu)
    return auxk(x_BD, out.x_hat_BD, sae.decode_selected(x_BD, out.pre_BF, idx_BA), reduce)


def k_at(step: int, k: int, cfg: TrainerConfig) -> int:
    """k annealed linearly from cfg.k_start to k over cfg.k_anneal_steps steps (k itself without k_start)."""
    if cfg.k_start is None or step >= cfg.k_anneal_steps:
        return k
    return round(cfg.k_start + (k - cfg.k_start) * step / cfg.k_anneal_steps)


def train_step(state: LayerState, x_BD: Tensor, cfg: TrainerConfig, step: int = 0) -> dict[str, float]:
    """One optimizer step on this rank's rows; with several ranks, on the global batch (data parallel).
    cfg is resolved (TrainerConfig.resolved: no None left that depends on the run)."""
    sae = state.sae
    x_BD = x_BD.float()
    reduce = distributed.sum_ if distributed.active() else None
    out, loss, main = objectives.compute(sae, x_BD, cfg, k_at(step, sae.k, cfg), reduce, cfg.encoder_dtype.torch)
    aux = None
    dead_F = state.since_fired_F >= cfg.dead_after_tokens  # identical on every rank
    if cfg.auxk_coef > 0 and bool(dead_F.any()):
        aux = auxk_loss(sae, x_BD, out, dead_F, cfg.auxk_k or sae.d_model // 2, reduce)
        loss = main + cfg.auxk_coef * aux
    total = distributed.sum_(loss.detach().clone())
    if not torch.isfinite(total):
        raise NonFiniteLossError(f"loss is {total.item()}")
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    if reduce is not None:
        for p in sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            distributed.sum_(p.grad)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    sae.remove_parallel_grad_()
    lr = state.opt.param_groups[0]["lr"]  # the rate this step used (the scheduler moves it on below)
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)  # free this layer's gradients before the next layer's step
    state.sched.step()
    sae.unit_norm_decoder_()
    with torch.no_grad():
        fired_F = distributed.any_(out.code.fire_counts(sae.d_sae) > 0)
        rows = x_BD.shape[0] * distributed.world()
        state.since_fired_F += rows
        state.since_fired_F[fired_F] = 0
        l0 = float((out.code.vals_BK != 0).sum(-1).float().mean())
    state.tokens += rows
    value = distributed.sum_(main.detach().clone()).item()
    state.fvu_ema = value if state.fvu_ema is None else 0.9 * state.fvu_ema + 0.1 * value
    aux_value = distributed.sum_(aux.detach().clone()).item() if aux is not None else 0.0
    return {"fvu": value, "auxk": aux_value, "l0": l0, "lr": lr}


def exported_copy(state: LayerState) -> TopKSAE:
    """A copy of the layer's SAE at the weights the run would export now (averaged, uncentred); the
    training state is left exactly as it is."""
    sae = copy.deepcopy(state.sae)
    with torch.no_grad():
        for mine, p in zip(sae.parameters(), state.sae.parameters(), strict=True):
            mine.copy_(averaged_weight(state.opt, p))
            mine.grad = None
    sae.center_input_(False)
    return sae


def new_state(sae: TopKSAE, cfg: TrainerConfig, total_steps: int, device: torch.device | str) -> LayerState:
    """The optimizer and learning-rate schedule (optim.build) for one SAE, and its dead-latent counters."""
    cfg = cfg.resolved(total_steps)
    sae.to(device)
    opt, sched = build(list(sae.parameters()), cfg, sae.d_sae, total_steps)
    return LayerState(sae, opt, sched, torch.zeros(sae.d_sae, dtype=torch.long, device=device))


class Checkpoints:
    """Atomic step-<n>.pt files in one directory, the last `keep` kept, refused if the settings differ."""

    def __init__(self, directory: Path, every: int, keep: int, fingerprint: dict) -> None:
        self.dir, self.every, self.keep, self.fingerprint = Path(directory), every, keep, fingerprint

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.pt"))

    def latest(self) -> Optional[dict]:
        files = self._files()
        if not files:
            return None
        ckpt = torch.load(files[-1], map_location="cpu", weights_only=True, mmap=True)
        if ckpt["fingerprint"] != self.fingerprint:
            raise InputError(
                f"{files[-1]} was written by a run with other settings; delete {self.dir} to start over "
                f"(differs: {fingerprint_diff(ckpt['fingerprint'], self.fingerprint)})"
            )
        return ckpt

    def save(self, step: int, payload: dict) -> Path:
        payload = {"fingerprint": self.fingerprint, "step": step, **payload}
        path = atomic_torch_save(self.dir / f"step-{step:09d}.pt", payload)
        atomic_write_json(self.dir / "latest.json", {"step": step, "file": path.name})
        for old in self._files()[: -self.keep]:
            old.unlink()
        return path


def _state_payload(states: dict[int, LayerState], reader: BatchSource) -> dict:
    layers = {
        str(n): {
            "sae": s.sae.state_dict(),
            "opt": s.opt.state_dict(),
            "sched": s.sched.state_dict(),
            "since_fired": s.since_fired_F.cpu(),
            "tokens": s.tokens,
            "fvu_ema": s.fvu_ema,
        }
        for n, s in states.items()
    }
    return {"layers": layers, "readers": distributed.gather(reader.state_dict())}  # one per rank, in rank order


def _restore(states: dict[int, LayerState], reader: BatchSource, ckpt: dict) -> None:
    for n, s in states.items():
        saved = ckpt["layers"][str(n)]
        s.sae.load_state_dict(saved["sae"])
        s.opt.load_state_dict(saved["opt"])
        s.sched.load_state_dict(saved["sched"])
        s.since_fired_F.copy_(saved["since_fired"])
        s.tokens, s.fvu_ema = saved["tokens"], saved["fvu_ema"]
    readers = ckpt["readers"]
    if len(readers) != distributed.world():
        raise InputError(f"the checkpoint was written by {len(readers)} processes, this run has {distributed.world()}")
    if readers[distributed.rank()] is not None:
        reader.load_state_dict(readers[distributed.rank()])
    else:
        print("resume: this activation source cannot seek, so its stream starts again from the beginning")


@torch.no_grad()
def _init_from_rows(states: dict[int, LayerState], peeked: list, it, cfg: TrainerConfig, device) -> list:
    """decoder_init=data: each decoder direction starts as a distinct training row minus b_dec, normalised
    (the encoder as encoder_init_norm times it), drawn from the first global batches (every rank's rows in
    rank order, so any number of processes starts alike). Returns the batches read, which training then
    starts with."""
    first = next(iter(states))
    d_sae = states[first].sae.d_sae
    while sum(b[first].shape[0] for b in peeked) * distributed.world() < d_sae:
        try:
            peeked.append(next(it))
        except StopIteration:
            break
    for n, state in states.items():
        sae = state.sae
        g = torch.Generator().manual_seed(cfg.seed * 65_537 + n)  # per layer: whichever layers train beside it
        rows = torch.cat([distributed.cat(b[n].to(device).float()) for b in peeked]) - sae.b_dec
        rows = rows[torch.isfinite(rows).all(1) & (rows.norm(dim=1) > 0)]  # a bad row fails at its own step
        pick = torch.randperm(rows.shape[0], generator=g)[:d_sae].to(device)
        dirs_FD = torch.nn.functional.normalize(rows[pick], dim=-1)
        m = dirs_FD.shape[0]  # fewer rows than latents: the rest keep their random directions
        sae.W_dec_FD[:m] = dirs_FD
        sae.W_enc[:m] = dirs_FD * cfg.encoder_init_norm
        sae.W_enc[m:] = sae.W_dec_FD[m:] * cfg.encoder_init_norm
        _fit_encoder_scale_(sae, rows[:SCALE_ROWS])
    return peeked


SCALE_ROWS = 1024  # rows that set the data-initialised encoder's scale (a (rows, d_sae) matrix)


@torch.no_grad()
def _fit_encoder_scale_(sae: TopKSAE, rows_ND: Tensor) -> None:
    """Scale W_enc so the first reconstruction of rows_ND (centred rows) has its least-squares size.
    Directions taken from the data each read a large share of a row, so k of them at encoder_init_norm
    reconstruct several times the row (an initial FVU far above 1, which the first steps then spend
    undoing); b_enc is 0 here, so a positive scale leaves which latents fire unchanged."""
    if rows_ND.shape[0] == 0:
        return
    pre = rows_ND @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    if sae.activation is Activation.relu_topk:
        vals = vals.relu()
    x_hat = torch.nn.functional.embedding_bag(idx, sae.W_dec_FD, mode="sum", per_sample_weights=vals)
    scale = (rows_ND * x_hat).sum() / x_hat.pow(2).sum()
    if torch.isfinite(scale) and scale > 0:
        sae.W_enc.mul_(scale)


def fit(
    saes: dict[int, TopKSAE],
    batches: BatchSource,
    cfg: TrainerConfig,
    total_steps: int,
    device: torch.device | str,
    log: Callable[[int, dict], None],
    progress: Callable[..., object],
    init_b_dec: bool = True,
    checkpoints: Optional[Checkpoints] = None,
    probe: Optional[Callable[[int, dict[int, TopKSAE]], None]] = None,
) -> dict[int, dict]:
    """Train every SAE for total_steps steps, resuming from the latest checkpoint if there is one.

    `batches` is iterated once; its state_dict() (the position; None if it cannot seek) is checkpointed.
    `probe(step, saes)`, if given, is called whenever metrics are logged, with copies of the SAEs at the
    weights the run would export at that point (exported_copy). Returns a per-layer summary (tokens,
    final FVU, dead fraction); the SAEs are left at their exported weights, in the release's form.
    """
    cfg = cfg.resolved(total_steps)
    states = {n: new_state(sae, cfg, total_steps, device) for n, sae in saes.items()}
    if cfg.center_input:
        for s in states.values():
            s.sae.center_input_(True)  # before a restore: checkpoints hold the centred form
    ckpt = checkpoints.latest() if checkpoints else None
    start = 0
    if ckpt is not None:
        _restore(states, batches, ckpt)
        start = ckpt["step"] + 1
        print(f"resume: continuing after step {ckpt['step']} from {checkpoints.dir}")
    it = iter(batches)
    n_peeked = 0  # batches read ahead for initialisation: the reader's position runs ahead until trained
    if ckpt is None and init_b_dec:
        peeked = [next(it)]
        with torch.no_grad():
            for n, state in states.items():
                state.sae.b_dec.copy_(global_mean(peeked[0][n].to(device).float(), distributed.sum_))
        if cfg.decoder_init is DecoderInit.data:
            peeked = _init_from_rows(states, peeked, it, cfg, device)
        n_peeked = len(peeked)
        it = itertools.chain(peeked, it)

    with progress(total=total_steps, desc="fit", unit="step", initial=start) as bar:
        for step, batch in zip(range(start, total_steps), it, strict=False):
            metrics = {}
            for n, state in states.items():
                try:
                    m = train_step(state, batch[n].to(device, non_blocking=True), cfg, step)
                except NonFiniteLossError as e:
                    kept = f"; the last good checkpoint is in {checkpoints.dir}" if checkpoints else ""
                    raise NonFiniteLossError(
                        f"layer {n}, step {step}: {e}; stopping (check the activations and lr){kept}"
                    ) from None
                m["dead_frac"] = float((state.since_fired_F >= cfg.dead_after_tokens).float().mean())
                metrics[n] = m
            if step % cfg.log_every == 0 or step == total_steps - 1:
                log(step, metrics)
                if probe is not None:
                    probe(step, {n: exported_copy(s) for n, s in states.items()})
                worst = max(metrics.values(), key=lambda m: m["fvu"])
                bar.set_postfix(fvu=f"{worst['fvu']:.3f}", dead=f"{worst['dead_frac']:.1%}", lr=f"{worst['lr']:.1e}")
            due = checkpoints and checkpoints.every and (step + 1) % checkpoints.every == 0
            if due and n_peeked <= step + 1 < total_steps:  # never while read-ahead batches wait untrained
                payload = _state_payload(states, batches)
                if distributed.rank() == 0:
                    checkpoints.save(step, payload)
            bar.update(1)
    for s in states.values():
        use_averaged_weights_(s.opt)
        s.sae.center_input_(False)
    return {
        n: {
            "tokens_trained": s.tokens,
            "steps": total_steps,
            "train_fvu_ema": s.fvu_ema,
            "dead_frac": float((s.since_fired_F >= cfg.dead_after_tokens).float().mean()),
        }
        for n, s in states.items()
    }
