"""The training loop: one TopK SAE per layer, all fed from the same stream of per-layer batches.

Per step and layer: forward, FVU loss, backward, drop the gradient parallel to each decoder column,
optimizer step (optim.py), renormalise decoder columns, update the tokens-since-fired counters. A step
reads nothing back to the host (metrics stay on the device until a log step), so a GPU never waits on
the Python thread; batches arrive prefetched (data/prefetch.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import distributed, duplicates, losses, objectives
from .checkpoints import Checkpoints, restore, state_payload
from .config import TrainerConfig
from .data.batches import BatchSource
from .data.prefetch import Prefetched, to_device
from .errors import QScopeError
from .init import initialise
from .losses import sum_stats, variance_from_stats
from .objectives import auxk_loss
from .optim import averaged_weight, build, use_averaged_weights_
from .sae import SparseCode, TopKSAE


@dataclass
class LayerState:
    sae: TopKSAE
    opt: torch.optim.Optimizer  # or schedulefree's wrapper around one
    sched: torch.optim.lr_scheduler.LambdaLR
    since_fired_F: Tensor  # tokens since each latent last fired
    tokens: int = 0
    # the rest stays on the device and is read only on log and checkpoint steps
    fvu_ema: Optional[Tensor] = None
    resid_var: Optional[Tensor] = None  # the last step's residual variance: AuxK's divisor (see _backward)
    last: Optional[Tensor] = None  # the last step's [fvu, auxk, l0]
    first_bad: Optional[Tensor] = None  # [step, loss] of the first non-finite loss; step -1 while none
    lr: float = 0.0  # the rate the last step used
    merges: int = 0  # pairs of duplicate latents merged in this process (duplicates.merge_)
    # on a step a merge pass follows: the step's code and residuals (this rank's rows), squared error (all ranks')
    step_code: Optional[SparseCode] = None
    step_err: Optional[Tensor] = None
    step_resid: Optional[Tensor] = None
    # what one merge pass's search keeps for the next (near_parallel.ParallelSearch)
    search: duplicates.ParallelSearch = field(default_factory=duplicates.ParallelSearch)


class NonFiniteLossError(QScopeError, FloatingPointError):
    """The loss became NaN or inf."""


def k_at(step: int, k: int, cfg: TrainerConfig) -> int:
    """k annealed linearly from cfg.k_start to k over cfg.k_anneal_steps steps (k itself without k_start)."""
    if cfg.k_start is None or step >= cfg.k_anneal_steps:
        return k
    return round(cfg.k_start + (k - cfg.k_start) * step / cfg.k_anneal_steps)


# a step's statistics per layer, added over ranks: [fvu, auxk, non-zero codes, residual sum of squares,
# residual row sum (d_model)]
FVU, AUXK, NONZERO, RESID_SQ, RESID_SUM = 0, 1, 2, 3, 4


def gemm_dtype(cfg: TrainerConfig, device: torch.device) -> torch.dtype:
    """The training encoder GEMM's dtype: trainer.encoder_dtype, or bf16 on CUDA and fp32 elsewhere."""
    if cfg.encoder_dtype is not None:
        return cfg.encoder_dtype.torch
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _backward(
    state: LayerState, x_BD: Tensor, cfg: TrainerConfig, step: int, var, fired_F, stats, keep_code: bool = False
) -> None:
    """Forward, loss and backward for one layer (its gradients accumulate into the parameters' .grad);
    adds the rows each latent fired on to fired_F (d_sae,) and this rank's statistics to stats; with
    keep_code, keeps the step's code in state.step_code for the merge pass that follows.

    AuxK divides by the residual variance of the previous step (resid_var): with data parallel that is
    the global batch's without a third collective, and one step's lag does not change its scale."""
    sae = state.sae
    out, loss, main = objectives.compute(sae, x_BD, cfg, k_at(step, sae.k, cfg), var, gemm_dtype(cfg, x_BD.device))
    aux = None
    # no latent can be dead before dead_after_tokens tokens: a host-side test, unlike dead_F.any()
    if cfg.auxk_coef > 0 and state.resid_var is not None and state.tokens >= cfg.dead_after_tokens:
        dead_F = state.since_fired_F >= cfg.dead_after_tokens
        # an accelerator runs AuxK's term (zero then) without asking whether any latent is dead; a CPU reads
        # the answer for nothing, and skipping the term is exact (every rank holds the same counters)
        if not losses.reads_are_free(dead_F) or bool(dead_F.any()):
            aux = auxk_loss(sae, x_BD, out, dead_F, cfg.auxk_k or sae.d_model // 2, state.resid_var)
            loss = loss + cfg.auxk_coef * aux
    loss.backward()
    with torch.no_grad():
        vals_BK, idx_BK = out.code
        state.step_code = SparseCode(vals_BK.detach(), idx_BK) if keep_code else None
        fired_BK = vals_BK != 0
        fired_F.index_add_(0, idx_BK.reshape(-1), fired_BK.reshape(-1).to(fired_F.dtype))
        e_BD = x_BD - out.x_hat_BD.detach()
        state.step_resid = e_BD if keep_code else None
        stats[FVU] += main.detach()
        if aux is not None:
            stats[AUXK] += aux.detach()
        stats[NONZERO] += fired_BK.sum()
        stats[RESID_SQ] += e_BD.pow(2).sum()
        stats[RESID_SUM:] += e_BD.sum(0)


def _update(state: LayerState, cfg: TrainerConfig, step: int, rows: int, fired_F: Tensor, stats: Tensor) -> None:
    """The optimizer step from the (summed) gradients, and the counters and metrics from the (summed)
    fired counts and statistics of `rows` rows; all on the device."""
    sae = state.sae
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    sae.remove_parallel_grad_()
    state.lr = state.opt.param_groups[0]["lr"]  # the rate this step used (the scheduler moves it on below)
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)  # free this layer's gradients before the next layer's step
    state.sched.step()
    sae.unit_norm_decoder_()
    with torch.no_grad():
        state.since_fired_F += rows
        state.since_fired_F.masked_fill_(fired_F > 0, 0)
        main, loss = stats[FVU], stats[FVU] + stats[AUXK]
        bad = ~torch.isfinite(loss) & (state.first_bad[0] < 0)
        now = torch.stack([torch.full_like(loss, step), loss]).to(state.first_bad.dtype)
        state.first_bad = torch.where(bad, now, state.first_bad)
        state.fvu_ema = main.clone() if state.fvu_ema is None else state.fvu_ema * 0.9 + main * 0.1
        state.last = torch.stack([main, stats[AUXK], stats[NONZERO] / rows])
        state.resid_var = (stats[RESID_SQ] - stats[RESID_SUM:].pow(2).sum() / rows).clamp_min(0)
        state.step_err = None if state.step_code is None else stats[RESID_SQ].clone()
    state.tokens += rows


def _stats_size(sae: TopKSAE) -> int:
    return RESID_SUM + sae.d_model


def flat_buffer(states: dict[int, LayerState], device) -> distributed.FlatBuffer:
    """Every layer's gradients, fired counts (d_sae) and step statistics in one buffer (data parallel)."""
    return distributed.FlatBuffer(
        {n: (list(s.sae.parameters()), [s.sae.d_sae, _stats_size(s.sae)]) for n, s in states.items()}, device
    )


def train_steps(
    states: dict[int, LayerState],
    xs: dict[int, Tensor],
    cfg: TrainerConfig,
    step: int,
    flat: Optional[distributed.FlatBuffer] = None,
    keep_code: bool = False,
) -> None:
    """One optimizer step for every layer on this rank's rows xs {layer: (B, d_model)}; nothing is read back
    to the host. With several ranks (data parallel, `flat` given) it is a step on the global batch, with
    two all-reduces in all: the rows' sums and squares (each FVU's divisor), then `flat`. cfg is
    resolved (TrainerConfig.resolved). keep_code: leave each layer's code and squared error of this
    step (before its update) in step_code and step_err, for a merge pass (duplicates.merge_)."""
    rows = next(iter(xs.values())).shape[0] * distributed.world()
    if not distributed.active():
        for n, state in states.items():
            d_sae, x_BD = state.sae.d_sae, xs[n].float()
            fired_F = torch.zeros(d_sae, device=x_BD.device)
            stats = torch.zeros(_stats_size(state.sae), device=x_BD.device)
            state.opt.zero_grad(set_to_none=True)
            _backward(state, x_BD, cfg, step, None, fired_F, stats, keep_code)
            _update(state, cfg, step, rows, fired_F, stats)
        return
    assert flat is not None, "data parallel needs the FlatBuffer"
    x_stats = distributed.sum_(torch.stack([sum_stats(xs[n].float()) for n in states]))
    flat.buffer.zero_()
    for i, (n, state) in enumerate(states.items()):
        flat.attach(n)
        fired_F, stats = flat.extras[n]
        _backward(state, xs[n].float(), cfg, step, variance_from_stats(x_stats[i]), fired_F, stats, keep_code)
    distributed.sum_(flat.buffer)
    for n, state in states.items():
        fired_F, stats = flat.extras[n]
        _update(state, cfg, step, rows, fired_F, stats)


def train_step(state: LayerState, x_BD: Tensor, cfg: TrainerConfig, step: int = 0) -> None:
    """train_steps for one layer (benchmarks and tests); its metrics are in state.last."""
    train_steps({0: state}, {0: x_BD}, cfg, step)


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
    first_bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)
    return LayerState(sae, opt, sched, torch.zeros(sae.d_sae, dtype=torch.long, device=device), first_bad=first_bad)


def fit(
    saes: dict[int, TopKSAE],
    batches: BatchSource,
    cfg: TrainerConfig,
    total_steps: int,
    device: torch.device | str,
    log: Callable[[int, dict], None],
    progress: Callable[..., object],
    init_b_dec: bool = True,
    merge: bool = True,
    checkpoints: Optional[Checkpoints] = None,
    probe: Optional[Callable[[int, dict[int, TopKSAE]], None]] = None,
) -> dict[int, dict]:
    """Train every SAE for total_steps steps, resuming from the latest checkpoint if there is one.

    `batches` is iterated once, cfg.prefetch_batches ahead on a background thread; the position after
    each trained batch (its state_dict(); None if it cannot seek) is what a checkpoint records. Metrics
    are read from the device only on log steps, where a non-finite loss also stops the run (and before
    every checkpoint, so none holds one). `probe(step, saes)`, if given, is called on log steps with
    copies of the SAEs at the weights the run would export then (exported_copy). With `merge` (fresh
    runs), the decoder directions of duplicate latents are merged every cfg.merge_every_tokens
    (duplicates.merge_; never when merge_cos is None). Returns a per-layer summary (tokens, final FVU,
    dead fraction, merges); the SAEs are left at their exported weights, in the release's form.
    """
    cfg = cfg.resolved(total_steps)
    device = torch.device(device)
    states = {n: new_state(sae, cfg, total_steps, device) for n, sae in saes.items()}
    if cfg.center_input:
        for s in states.values():
            s.sae.center_input_(True)  # before a restore: checkpoints hold the centred form
    ckpt = checkpoints.latest() if checkpoints else None
    start = 0
    if ckpt is not None:
        restore(states, batches, ckpt)
        start = ckpt["step"] + 1
        print(f"resume: continuing after step {ckpt['step']} from {checkpoints.dir}")
    flat = flat_buffer(states, device) if distributed.active() else None
    if merge and cfg.merge_cos is not None and duplicates.first_merge_step(cfg, total_steps) is None:
        if distributed.rank() == 0:
            print(
                f"fit: no duplicate-merge pass fits this run: the first dead window ({cfg.dead_after_tokens:,} "
                f"tokens) is longer than the run ({total_steps * cfg.batch_size:,} tokens); lower "
                "trainer.dead_after_tokens to merge"
            )
    traffic_before, first_step = distributed.traffic(), None
    with Prefetched(batches, cfg.prefetch_batches, pin=device.type == "cuda") as source:
        it = iter(source)
        if ckpt is None and init_b_dec:
            it = initialise({n: st.sae for n, st in states.items()}, it, cfg, device)
        with progress(total=total_steps, desc="fit", unit="step", initial=start) as bar:
            for step, (batch, position) in zip(range(start, total_steps), it, strict=False):
                if first_step is None:  # the initialisation's collectives are not the steps'
                    traffic_before, first_step = distributed.traffic(), step
                xs = to_device(batch, device)
                merging = merge and duplicates.merge_step(step, cfg, total_steps)
                train_steps(states, xs, cfg, step, flat, keep_code=merging)
                if merging:
                    only_twins = duplicates.twins_only(step, cfg, total_steps)
                    cheap = duplicates.cheap_only(step, cfg, total_steps)
                    for n, s in states.items():
                        seed = (cfg.seed * 65_537 + n) * 1_000_003 + step
                        kept = (s.step_code, s.step_err, s.step_resid)
                        s.merges += duplicates.merge_(
                            s.sae, s.opt, s.since_fired_F, *kept, cfg, seed, only_twins, s.search, cheap
                        )
                        s.step_code = s.step_err = s.step_resid = None
                if step % cfg.log_every == 0 or step == total_steps - 1:
                    _check_finite(states, checkpoints)
                    metrics = _read_metrics(states, cfg)
                    log(step, metrics)
                    if probe is not None:
                        probe(step, {n: exported_copy(s) for n, s in states.items()})
                    worst = max(metrics.values(), key=lambda m: m["fvu"])
                    bar.set_postfix(
                        fvu=f"{worst['fvu']:.3f}", dead=f"{worst['dead_frac']:.1%}", lr=f"{worst['lr']:.1e}"
                    )
                if checkpoints and checkpoints.every and (step + 1) % checkpoints.every == 0 and step + 1 < total_steps:
                    _check_finite(states, checkpoints)
                    payload = state_payload(states, position)
                    if distributed.rank() == 0:
                        checkpoints.save(step, payload)
                bar.update(1)
    _check_finite(states, checkpoints)
    for s in states.values():
        use_averaged_weights_(s.opt)
        s.sae.center_input_(False)
    traffic = _per_step(
        traffic_before, distributed.traffic(), total_steps - (total_steps if first_step is None else first_step)
    )
    if distributed.active() and distributed.rank() == 0:
        print(
            f"fit: data parallel over {distributed.world()} processes, {traffic['all_reduce_calls']:g} all-reduce "
            f"calls and {traffic['all_reduce_bytes'] / 2**20:,.1f} MiB per step"
        )
    return {
        n: {
            "tokens_trained": s.tokens,
            "steps": total_steps,
            "train_fvu_ema": None if s.fvu_ema is None else float(s.fvu_ema),
            "dead_frac": float((s.since_fired_F >= cfg.dead_after_tokens).float().mean()),
            "duplicates_merged": s.merges,
            **{f"{key}_per_step": value for key, value in traffic.items()},
        }
        for n, s in states.items()
    }


def _per_step(before: dict[str, int], after: dict[str, int], steps: int) -> dict[str, float]:
    return {key: (after[key] - before[key]) / max(steps, 1) for key in after}


def _read_metrics(states: dict[int, LayerState], cfg: TrainerConfig) -> dict[int, dict]:
    """The last step's metrics of every layer, read from the device at once."""
    dead = torch.stack([(s.since_fired_F >= cfg.dead_after_tokens).float().mean() for s in states.values()])
    last = torch.stack([s.last for s in states.values()])
    rows = torch.cat([last, dead[:, None]], 1).tolist()
    keys = ("fvu", "auxk", "l0", "dead_frac")
    return {
        n: {**dict(zip(keys, r, strict=True)), "lr": s.lr, "merged": s.merges}
        for (n, s), r in zip(states.items(), rows, strict=True)
    }


def _check_finite(states: dict[int, LayerState], checkpoints: Optional[Checkpoints]) -> None:
    """Raise NonFiniteLossError naming the layer and step of the first non-finite loss, if any."""
    bad = torch.stack([s.first_bad for s in states.values()]).tolist()
    for n, (step, loss) in zip(states, bad, strict=True):
        if step >= 0:
            kept = f"; the last good checkpoint is in {checkpoints.dir}" if checkpoints else ""
            raise NonFiniteLossError(
                f"layer {n}, step {int(step)}: loss is {loss}; stopping (check the activations and lr){kept}"
            )
