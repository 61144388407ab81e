"""scripts/gpu_check.sh --dry-run: every check of the prepared GPU check runs on the CPU and passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_dry_run_passes_on_a_cpu(fixtures_dir, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.pop("QSCOPE_SPARSIFY_PYTHON", None)
    res = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--fixtures", str(fixtures_dir), "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0 and summary["ok"], json.dumps(summary["checks"], indent=1)
    assert summary == json.loads((tmp_path / "gpu_check.json").read_text())
    checks = summary["checks"]
    assert set(checks) == {
        "env",
        "cuda_tests",
        "bench_train",
        "profile_train",
        "bench_train_auxk",
        "bench_train_fp32",
        "bench_sparsify",
        "fit_28_layers",
        "tiny_fixtures",
        "tiny_pipeline",
        "tiny_app",
        "tiny_live_fit",
        "random_qwen3",
        "qwen3_shape_cache",
        "qwen3_shape_live_fit",
    }
    assert checks["cuda_tests"]["result"]["skipped"] >= 5  # collected, and skipped without CUDA
    assert summary["figures"]["ours_tokens_per_s_bf16"] > 0 and summary["figures"]["fit_tokens_per_s"] > 0
    assert "aten::" in (tmp_path / "profile_train.txt").read_text()  # the profiled step's ops table
    fvu = checks["tiny_pipeline"]["result"]["heldout_fvu"]
    assert set(fvu) == {"1", "2"} and all(v < 0.5 for v in fvu.values())
    assert "===== tiny_pipeline" in (tmp_path / "gpu_check.log").read_text()
    assert checks["tiny_live_fit"]["result"]["tokens_per_s"] > 0
    assert checks["tiny_app"]["result"]["bad_request"][0] == 400 and checks["tiny_app"]["result"]["steer_s"] > 0
    assert checks["qwen3_shape_live_fit"]["result"]["tokens_per_s"] > 0
