"""Times EleutherAI sparsify's own training step (its SparseCoder and optimizer, as its Trainer runs one
SAE with default settings) on random inputs; prints one JSON line in bench_train.py's terms.

Run it with a Python that has eai-sparsify (never a dependency of ours): ../shared/anchors/setup.sh
makes one here; scripts/gpu_check.sh installs the carried wheel on a GPU machine. On CUDA sparsify
takes its Triton decoder, as its trainer does there.

One step, as sparsify.Trainer.fit does it per batch for one SAE (loss fvu, auxk_alpha 0, no Multi-TopK,
signum under schedule-free averaging, decoder normalised): decoder renormalisation, the forward
(fused encoder, decoder, FVU against the batch's total variance), the firing mask, the trainer's
per-step read of the FVU to the host, backward, removal of the gradient parallel to the decoder
directions, the optimizer step, the dead-latent counters. Inputs are generated before timing.

On CUDA the steps are timed together (synchronised before and after); on a CPU each step alone, and
the median is reported.

Usage: python scripts/bench_peer_sparsify.py --d-model 2048 --d-sae 32768 --k 100 --batch 4096 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import sparsify
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, SparseCoder
    from sparsify.sign_sgd import SignSGD

    torch.set_num_threads(a.threads)
    torch.set_float32_matmul_precision("high")  # sparsify's trainer sets this (TF32 on CUDA)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    sae = SparseCoder(a.d_model, SaeConfig(num_latents=a.d_sae, k=a.k), device=device, dtype=torch.float32)
    lr = 5e-3 / (a.d_sae / 2**14) ** 0.5  # the trainer's default for signum
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    total = a.warmup + a.steps
    g = torch.Generator(device).manual_seed(a.seed)
    xs = [torch.randn(a.batch, a.d_model, generator=g, device=device) for _ in range(total)]
    since_fired = torch.zeros(a.d_sae, dtype=torch.long, device=device)
    did_fire = torch.zeros(a.d_sae, dtype=torch.bool, device=device)
    fvu_sum = 0.0

    def step(i: int) -> None:
        nonlocal fvu_sum
        x = xs[i]
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        fvu_sum += float(out.fvu.detach())  # the trainer reads it every step
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(a.batch)
            since_fired[did_fire] = 0
            did_fire.zero_()

    cuda = device.type == "cuda"
    for i in range(a.warmup):
        step(i)
    times = []
    if cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.warmup, total):
            step(i)
        torch.cuda.synchronize()
        times = [(time.perf_counter() - t0) / a.steps]
    else:
        for i in range(a.warmup, total):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    print(
        json.dumps(
            {
                "peer": "sparsify",
                "sparsify": getattr(sparsify, "__version__", "unknown"),
                "tokens_per_s": round(a.batch / s, 1),
                "step_s": round(s, 5),
                "settings": {
                    "d_model": a.d_model,
                    "d_sae": a.d_sae,
                    "k": a.k,
                    "batch": a.batch,
                    "steps": a.steps,
                    "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "threads": a.threads,
                    "torch": torch.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
