"""Two nodes on one machine: two torchrun launches (--nnodes 2, one process each) meeting at a c10d
rendezvous on localhost, CPU and gloo. Each node's only process has local rank 0 and its own node rank
(GROUP_RANK), so a stage that took the local rank for the global one would write over the other's files.

- cache, then a layer-sharded fit, on two nodes: the same shards (hashes), filter counts and weights as one
  process;
- a data-parallel fit on two nodes: the same weights as the same two processes on one node (a data-parallel
  run reads its shards per rank, so its batches are not one process's; what the nodes must not change is
  anything else);
- nodes whose run_dir is not one directory: one clear error on every process before anything is written.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun

COMMON = [
    "experiment=demo",
    "data.train_tokens=16384",
    "data.eval_tokens=4096",
    "data.shard_tokens=2048",
    "trainer.batch_size=256",
    "trainer.max_steps=12",
    "trainer.checkpoint_every=8",
    "trainer.dead_after_tokens=1024",
]
EXE = [sys.executable, "-m", "qscope_train.cli"]


def _env(fixtures_dir):
    return dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(env, run_dirs, *args, rdzv_id="qscope-test"):
    """Launch two one-process nodes (node i with run_dir=run_dirs[i]); returns their CompletedProcess-likes."""
    port = _free_port()
    runner = str(Path(sys.executable).with_name("torchrun"))
    launcher = [runner, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d"]
    launcher += ["--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id, "-m", "qscope_train.cli"]
    procs = [
        subprocess.Popen(
            [*launcher, *COMMON, f"run_dir={d}", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in run_dirs
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return outs


def _weights(run_dir: Path, n: int) -> dict:
    return torch.load(run_dir / "fit" / f"layer{n}.sae.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path):
    for n in (1, 2):
        want, got = _weights(a, n), _weights(b, n)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"layer {n} {key}")


def test_two_nodes_cache_and_fit_as_one_process(fixtures_dir, tmp_path):
    env = _env(fixtures_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    stages = "stages=[cache,fit,export]"
    subprocess.run([*EXE, *COMMON, f"run_dir={one}", stages], env=env, check=True, capture_output=True, timeout=300)
    nodes = _two_nodes(env, [two, two], stages)
    for res in nodes:
        assert res.returncode == 0, res.stderr[-3000:]
    out = "".join(res.stdout for res in nodes)
    assert "run: 2 processes on 2 node(s)" in out
    assert "fit: layer-sharded over 2 processes (auto)" in out

    # the cache: every chunk once, written by its owner, merged into the one-process manifest's shards
    a, b = (json.loads((d / "cache" / "manifest.json").read_text()) for d in (one, two))
    assert b["world"] == 2
    for split in ("train", "eval"):
        assert b["splits"][split]["chunks"] == a["splits"][split]["chunks"]
        for n in ("1", "2"):
            mine, ref = b["splits"][split]["layers"][n], a["splits"][split]["layers"][n]
            assert mine["filters"] == ref["filters"]
            assert [s["sha256"] for s in mine["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert sorted(p.name for p in (two / "cache" / "progress").glob("*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]

    # the sharded fit: each node's process trained its layer alone, as the one process did both
    _assert_same_weights(one, two)
    assert sorted(p.name for p in (two / "fit" / "checkpoints").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    for n in (1, 2):
        side = json.loads((two / "fit" / f"layer{n}.json").read_text())
        assert side["train"]["tokens_trained"] == 12 * 256
        ref = json.loads((one / "fit" / f"layer{n}.json").read_text())
        for key in ("train_fvu_ema", "dead_frac", "duplicates_merged"):
            assert side["train"][key] == pytest.approx(ref["train"][key], abs=1e-5), (n, key)
    assert (two / "export" / "layer2.sae.pt").is_file()  # the main process exported both layers
    assert not list(two.glob(".shared-check-*"))  # the run_dir probe is cleaned up

    # data parallel: two nodes against two processes on one node, from the same cache
    dp = ["stages=[fit]", "trainer.layer_sharding=false"]
    one_node = tmp_path / "one-node"
    one_node.mkdir()
    (one_node / "cache").symlink_to(two / "cache")
    res = subprocess.run(
        [*torchrun(), "-m", "qscope_train.cli", *COMMON, f"run_dir={one_node}", *dp],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    two_dp = tmp_path / "two-dp"
    two_dp.mkdir()
    (two_dp / "cache").symlink_to(two / "cache")
    for res in _two_nodes(env, [two_dp, two_dp], *dp, rdzv_id="qscope-dp"):
        assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(one_node, two_dp)


def test_nodes_that_do_not_share_run_dir_get_one_error_and_write_nothing(fixtures_dir, tmp_path):
    a, b = tmp_path / "node0", tmp_path / "node1"  # one path per node: what a node-local disk looks like
    nodes = _two_nodes(_env(fixtures_dir), [a, b], "stages=[cache,fit]")
    for res in nodes:
        # our process exits 2 with one line; torchrun then fails itself (exit 1, with its own traceback)
        assert res.returncode != 0 and "(exitcode: 2)" in res.stderr, res.stderr[-3000:]
        assert res.stderr.count("is not one directory for every process: process 1 on ") == 1, res.stderr[-3000:]
        assert "cannot see the file process 0 on" in res.stderr
        assert "qscope_train/" not in res.stderr  # no traceback from our code
    for d in (a, b):
        assert not (d / "cache").exists() and not (d / "fit").exists()
        assert not list(d.glob(".shared-check-*"))


def test_the_slurm_script_starts_one_torchrun_per_node_at_a_c10d_rendezvous(tmp_path):
    """scripts/slurm/train.sbatch with stand-ins for srun, scontrol and torchrun that print what they get."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"
    fake = {
        "srun": '#!/usr/bin/env bash\necho "srun $1" >&2\nshift\n"$@"\n',
        # a long node list: a reader that stops at the first line would kill the writer with SIGPIPE
        "scontrol": "#!/usr/bin/env bash\nseq -f 'gpu-node-%g' 3 20000\n",
        "torchrun": "#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n",
    }
    for name, text in fake.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[3-4]")
    env.update(SLURM_NNODES="2", SLURM_JOB_ID="4242")
    res = subprocess.run(
        ["bash", str(script), "experiment=qwen3_1.7b_base_w32k_k100", "layers=[3, 14]", "run_dir=/shared/r"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu-node-3:29500", "--rdzv_id", "4242", "-m", "qscope_train.cli",
        "experiment=qwen3_1.7b_base_w32k_k100", "layers=[3, 14]", "run_dir=/shared/r",
    ]  # fmt: skip
    assert "srun --kill-on-bad-exit=1" in res.stderr
