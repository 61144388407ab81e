"""The activation cache: bitwise round trip, live == cached, crash safety, corruption, refusals, 2 processes."""

import dataclasses
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
from conftest import torchrun

from qscope_train.cli import compose
from qscope_train.config import OnCorrupt
from qscope_train.data import shards
from qscope_train.data.activations import live_chunks
from qscope_train.data.batches import cached_batches, live_batches
from qscope_train.data.shards import Codec, CorruptShardError
from qscope_train.lm import load_lm
from qscope_train.pipeline import run

CACHE = [
    "stages=[cache]",
    "data.train_tokens=16384",
    "data.eval_tokens=2048",
    "data.shard_tokens=1024",
    "data.forward_batch_tokens=512",
]


def _cfg(run_dir, *extra):
    return compose(["experiment=demo", f"run_dir={run_dir}", *CACHE, *extra])


@pytest.fixture(scope="module")
def cached(fixtures_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cache_ref")
    cfg = _cfg(run_dir)
    run(cfg, Accelerator(cpu=True))
    return cfg, run_dir / "cache", shards.read_manifest(run_dir / "cache")


@pytest.fixture(scope="module")
def lm(cached):
    return load_lm(cached[0].model)


def test_manifest_records_layout_tokens_and_drops(cached):
    cfg, root, m = cached
    assert m["layers"] == [1, 2] and m["d_model"] == 64 and m["context_len"] == 128
    assert m["codec"] == {"dtype": "bfloat16", "byte_split": True, "level": 1, "frame_checksum": True}
    assert m["splits"]["eval"]["chunks"] == [0, 1] and m["splits"]["train"]["chunks"] == list(range(2, 18))
    assert m["splits"]["train"]["tokens"] == 16384 and m["splits"]["eval"]["tokens"] == 2048
    for split in ("eval", "train"):
        for lay in m["splits"][split]["layers"].values():
            f = lay["filters"]
            assert f["seen"] == m["splits"][split]["tokens"]
            assert f["dropped_position0"] == m["splits"][split]["sequences"]
            assert f["dropped_special"] > 0  # EOS between packed documents
            assert (
                f["kept"]
                == f["seen"]
                - f["dropped_position0"]
                - f["dropped_padding"]
                - f["dropped_special"]
                - f["dropped_outlier"]
            )
            assert lay["rows"] == f["kept"] == sum(s["rows"] for s in lay["shards"])
    assert m["raw_bytes"] / m["compressed_bytes"] > 1.2


def test_the_writer_pool_writes_the_same_cache_as_one_thread(cached, tmp_path):
    cfg, _, m = cached  # written with data.writer_threads=0: one thread per core
    one = _cfg(tmp_path, "data.writer_threads=1")
    run(one, Accelerator(cpu=True))
    m1 = shards.read_manifest(tmp_path / "cache")
    assert m1["splits"] == m["splits"]  # every shard's bytes (sha256), rows and order


def test_written_equals_read_bitwise(cached, lm):
    cfg, root, m = cached
    codec = Codec(**m["codec"])
    for split in ("eval", "train"):
        live = list(live_chunks(lm, cfg.layers, cfg.data, split, "cpu"))
        assert len(live) == len(m["splits"][split]["chunks"])
        for n in cfg.layers:
            recs = shards.records(m["splits"][split]["layers"][str(n)]["shards"])
            for chunk, rec in zip(live, recs, strict=True):
                stored = shards.read_shard(root, rec, 64, codec)
                assert torch.equal(stored.view(torch.int16), chunk.rows[n].view(torch.int16))


def test_live_batches_equal_cached_batches(cached, lm):
    cfg, root, m = cached
    reader = dataclasses.replace(cfg.reader, shuffle_shards=False, shuffle_buffer_tokens=3000)
    cached_list = list(cached_batches(root, m, cfg.layers, 256, reader, seed=5, epochs=1))
    live_list = list(live_batches(lm, cfg.layers, 256, cfg.data, reader, seed=5, device="cpu", epochs=1))
    assert len(cached_list) == len(live_list) > 30
    for a, b in zip(cached_list, live_list, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a)
    rows = sum(b[1].shape[0] for b in cached_list)
    assert rows == m["splits"]["train"]["layers"]["1"]["rows"]  # every row once, the last batch partial


def test_cached_reader_resumes_exactly(cached):
    cfg, root, m = cached
    settings = dataclasses.replace(cfg.reader, shuffle_buffer_tokens=4000)
    reader = cached_batches(root, m, cfg.layers, 512, settings, seed=1)
    it = iter(reader)
    got = [next(it) for _ in range(11)]
    state = reader.state_dict()
    rest = [next(it) for _ in range(40)]  # crosses several fills and an epoch boundary
    again = cached_batches(root, m, cfg.layers, 512, settings, seed=1)
    again.load_state_dict(state)
    it2 = iter(again)
    for want in rest:
        have = next(it2)
        assert all(torch.equal(want[n], have[n]) for n in want)
    assert not torch.equal(got[0][1], rest[-1][1])


def test_live_reader_resumes_exactly_without_rerunning_the_model_over_skipped_chunks(cached, lm, monkeypatch):
    from qscope_train.data import activations

    cfg, _, _ = cached
    forwards = []
    real = activations.forward_chunk
    monkeypatch.setattr(activations, "forward_chunk", lambda *a, **k: forwards.append(1) or real(*a, **k))
    reader = dataclasses.replace(cfg.reader, shuffle_buffer_tokens=3000)
    source = live_batches(lm, cfg.layers, 256, cfg.data, reader, seed=3, device="cpu")
    it = iter(source)
    for _ in range(45):
        next(it)
    state = torch.load(_saved(source.state_dict()), weights_only=True)  # as a checkpoint stores it
    before = len(forwards)
    rest = [next(it) for _ in range(30)]  # crosses fills and the end of the split (~57 batches)
    after = len(forwards) - before
    forwards.clear()
    again = live_batches(lm, cfg.layers, 256, cfg.data, reader, seed=3, device="cpu")
    again.load_state_dict(state)
    it2 = iter(again)
    for want in rest:
        have = next(it2)
        assert all(torch.equal(want[n], have[n]) for n in want)
    # the resumed stream ran the model over the current fill's chunks (3000 rows, under 4 chunks of
    # ~900 kept rows) and what came after, not over the ~12 chunks before the fill
    assert before >= 12 and len(forwards) <= after + 5, (before, after, len(forwards))


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _train_rows(root, m, layer="1"):
    recs = m["splits"]["train"]["layers"][layer]["shards"]
    return [shards.read_shard(root, shards.ShardRecord(**s), 64, Codec(**m["codec"]), torch.float32) for s in recs]


def test_reader_batches_mix_rows_of_several_shards(cached):
    cfg, root, m = cached
    reader = dataclasses.replace(cfg.reader, shuffle_buffer_tokens=8000, shuffle_shards=False)
    batch = next(iter(cached_batches(root, m, [1], 1000, reader, seed=0)))[1]
    per_shard = _train_rows(root, m)
    owner = [next(i for i, s in enumerate(per_shard) if (s == row).all(1).any()) for row in batch]
    assert len(set(owner)) >= 3  # the buffer mixes shards, not only their order


def test_ranks_read_disjoint_shards_that_cover_the_split(cached):
    cfg, root, m = cached
    rows = [
        torch.cat([b[1] for b in cached_batches(root, m, [1], 256, cfg.reader, seed=0, rank=r, world=2, epochs=1)])
        for r in (0, 1)
    ]
    allrows = torch.cat(_train_rows(root, m))
    assert rows[0].shape[0] + rows[1].shape[0] == allrows.shape[0]
    assert sorted(map(tuple, torch.cat(rows).tolist())) == sorted(map(tuple, allrows.tolist()))
    recs = m["splits"]["train"]["layers"]["1"]["shards"]
    assert [rows[r].shape[0] for r in (0, 1)] == [sum(s["rows"] for s in recs[r::2]) for r in (0, 1)]


def test_a_torn_progress_line_is_cut_before_the_next_record(tmp_path):
    from qscope_train.data.writer import _Progress

    p = _Progress(tmp_path, 0, {"fp": 1})
    p.commit({"chunk": 0}, {"next_chunk": 1, "stream": [0, 0], "medians": {}})
    with open(p.log, "a") as f:
        f.write('{"chunk": 1, "spl')  # killed mid-append
    p = _Progress(tmp_path, 0, {"fp": 1})
    p.commit({"chunk": 1}, {"next_chunk": 2, "stream": [0, 0], "medians": {}})
    assert sorted(p.entries(2)) == [0, 1]


def _copy(root, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(root, dst)
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_an_error_naming_it_or_skipped_on_request(cached, tmp_path, damage):
    cfg, root, m = cached
    root = _copy(root, tmp_path)
    path = root / "train" / "layer2" / "shard-000007.zst"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x40
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="train/layer2/shard-000007.zst is corrupt"):
        list(cached_batches(root, m, [2], 512, cfg.reader, seed=0, epochs=1))
    skip = dataclasses.replace(cfg.reader, on_corrupt=OnCorrupt.skip)
    with pytest.warns(UserWarning, match="shard-000007.zst"):
        rows = sum(b[2].shape[0] for b in cached_batches(root, m, [2], 512, skip, seed=0, epochs=1))
    assert (
        rows == m["splits"]["train"]["layers"]["2"]["rows"] - m["splits"]["train"]["layers"]["2"]["shards"][5]["rows"]
    )


def test_cache_of_other_settings_is_refused(cached, fixtures_dir):
    cfg, root, m = cached
    with pytest.raises(ValueError, match="already holds a cache made with other settings"):
        run(_cfg(root.parent, "layers=[0]"), Accelerator(cpu=True))
    other_model = compose(["experiment=demo", f"run_dir={root.parent}", "stages=[fit]", "model=tiny_qwen3_5"])
    with pytest.raises(ValueError, match="holds activations of"):
        run(other_model, Accelerator(cpu=True))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.zst"))}


def _cli(run_dir, *extra):
    exe = Path(sys.executable).with_name("qscope-train")
    # a low outlier factor makes the running medians matter, so resuming must restore them exactly
    return [
        str(exe),
        "experiment=demo",
        f"run_dir={run_dir}",
        *CACHE,
        "data.train_tokens=65536",
        "data.outlier_norm_factor=1.15",
        *extra,
    ]


def test_kill_9_then_rerun_gives_the_uninterrupted_cache(fixtures_dir, tmp_path):
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir))
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    subprocess.run(_cli(ref), env=env, check=True, capture_output=True, timeout=300)
    log = crashed / "cache" / "progress" / "rank0.jsonl"
    for at_least in (3, 30):  # two crashes at different points, then a clean finish
        proc = subprocess.Popen(_cli(crashed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < at_least):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (crashed / "cache" / "manifest.json").exists()
    subprocess.run(_cli(crashed), env=env, check=True, capture_output=True, timeout=300)
    a, b = (json.loads((d / "cache" / "manifest.json").read_text()) for d in (ref, crashed))
    assert a["splits"]["train"]["layers"]["1"]["filters"]["dropped_outlier"] > 100
    assert a == b
    assert _files(ref / "cache") == _files(crashed / "cache")


def test_two_processes_write_disjoint_shards_and_one_merged_manifest(cached, fixtures_dir, tmp_path):
    cfg, root, ref = cached
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    args = [
        *torchrun(),
        "-m",
        "qscope_train.cli",
        "experiment=demo",
        f"run_dir={tmp_path}",
        *CACHE,
    ]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = shards.read_manifest(tmp_path / "cache")
    assert m["world"] == 2
    for split in ("eval", "train"):
        assert m["splits"][split]["chunks"] == ref["splits"][split]["chunks"]  # every chunk once
        assert m["splits"][split]["tokens"] == ref["splits"][split]["tokens"]
        for n in ("1", "2"):
            mine, theirs = m["splits"][split]["layers"][n], ref["splits"][split]["layers"][n]
            assert mine["filters"] == theirs["filters"] and mine["filters"]["dropped_outlier"] == 0
            assert [s["sha256"] for s in mine["shards"]] == [s["sha256"] for s in theirs["shards"]]
    logs = sorted(p.name for p in (tmp_path / "cache" / "progress").glob("*.jsonl"))
    assert logs == ["rank0.jsonl", "rank1.jsonl"]
    chunks = [
        [json.loads(line)["chunk"] for line in (tmp_path / "cache" / "progress" / f).read_text().splitlines()]
        for f in logs
    ]
    assert all(c % 2 == 0 for c in chunks[0]) and all(c % 2 == 1 for c in chunks[1])


def test_a_cache_from_other_weights_at_the_same_path_is_refused(fixtures_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(fixtures_dir / "tiny-qwen3", model_dir)
    args = [f"model.name_or_path={model_dir}"]
    run(_cfg(tmp_path / "run", *args), Accelerator(cpu=True))
    run(_cfg(tmp_path / "run", *args), Accelerator(cpu=True))  # same weights: reused
    # the same directory, retrained: its cached activations no longer describe it
    model = load_lm(compose(["experiment=demo", *args]).model).model
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"\(differs: weights: 'sha256:\w+' -> 'sha256:\w+'\)$"):
        run(_cfg(tmp_path / "run", *args), Accelerator(cpu=True))


def test_verify_command_checks_every_listed_file(cached, tmp_path, capsys):
    """`python -m qscope_train.data.shards verify` hashes every listed file (shards, token ids, positions)."""
    cfg, root, m = cached
    root = _copy(root, tmp_path)
    assert shards.main(["verify", str(root)]) == 0
    total = len(list(shards.listed_records(m)))
    assert f"{total} of {total} files match" in capsys.readouterr().out
    path = root / "train" / "layer1" / "shard-000003.zst"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the stored frame checksum itself: only a full hash notices without decoding
    path.write_bytes(bytes(data))
    (root / "eval" / "layer2" / "shard-000000.zst").unlink()
    assert shards.main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert (
        "corrupt: " in out
        and "train/layer1/shard-000003.zst" in out
        and "eval/layer2/shard-000000.zst is missing" in out
    )
    assert f"{total - 2} of {total} files match" in out
