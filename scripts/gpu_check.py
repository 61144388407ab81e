"""The prepared GPU check: every figure the CPU cannot give, in one command and one JSON summary.

Run through scripts/gpu_check.sh (which first installs the wheels carried in .whl/). Checks, each in
its own subprocess with its own time limit, so that one failure does not hide the others:

  env            torch, the device, and whether every package the checks need imports
  cuda_tests     pytest -m cuda: the CUDA-only tests (no host syncs between log steps, bf16 parity,
                 pinned prefetch, a fit from a real cache); on CUDA none may be skipped
  bench_train    our training step at 2048/32768/100, batch 4096, bf16 encoder GEMM (the CUDA default)
                 and fp32
  bench_train_auxk  the bf16 step with AuxK on and every latent dead (its worst case)
  bench_sparsify sparsify's own step at the same shape (its Triton decoder on CUDA)
  profile_train  three bf16 steps of bench_train under torch.profiler: the ops by their own device
                 time, in <out>/profile_train.txt
  tiny_pipeline  make_tiny_model + qscope-train experiment=demo (cache, fit, evaluate, export) on the
                 device: wall time and held-out FVU per layer
  tiny_app       qscope-train-app on the demo's export on the device: analyze, compare, steer and a bad
                 request over HTTP (scripts/app_smoke.py)
  tiny_live_fit  the demo's fit from live activations: training tokens/s (from its log)
  random_qwen3, qwen3_shape_cache, qwen3_shape_live_fit
                 a random Qwen3 of Qwen3-1.7B's shape: the cache stage over all 28 layers (tokens/s,
                 model loading included), then a live fit of layer 14 (training tokens/s)
  fit_28_layers  scripts/bench_fit.py: 28 layers from a synthetic cache, layer groups planned from
                 free memory: fit tokens/s against the bare step's

--dry-run runs the same checks on the CPU at small shapes (the CUDA tests then skip, and that is
allowed). The summary is printed as the last line and written to <out>/gpu_check.json, with every
check's output in <out>/gpu_check.log.

Usage: python scripts/gpu_check.py [--dry-run] [--out DIR] [--fixtures DIR] [--budget SECONDS] [--only A,B]

--budget bounds the whole run (a check is cut to the time left; one with under 20 s left is skipped);
--only runs the named checks and what they need. The summary so far is rewritten after every check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    "cuda_tests",
    "bench_train",
    "bench_train_fp32",
    "bench_train_auxk",
    "bench_sparsify",
    "profile_train",
    "tiny_fixtures",
    "tiny_pipeline",
    "tiny_app",
    "tiny_live_fit",
    "random_qwen3",
    "qwen3_shape_cache",
    "qwen3_shape_live_fit",
    "fit_28_layers",
]
# what a check needs run before it: --only adds these
NEEDS = {
    "tiny_pipeline": ["tiny_fixtures"],
    "tiny_app": ["tiny_fixtures", "tiny_pipeline"],
    "tiny_live_fit": ["tiny_fixtures"],
    "random_qwen3": ["tiny_fixtures"],
    "qwen3_shape_cache": ["tiny_fixtures", "random_qwen3"],
    "qwen3_shape_live_fit": ["tiny_fixtures", "random_qwen3"],
}
PEERS_NEEDED = ["hydra", "omegaconf", "zstandard", "datasets", "schedulefree", "transformers", "accelerate"]


def last_json(text: str) -> dict:
    """The last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON line in the output")


class Runner:
    """Runs the checks one by one. `budget` (seconds, or None) bounds the whole run: each check's time
    limit is cut to what is left, and a check with under MIN_CHECK_S left is recorded as skipped.
    `only`, when set, names the checks to run (the others are recorded as skipped). After every check the
    summary so far is written to <out>/gpu_check.json, so a run killed from outside still leaves it."""

    MIN_CHECK_S = 20

    def __init__(self, out: Path, env: dict, budget: float | None = None, only: set[str] | None = None) -> None:
        self.out, self.env, self.only = out, env, only
        self.deadline = None if budget is None else time.perf_counter() + budget
        self.log = open(out / "gpu_check.log", "w")
        self.checks: dict[str, dict] = {}
        self.header: dict = {}

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    def skip(self, name: str, why: str) -> dict:
        self.checks[name] = {"ok": False, "skipped": why, "seconds": 0.0}
        print(f"gpu_check: {name} skipped ({why})", file=sys.stderr, flush=True)
        self.save()
        return self.checks[name]

    def save(self) -> None:
        partial = {**self.header, "partial": True, "checks": self.checks}
        (self.out / "gpu_check.json").write_text(json.dumps(partial, indent=1) + "\n")

    def run(self, name: str, args: list[str], timeout: int, parse=last_json, env: dict | None = None) -> dict:
        """Run one check; record ok, seconds and the parsed result (or the error)."""
        if not self.wanted(name):
            return self.skip(name, "not selected by --only")
        if self.deadline is not None:
            left = self.deadline - time.perf_counter()
            if left < self.MIN_CHECK_S:
                return self.skip(name, f"out of budget ({left:.0f} s left)")
            timeout = int(min(timeout, left))
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        record: dict = {"ok": False}
        try:
            res = subprocess.run(
                args,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            output = res.stdout + res.stderr
            self.log.write(f"===== {name}: {' '.join(args)}\n{output}\n")
            if res.returncode != 0:
                record["error"] = f"exit {res.returncode}: " + " | ".join(output.strip().splitlines()[-3:])
            else:
                record["result"] = parse(res.stdout)
                record["ok"] = True
        except subprocess.TimeoutExpired as e:
            out = "".join(
                (t or b"").decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (e.stdout, e.stderr)
            )
            self.log.write(f"===== {name}: timed out after {timeout} s\n{out}\n")
            record["error"] = f"timed out after {timeout} s"
        except Exception as e:  # a parse failure is this check's failure, not the script's
            record["error"] = f"{type(e).__name__}: {e}"
        record["seconds"] = round(time.perf_counter() - t0, 1)
        self.log.flush()
        self.checks[name] = record
        print(f"gpu_check: {name} {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s", file=sys.stderr)
        self.save()
        return record


def env_check(cuda: bool) -> dict:
    import torch

    missing = [m for m in PEERS_NEEDED if importlib.util.find_spec(m) is None]
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "missing_packages": missing,
        "sparsify_importable": importlib.util.find_spec("sparsify") is not None,
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info["device_memory_gib"] = round(total / 2**30, 1)
    ok = not missing and (info["cuda_available"] or not cuda)
    return {"ok": ok, "result": info, "seconds": 0.0}


def fit_rate(run_dir: Path) -> dict:
    """Training tokens/s of a fit from its log.jsonl: steps between its first and last log lines over the
    time between them (model loading and the first step left out)."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    fit = [e for e in lines if e["stage"] == "fit"]
    side = json.loads(next((run_dir / "fit").glob("layer*.json")).read_text())
    batch = side["train"]["tokens_trained"] // side["train"]["steps"]
    steps, seconds = fit[-1]["step"] - fit[0]["step"], fit[-1]["time"] - fit[0]["time"]
    return {"tokens_per_s": round(steps * batch / seconds, 1), "steps_timed": steps, "batch": batch}


def pytest_counts(stdout: str) -> dict:
    """passed/skipped/failed counts from pytest's last line."""
    counts = {}
    last = stdout.strip().splitlines()[-1]
    for part in last.replace("=", " ").split(","):
        words = part.split()
        for i, w in enumerate(words[1:], start=1):
            if words[i - 1].isdigit():
                counts[w] = int(words[i - 1])
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at small shapes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "gpu_check_out")))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--fixtures", type=Path, help="tiny models built already (make_tiny_model.py): skip building them")
    p.add_argument("--budget", type=float, help="seconds for the whole run: checks left when it is spent are skipped")
    p.add_argument("--only", help="comma-separated checks to run (the others are skipped); env always runs")
    a = p.parse_args()
    only = None if a.only is None else {c.strip() for c in a.only.split(",") if c.strip()}
    if only is not None and (unknown := only - set(CHECKS)):
        p.error(f"unknown check(s) in --only: {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
    if only is not None:
        only |= {need for name in list(only) for need in NEEDS.get(name, [])}
    a.out.mkdir(parents=True, exist_ok=True)
    cuda = not a.dry_run
    device = "cuda" if cuda else "cpu"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    r = Runner(a.out, env, a.budget, only)
    r.header = {"gpu_check": "dry-run" if a.dry_run else "cuda"}
    py = a.python
    t_start = time.perf_counter()

    r.checks["env"] = env_check(cuda)
    if cuda and not r.checks["env"]["result"]["cuda_available"]:
        r.checks["env"]["error"] = "no CUDA device: run with --dry-run on a CPU"

    def no_skips_on_cuda(stdout: str) -> dict:
        counts = pytest_counts(stdout)
        if cuda and counts.get("skipped", 0):
            raise RuntimeError(f"{counts['skipped']} CUDA tests skipped on a CUDA machine")
        if not counts.get("passed", 0) and not counts.get("skipped", 0):
            raise RuntimeError("no CUDA test ran")
        return counts

    r.run(
        "cuda_tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"], 240, no_skips_on_cuda
    )

    if cuda:
        shape = sae_shape = ["--d-model", "2048", "--d-sae", "32768", "--k", "100", "--batch", "4096"]
        timing = ["--steps", "20", "--warmup", "5", "--device", "cuda"]
    else:
        shape = sae_shape = ["--d-model", "256", "--d-sae", "2048", "--k", "32", "--batch", "512"]
        timing = ["--steps", "4", "--warmup", "1", "--device", "cpu"]
    bf16 = r.run("bench_train", [py, "scripts/bench_train.py", *shape, *timing, "--dtype", "bfloat16"], 180)
    r.run("bench_train_fp32", [py, "scripts/bench_train.py", *shape, *timing, "--dtype", "float32"], 180)
    # AuxK's worst step (every latent dead: top-(d_model/2) of a masked copy of the pre-activations), which
    # a fit pays on every step after its first dead window, on a GPU whatever the number of dead latents
    auxk = [*shape, *timing, "--dtype", "bfloat16", "--auxk-all-dead"]
    r.run("bench_train_auxk", [py, "scripts/bench_train.py", *auxk], 180)
    peer = os.environ.get("QSCOPE_SPARSIFY_PYTHON", py)
    if not r.wanted("bench_sparsify"):
        sp = r.skip("bench_sparsify", "not selected by --only")
    elif r.checks["env"]["result"]["sparsify_importable"] or peer != py:
        sp = r.run("bench_sparsify", [peer, "scripts/bench_peer_sparsify.py", *shape, *timing], 180)
    else:
        sp = {"ok": not cuda, "error": "eai-sparsify is not installed (carry its wheel in .whl/)", "seconds": 0.0}
        r.checks["bench_sparsify"] = sp

    profile = a.out / "profile_train.txt"
    r.run(
        "profile_train",
        [py, "scripts/bench_train.py", *shape, "--steps", "3", "--warmup", "3", "--device", device]
        + ["--dtype", "bfloat16", "--profile", str(profile)],
        120,
    )

    with tempfile.TemporaryDirectory() as tmp:
        fixtures, run_dir = a.fixtures or Path(tmp) / "fixtures", Path(tmp) / "demo"
        if a.fixtures is None:
            r.run("tiny_fixtures", [py, "scripts/make_tiny_model.py", "--out", str(fixtures)], 120, parse=lambda s: {})
        else:
            r.checks["tiny_fixtures"] = {"ok": (fixtures / "fixtures.json").is_file(), "seconds": 0.0}

        def pipeline_result(stdout: str) -> dict:
            ev = json.loads((run_dir / "eval" / "eval.json").read_text())
            layers = ev["sets"]["trained"]["layers"]
            fit_side = json.loads((run_dir / "fit" / "layer1.json").read_text())
            if cuda and "cuda" not in stdout:
                raise RuntimeError("the pipeline did not report running on cuda")
            return {
                "heldout_fvu": {n: round(m["fvu"], 4) for n, m in layers.items()},
                "device_seen": device in stdout,
                "tokens_trained": fit_side["train"]["tokens_trained"],
            }

        demo = [py, "-m", "qscope_train.cli", "experiment=demo", f"run_dir={run_dir}"]
        if not cuda:
            demo += ["data.train_tokens=65536", "data.eval_tokens=8192"]
        fx_env = {"QSCOPE_FIXTURES": str(fixtures)}
        if r.checks["tiny_fixtures"]["ok"]:
            r.run("tiny_pipeline", demo, 300, pipeline_result, env=fx_env)
            smoke = [py, "scripts/app_smoke.py", "--saes", str(run_dir / "export"), "--device", device]
            r.run("tiny_app", smoke, 180, env=fx_env)
            live_dir = Path(tmp) / "demo-live"
            live = [py, "-m", "qscope_train.cli", "experiment=demo", f"run_dir={live_dir}", "stages=[fit]"]
            live += ["reader.source=live", f"trainer.max_steps={200 if cuda else 40}", "trainer.log_every=10"]
            r.run("tiny_live_fit", live, 240, lambda out: fit_rate(live_dir), env=fx_env)

        # a random Qwen3 of the real 1.7B shape (a reduced one in a dry run): the cache stage over all
        # 28 layers, then a live fit of one layer, each timed
        big, big_dir = Path(tmp) / "qwen3-shape", Path(tmp) / "qwen3-run"
        shape = "qwen3-1.7b" if cuda else "reduced"
        made = r.run(
            "random_qwen3",
            [py, "scripts/make_random_qwen3.py", "--out", str(big), "--fixtures", str(fixtures), "--shape", shape]
            + ["--device", device],
            180,
        )
        if made["ok"]:
            n_layers = 28 if cuda else 4
            tokens, eval_tokens = (65536, 8192) if cuda else (8192, 4096)
            common = ["experiment=qwen3_1.7b_base_w32k_k100", f"model.name_or_path={big}"]
            common += [f"data.dataset={fixtures / 'corpus.jsonl'}", "data.context_len=1024"]
            common += [f"data.train_tokens={tokens}", f"data.eval_tokens={eval_tokens}"]
            cache = [py, "-m", "qscope_train.cli", *common, f"run_dir={big_dir}", "stages=[cache]"]
            cache += [f"layers=[{','.join(map(str, range(n_layers)))}]", f"data.shard_tokens={16384 if cuda else 4096}"]
            rec = r.run("qwen3_shape_cache", cache, 240, lambda out: {"tokens": tokens + eval_tokens})
            if rec["ok"]:
                rec["result"]["tokens_per_s_with_load"] = round(rec["result"]["tokens"] / rec["seconds"], 1)
            live_big = [py, "-m", "qscope_train.cli", *common, f"run_dir={big_dir}-live", "stages=[fit]"]
            live_big += ["reader.source=live", f"trainer.max_steps={40 if cuda else 4}", "trainer.log_every=5"]
            live_big += ["layers=[14]"] if cuda else ["layers=[2]", "sae.d_sae=2048", "trainer.batch_size=512"]
            if not cuda:  # a live fit forwards one shard's tokens (65,536 by default) before its first step
                live_big += ["data.shard_tokens=4096", "reader.shuffle_buffer_tokens=4096"]
            r.run("qwen3_shape_live_fit", live_big, 240, lambda out: fit_rate(Path(f"{big_dir}-live")))

    if cuda:
        fit_args = ["--layers", "28", *sae_shape, "--steps", "4", "--warmup", "2", "--rounds", "1", "--threads", "8"]
    else:
        fit_args = ["--layers", "4", "--d-model", "128", "--d-sae", "1024", "--k", "16", "--batch", "512"]
        fit_args += ["--steps", "3", "--warmup", "1", "--rounds", "1"]
    r.run("fit_28_layers", [py, "scripts/bench_fit.py", *fit_args, "--layer-groups", "auto", "--device", device], 300)

    fig = {}
    if bf16["ok"]:
        fig["ours_tokens_per_s_bf16"] = bf16["result"]["tokens_per_s"]
        fig["ours_fraction_of_floor_bf16"] = bf16["result"]["fraction_of_floor"]
    if r.checks["bench_train_fp32"]["ok"]:
        fig["ours_tokens_per_s_fp32"] = r.checks["bench_train_fp32"]["result"]["tokens_per_s"]
    if r.checks["bench_train_auxk"]["ok"]:
        fig["ours_tokens_per_s_bf16_auxk_all_dead"] = r.checks["bench_train_auxk"]["result"]["tokens_per_s"]
    if sp.get("ok") and "result" in sp:
        fig["sparsify_tokens_per_s"] = sp["result"]["tokens_per_s"]
        if bf16["ok"]:
            fig["ours_over_sparsify"] = round(bf16["result"]["tokens_per_s"] / sp["result"]["tokens_per_s"], 3)
    if r.checks["fit_28_layers"]["ok"]:
        res = r.checks["fit_28_layers"]["result"]
        fig.update(
            fit_tokens_per_s=res["fit_tokens_per_s"],
            fit_over_step=res["ratio"],
            layer_groups=res["settings"]["layer_groups"],
        )
    for name, key in (
        ("tiny_live_fit", "tiny_live_fit_tokens_per_s"),
        ("qwen3_shape_live_fit", "qwen3_shape_live_fit_tokens_per_s"),
    ):
        if r.checks.get(name, {}).get("ok"):
            fig[key] = r.checks[name]["result"]["tokens_per_s"]
    if r.checks.get("qwen3_shape_cache", {}).get("ok"):
        fig["qwen3_shape_cache_tokens_per_s_with_load"] = r.checks["qwen3_shape_cache"]["result"][
            "tokens_per_s_with_load"
        ]
    summary = {
        "gpu_check": "dry-run" if a.dry_run else "cuda",
        "partial": False,
        "device": r.checks["env"]["result"]["device"],
        "ok": all(c["ok"] for c in r.checks.values()),
        "seconds": round(time.perf_counter() - t_start, 1),
        "figures": fig,
        "checks": r.checks,
    }
    (a.out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
