"""Data-parallel training on 2 CPU processes (gloo) equals single-process training on the same global batches."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([*args, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_process_data_parallel_equals_one_process(tmp_path):
    single = _run([sys.executable], tmp_path, "single")
    ddp = _run(torchrun(), tmp_path, "ddp")
    assert sum(m["auxk"] > 0 for m in single["logs"]) >= 5  # AuxK really ran
    for a, b in zip(single["logs"], ddp["logs"], strict=True):
        assert abs(a["fvu"] - b["fvu"]) < 1e-4 and abs(a["auxk"] - b["auxk"]) < 1e-4
        assert a["dead_frac"] == b["dead_frac"]
    for name, want in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], want, rtol=1e-4, atol=1e-5, msg=name)
    assert single["summary"][0]["duplicates_merged"] > 0  # and the merges (the same on both ranks)
    assert ddp["summary"][0]["duplicates_merged"] == single["summary"][0]["duplicates_merged"]
    # every step (each one a log step here) called two all-reduces, and nothing else, but for the third
    # after each fourth step: the merge pass's counts, and a gather of the residual rows its re-seeds draw
    # from when it merged; past three quarters of the run a pass takes twins only and counts only when it
    # finds one. The fit reports the same count and the bytes (all four parameters' gradients plus
    # counters and statistics)
    from qscope_train.config import TrainerConfig
    from qscope_train.duplicates import twins_only

    cfg = TrainerConfig(batch_size=64, dead_after_tokens=64)  # the worker's batch size and window

    assert len(ddp["per_step"]) == len(single["logs"])
    counted = 0
    for step, calls in enumerate(ddp["per_step"]):
        passes = step % 4 == 3
        counts = passes and (not twins_only(step, cfg, 12) or calls[:3] == ["all_reduce"] * 3)
        assert step != 3 or counts  # the first pass (a copy pass) counts
        assert calls[:3] == ["all_reduce"] * (3 if counts else 2), (step, calls)
        assert calls[3 if counts else 2 :] in ([], ["all_gather"] if counts else []), (step, calls)
        counted += counts
    assert any("all_gather" in calls for calls in ddp["per_step"])
    assert all(calls == [] for calls in single["per_step"])
    reported = ddp["summary"][0]
    assert reported["all_reduce_calls_per_step"] == 2 + counted / 12
    params = sum(t.numel() for t in single["state"].values())
    assert reported["all_reduce_bytes_per_step"] > 4 * params
    # and the optimizer really stepped: b_enc starts at zero and only the updates move it (the data
    # initialisation rewrites W_enc, W_dec and b_dec inside fit, so comparing those with their values
    # before fit would not tell)
    assert not single["init"]["b_enc"].any()
    assert (single["state"]["b_enc"].abs() > 1e-3).float().mean() > 0.5


def test_pipeline_fits_on_two_processes_and_the_main_one_evaluates_and_exports(fixtures_dir, tmp_path):
    import json

    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    common = [
        "experiment=demo",
        f"run_dir={tmp_path}",
        "data.train_tokens=32768",
        "data.eval_tokens=4096",
        "data.shard_tokens=2048",
        "trainer.batch_size=512",
        "trainer.max_steps=20",
        # the tiny preset's 20-step warmup would be the whole run: from the data-initialised decoder (whose
        # first reconstructions overshoot, FVU above 1) the lr would barely rise before the end
        "trainer.warmup_steps=0",
    ]
    exe = str(Path(sys.executable).with_name("qscope-train"))
    subprocess.run([exe, *common, "stages=[cache]"], env=env, check=True, capture_output=True, timeout=300)
    res = subprocess.run(
        [
            *torchrun(),
            "-m",
            "qscope_train.cli",
            *common,
            "stages=[fit,evaluate,export]",
            "trainer.layer_sharding=false",  # 2 layers on 2 processes would be sharded by default
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())["sets"]["trained"]["layers"]
    assert set(metrics) == {"1", "2"} and all(m["fvu"] < 1.5 for m in metrics.values())
    side = json.loads((tmp_path / "export" / "layer1.json").read_text())
    assert side["train"]["tokens_trained"] == 20 * 512  # global batch: 2 ranks × 256 rows
    assert res.stdout.count("layer      FVU") == 1  # only the main process reports
    assert "fit: data parallel over 2 processes (set by trainer.layer_sharding)" in res.stdout


def test_layer_sharded_fit_on_two_processes_equals_one_process(fixtures_dir, tmp_path):
    import json
    import shutil

    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    common = [
        "experiment=demo",
        "data.train_tokens=32768",
        "data.eval_tokens=4096",
        "data.shard_tokens=2048",
        "trainer.batch_size=256",
        "trainer.max_steps=15",
        "trainer.checkpoint_every=10",
        "trainer.dead_after_tokens=1024",  # AuxK runs in most steps
    ]
    exe = str(Path(sys.executable).with_name("qscope-train"))
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([exe, *common, f"run_dir={one}", "stages=[cache]"], env=env, check=True, capture_output=True)
    shutil.copytree(one / "cache", two / "cache")
    subprocess.run([exe, *common, f"run_dir={one}", "stages=[fit]"], env=env, check=True, capture_output=True)
    res = subprocess.run(
        [*torchrun(), "-m", "qscope_train.cli", *common]
        + [f"run_dir={two}", "stages=[fit,export]"],  # 2 layers on 2 processes: sharded by default
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fit: layer-sharded over 2 processes (auto)" in res.stdout
    for n in (1, 2):
        want = torch.load(one / "fit" / f"layer{n}.sae.pt", weights_only=True)
        got = torch.load(two / "fit" / f"layer{n}.sae.pt", weights_only=True)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"layer {n} {key}")
        side = json.loads((two / "fit" / f"layer{n}.json").read_text())
        assert side["train"]["tokens_trained"] == 15 * 256  # full batches on the owning rank
    # each rank checkpointed its own layers, and the main process exported both
    assert sorted(p.name for p in (two / "fit" / "checkpoints").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    assert (two / "export" / "layer2.sae.pt").is_file()


def test_accelerate_launch_profiles_load():
    from accelerate.commands.config.config_args import load_config_from_file

    profiles = sorted((Path(__file__).parents[1] / "scripts" / "accelerate").glob("*.yaml"))
    assert [p.stem for p in profiles] == ["multi_gpu", "multi_node", "single_gpu"]
    procs = {p.stem: load_config_from_file(str(p)).num_processes for p in profiles}
    assert procs == {"multi_gpu": 8, "multi_node": 16, "single_gpu": 1}


def test_the_accelerator_waits_hours_at_barriers():
    from datetime import timedelta

    from qscope_train.cli import make_accelerator

    acc = make_accelerator()
    assert acc.init_handler is not None and acc.init_handler.timeout >= timedelta(hours=1)
