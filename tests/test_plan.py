"""plan=true: the memory model against real steps, the plan of the release preset offline, the model's
parameters counted without its weights, and a plan that cannot fit refused with the setting to change."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qscope_train import memory
from qscope_train.config import OptimizerName

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("qscope-train"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize(
    "shape",
    [
        # shapes that were not among those the step model's terms were read from (docs/BENCHMARKS.md)
        ["--d-model", "128", "--d-sae", "24576", "--k", "48", "--batch", "1536"],  # pre-activations dominate
        ["--d-model", "2048", "--d-sae", "4096", "--k", "64", "--batch", "2048"],  # parameters dominate
    ],
)
def test_the_step_memory_model_is_within_ten_percent_of_a_real_step(shape):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_step_memory.py"), *shape],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["peak_bytes"] > 200 * 2**20  # large enough that the process's own noise does not matter
    assert 0.9 <= got["model_over_peak"] <= 1.1, got


def _plan(*args, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([EXE, "plan=true", *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_release_preset_is_planned_for_1_8_16_gpus_without_weights():
    res = _plan("experiment=qwen3_1.7b_base_w32k_k100")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "1.72 B parameters" in out and "no weights loaded" in out and "built-in copy" in out
    for head in ("1 GPU (1 node): one process", "8 GPUs (1 node): layer-sharded", "16 GPUs (2 nodes): layer-sharded"):
        assert head in out
    per_layer = memory.layer_bytes(2048, 32768, OptimizerName.signum, False) / 2**30
    assert f"28 x {per_layer:.2f} GiB" in out and f"2 x {per_layer:.2f} GiB" in out
    assert "time: forward" in out and "SAE steps" in out and "does not fit" not in out


def test_data_parallel_across_nodes_shows_its_all_reduce():
    res = _plan("experiment=qwen3_1.7b_base_w32k_k100", "trainer.layer_sharding=false", "planner.processes=[8,16]")
    assert res.returncode == 0, res.stderr[-2000:]
    reduce = [line for line in res.stdout.splitlines() if "all-reduce" in line and "time:" in line]
    assert len(reduce) == 2 and all("14.0 GiB a step" in line for line in reduce)


def test_a_plan_that_cannot_fit_is_refused_naming_the_setting():
    res = _plan("experiment=qwen3_1.7b_base_w32k_k100", "planner.gpu_memory_gib=2", "planner.processes=[8]")
    assert res.returncode == 2
    assert "8 GPUs (1 node): one layer's fit needs" in res.stdout and "lower trainer.batch_size" in res.stdout
    assert res.stderr.startswith("error: the plan does not fit")


def test_a_local_model_is_planned_from_its_config_with_its_real_parameter_count(fixtures_dir):
    from transformers import AutoModelForCausalLM

    res = _plan("experiment=demo", env={"QSCOPE_FIXTURES": str(fixtures_dir)})
    assert res.returncode == 0, res.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(fixtures_dir / "tiny-qwen3")
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e9:.2f} B parameters" in res.stdout and "tiny-qwen3's config.json" in res.stdout


def test_a_model_without_a_reachable_config_gets_one_error():
    res = _plan("experiment=qwen3_1.7b_base_w32k_k100", "model.name_or_path=Qwen/Qwen3-8B-Base")
    assert res.returncode == 2
    assert "plan needs model.name_or_path='Qwen/Qwen3-8B-Base''s config.json" in res.stderr
    assert "Traceback" not in res.stderr
