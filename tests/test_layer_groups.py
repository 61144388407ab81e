"""trainer.layer_groups: layers trained in sequential groups equal all of them at once, a kill -9 in the
second group resumes to the same weights, and auto picks the fewest groups that fit the free memory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from qscope_train import memory
from qscope_train.cli import compose
from qscope_train.config import OptimizerName, TrainerConfig
from qscope_train.errors import ConfigError
from qscope_train.pipeline import run

LAYERS = "layers=[0,1,2,3]"
SMALL = ["data.train_tokens=32768", "data.eval_tokens=4096", "data.shard_tokens=4096", "trainer.batch_size=512"]


@pytest.fixture(scope="module")
def cache(fixtures_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("groups")
    run(compose(["experiment=demo", LAYERS, f"run_dir={run_dir}", "stages=[cache]", *SMALL]), Accelerator(cpu=True))
    return run_dir / "cache"


def _cli(run_dir, groups):
    exe = Path(sys.executable).with_name("qscope-train")
    return [
        str(exe),
        "experiment=demo",
        LAYERS,
        f"run_dir={run_dir}",
        "stages=[fit]",
        *SMALL,
        "trainer.max_steps=60",
        "trainer.checkpoint_every=5",
        "reader.shuffle_buffer_tokens=3000",
        f"trainer.layer_groups={groups}",
    ]


def _weights(run_dir):
    return {n: torch.load(run_dir / "fit" / f"layer{n}.sae.pt", weights_only=True) for n in range(4)}


def test_two_groups_equal_all_layers_at_once_and_resume_after_kill_9(cache, fixtures_dir, tmp_path):
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir))
    dirs = {name: tmp_path / name for name in ("whole", "groups", "crashed")}
    for d in dirs.values():
        shutil.copytree(cache, d / "cache")
    subprocess.run(_cli(dirs["whole"], 1), env=env, check=True, capture_output=True, timeout=300)
    out = subprocess.run(_cli(dirs["groups"], 2), env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "layer group 2 of 2: layers [2, 3]" in out.stdout and "memory plan:" in out.stdout
    whole, grouped = _weights(dirs["whole"]), _weights(dirs["groups"])
    for n in range(4):
        for key in whole[n]:
            assert torch.equal(whole[n][key], grouped[n][key]), (n, key)

    latest = dirs["crashed"] / "fit" / "checkpoints" / "group1-of-2" / "latest.json"
    proc = subprocess.Popen(_cli(dirs["crashed"], 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not latest.is_file() or json.loads(latest.read_text())["step"] < 19):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dirs["crashed"] / "fit" / "layer2.sae.pt").exists()
    out = subprocess.run(_cli(dirs["crashed"], 2), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layer group 1 of 2 ([0, 1]) is done already" in out.stdout
    assert "resume: continuing after step" in out.stdout
    crashed = _weights(dirs["crashed"])
    for n in range(4):
        for key in whole[n]:
            assert torch.equal(whole[n][key], crashed[n][key]), (n, key)


def test_auto_groups_fit_the_free_memory(monkeypatch):
    per_layer = memory.layer_bytes(2048, 32768, OptimizerName.signum, False)
    per_step = memory.step_bytes(2048, 32768, 100, 4096, False)
    assert per_layer == (2 * 32768 * 2048 + 32768 + 2048) * 4 * 2 + 32768 * 8  # weights, schedule-free's z, counters
    free = int((10 * per_layer + per_step) / memory.HEADROOM) + 1  # room for exactly 10 layers
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    args = (list(range(28)), 2048, 32768, 100, 4096, OptimizerName.signum)
    auto = memory.plan(*args, None, "cpu")
    assert [len(g) for g in auto.groups] == [10, 10, 8] and sum(auto.groups, []) == list(range(28))
    assert "28 layers in 3 group(s) of up to 10" in auto.describe("cpu")
    assert [len(g) for g in memory.plan(*args, 4, "cpu").groups] == [7, 7, 7, 7]
    monkeypatch.setattr(memory, "free_bytes", lambda device: per_layer)
    with pytest.raises(ConfigError, match="one layer needs"):
        memory.plan(*args, None, "cpu")


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_layer_groups_must_be_a_count_or_auto(value):
    with pytest.raises(ConfigError, match="trainer.layer_groups"):
        TrainerConfig(layer_groups=value)
    assert TrainerConfig(layer_groups="AUTO").group_count() is None
