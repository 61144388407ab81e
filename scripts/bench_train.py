"""Times qscope-train's full SAE training step on random inputs; prints one JSON line.

Inside the timed window, per step: forward (dense encoder GEMM without autograd, top-k, sparse gather,
embedding_bag decode), FVU (+ AuxK), backward (sparse encoder/decoder gradients), removal of the
gradient parallel to the decoder directions, Adam, learning-rate schedule, decoder renormalisation,
dead-latent counters. The floor, timed in the same process right after each step on the same batch,
is the dense encoder GEMM plus the top-k: what any TopK trainer must compute.

Also timed, once after the steps: a duplicate-merge pass (duplicates.merge_: the d_sae x d_sae decoder
cosines in chunks, the pairs' co-firing sums from the last step's code, kept by that step as the
trainer does, and the merged pairs' decoder rows rewritten), which a fresh fit runs between steps up
to 32 times per run (trainer.merge_cos, on by default; none before the first dead window); the figure
is its cost in steps, so its share of a run of S steps is at most 32 x that / S.

On CUDA (--device cuda) the step reads nothing back, so steps are timed together (the GPU synchronised
once before and once after all of them) and the floor likewise; on a CPU each step is timed alone and
the median is reported.

Usage: python scripts/bench_train.py --d-model 1024 --d-sae 16384 --k 64 --batch 4096 [--auxk-all-dead]
           [--device cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qscope_train import duplicates, screen
from qscope_train.allocator import keep_freed_memory_on_cpu
from qscope_train.config import DType, TrainerConfig
from qscope_train.sae import TopKSAE
from qscope_train.trainer import new_state, train_step, train_steps


def write_profile(path: Path, run, device: torch.device) -> None:
    """Run `run` under torch.profiler and write its ops, by their own time on the device, to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="encoder GEMM dtype")
    p.add_argument("--auxk-all-dead", action="store_true", help="every latent dead on every step (AuxK's worst case)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-screen", action="store_true", help="form every fp32 pre-activation in fp32 (no bf16 screen, screen.py)"
    )
    p.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's allocator as it is (fit changes it on CPUs)"
    )
    p.add_argument("--profile", type=Path, help="after timing, profile three steps and write the ops table here")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    if a.no_screen:
        screen.applies = lambda *args: False
    if not a.default_malloc:
        keep_freed_memory_on_cpu()  # what trainer.fit does on a CPU
    torch.manual_seed(a.seed)
    total = a.warmup + a.steps
    device = torch.device(a.device)
    batches = [torch.randn(a.batch, a.d_model).to(device) for _ in range(total)]
    cfg = TrainerConfig(batch_size=a.batch, warmup_steps=0, encoder_dtype=DType(a.dtype), merge_cos=0.5).resolved(
        10_000
    )
    sae = TopKSAE(a.d_model, a.d_sae, a.k)
    sae.init_weights_(batches[0].cpu(), generator=torch.Generator().manual_seed(a.seed))
    state = new_state(sae, cfg, 10_000, device)

    gemm_dtype = torch.float32 if a.dtype == "float32" else torch.bfloat16

    @torch.no_grad()
    def floor_op(x: torch.Tensor) -> None:
        if gemm_dtype == torch.float32:
            pre = torch.addmm(sae.b_enc, x, sae.W_enc.T)
        else:
            pre = (x.to(gemm_dtype) @ sae.W_enc.to(gemm_dtype).T).float() + sae.b_enc
        pre.topk(a.k, dim=-1, sorted=False)

    def step_once(x: torch.Tensor) -> None:
        if a.auxk_all_dead:
            state.since_fired_F.fill_(cfg.dead_after_tokens)
            state.tokens = max(state.tokens, cfg.dead_after_tokens)  # AuxK runs from the second step on
        train_step(state, x, cfg)

    times, floor = [], []
    if device.type == "cuda":
        for x in batches[: a.warmup]:
            step_once(x)
        sync = torch.cuda.synchronize
        sync()
        t0 = time.perf_counter()
        for x in batches[a.warmup :]:
            step_once(x)
        sync()
        t1 = time.perf_counter()
        for x in batches[a.warmup :]:
            floor_op(x)
        sync()
        times = [(t1 - t0) / a.steps] * a.steps
        floor = [(time.perf_counter() - t1) / a.steps] * a.steps
    else:
        # The floor is timed right after each step on the same batch, so that the machine's drift over a
        # run (±15 % on a shared VM) moves both figures together.
        for step, x in enumerate(batches):
            t0 = time.perf_counter()
            step_once(x)
            t1 = time.perf_counter()
            floor_op(x)
            if step >= a.warmup:
                times.append(t1 - t0)
                floor.append(time.perf_counter() - t1)
    if a.profile:
        write_profile(a.profile, lambda: [step_once(x) for x in batches[-3:]], device)
    metrics = dict(zip(("fvu", "auxk", "l0"), state.last.tolist(), strict=True))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # one more (untimed) step, keeping its code for the pass as a fit does on a step a pass follows
    train_steps({0: state}, {0: batches[-1]}, cfg, len(batches), keep_code=True)
    sync()
    t0 = time.perf_counter()
    merged = duplicates.merge_(
        sae, state.opt, state.since_fired_F, state.step_code, state.step_err, state.step_resid, cfg
    )
    sync()
    merge_s = time.perf_counter() - t0

    step_s, floor_s = statistics.median(times), statistics.median(floor)
    print(
        json.dumps(
            {
                "tokens_per_s": round(a.batch / step_s, 1),
                "floor_tokens_per_s": round(a.batch / floor_s, 1),
                "fraction_of_floor": round(floor_s / step_s, 3),
                "step_s_median": round(step_s, 4),
                "step_s_min": round(min(times), 4),
                "step_s_max": round(max(times), 4),
                "last_fvu": round(metrics["fvu"], 4),
                "last_auxk": round(metrics["auxk"], 4),
                "merge_pass_s": round(merge_s, 4),
                "merge_pass_in_steps": round(merge_s / step_s, 2),
                "merged": merged,
                "settings": {
                    "d_model": a.d_model,
                    "d_sae": a.d_sae,
                    "k": a.k,
                    "batch": a.batch,
                    "dtype": a.dtype,
                    "auxk_all_dead": a.auxk_all_dead,
                    "threads": a.threads,
                    "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                    "steps": a.steps,
                    "warmup": a.warmup,
                    "screen": screen.applies(device, a.d_model, a.d_sae, a.k),
                    "torch": torch.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
