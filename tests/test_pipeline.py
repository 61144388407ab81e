"""End to end on the tiny offline Qwen models: cache -> fit -> evaluate -> export, and the export's
compatibility with the release card's own loading code."""

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
from conftest import card_get_feature_acts

from qscope_train import load, release
from qscope_train.cli import compose
from qscope_train.config import Activation, DataConfig, ModelConfig
from qscope_train.data.tokens import load_text_dataset, token_stream
from qscope_train.lm import load_lm, run_captured
from qscope_train.pipeline import run
from qscope_train.sae import TopKSAE

SMALL = ["data.train_tokens=65536", "data.eval_tokens=8192", "data.shard_tokens=8192", "trainer.batch_size=512"]


@pytest.fixture(scope="module")
def demo(fixtures_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    cfg = compose(["experiment=demo", f"run_dir={run_dir}", *SMALL])
    result = run(cfg, Accelerator(cpu=True))
    return cfg, run_dir, trained_metrics(result)


def trained_metrics(result: dict) -> dict[int, dict]:
    return {int(n): m for n, m in result["sets"]["trained"]["layers"].items()}


def test_demo_reconstructs_held_out_activations_better_than_the_mean(demo):
    cfg, run_dir, metrics = demo
    assert sorted(metrics) == [1, 2]
    for n, m in metrics.items():
        print(f"layer {n}: held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_frac']:.2%}")
        assert m["fvu"] < 0.5  # predicting the mean scores 1.0
        assert m["l0"] == cfg.sae.k
        assert m["n_tokens"] > 7000
    saved = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert saved["sets"]["trained"]["layers"]["1"]["fvu"] == metrics[1]["fvu"]


def test_export_directory_layout(demo):
    _, run_dir, _ = demo
    names = sorted(p.name for p in (run_dir / "export").iterdir())
    assert names == ["README.md", "layer1.json", "layer1.sae.pt", "layer2.json", "layer2.sae.pt"]
    assert all(p.stat().st_mode & 0o044 for p in (run_dir / "export").iterdir())  # readable by others (umask 022)
    raw = torch.load(run_dir / "export" / "layer1.sae.pt", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in raw.items()} == {
        "W_enc": ((1024, 64), torch.float32),
        "W_dec": ((64, 1024), torch.float32),
        "b_enc": ((1024,), torch.float32),
        "b_dec": ((64,), torch.float32),
    }
    fit = torch.load(run_dir / "fit" / "layer1.sae.pt", weights_only=True)
    assert all(torch.equal(raw[k], fit[k]) for k in raw)


def test_sidecar_and_model_card(demo):
    _, run_dir, metrics = demo
    side = json.loads((run_dir / "export" / "layer2.json").read_text())
    assert side["layer"] == 2 and side["k"] == 16 and side["d_sae"] == 1024 and side["d_model"] == 64
    assert side["activation"] == "topk" and side["tokens_trained"] > 0
    assert side["hook_point"].startswith("residual stream")
    assert side["metrics"]["fvu"] == metrics[2]["fvu"]
    card = (run_dir / "export" / "README.md").read_text()
    for row in [
        "| SAE width (d_sae) | 1024 |",
        "| Hidden size (d_model) | 64 |",
        "| Top-K | 16 |",
        "| Expansion factor | 16× |",
        "| Layers covered | 1 – 2 (2 layers total) |",
        "| Hook point | Residual stream |",
    ]:
        assert row in card
    assert "SAE-Res-tiny-qwen3-W1K-L0_16" in card


def _real_activations(fixtures_dir, layers):
    lm = load_lm(ModelConfig(name_or_path=str(fixtures_dir / "tiny-qwen3")))
    data = DataConfig(dataset=str(fixtures_dir / "corpus.jsonl"), context_len=64)
    seqs = token_stream(load_text_dataset(data), lm.tokenizer, data)
    ids = torch.stack([s.input_ids for _, s in zip(range(8), seqs, strict=False)])
    acts = run_captured(lm, layers, ids)
    return {n: a.reshape(-1, a.shape[-1]) for n, a in acts.items()}


def test_exported_file_gives_the_cards_features_on_real_activations(demo, fixtures_dir):
    cfg, run_dir, _ = demo
    acts = _real_activations(fixtures_dir, [1, 2])
    for n, x in acts.items():
        path = run_dir / "export" / f"layer{n}.sae.pt"
        card_sae = torch.load(path, map_location="cpu", weights_only=True)  # what the card's snippet does
        ours = load.load_sae(run_dir / "export", layer=n)
        assert ours.k == cfg.sae.k
        card = card_get_feature_acts(card_sae, x, cfg.sae.k)
        assert torch.equal(ours.encode(x), card)
        assert card.count_nonzero(-1).eq(cfg.sae.k).all()
        # A lowered encoder bias leaves most top-k pre-activations negative, where the ReLU matters.
        for b_shift in (0.0, 3 * card_sae["b_enc"].abs().max() + 10):
            shifted = dict(card_sae, b_enc=card_sae["b_enc"] - b_shift)
            relu = TopKSAE.from_release(shifted, cfg.sae.k, Activation.relu_topk)
            assert torch.equal(relu.encode(x), card_get_feature_acts(shifted, x, cfg.sae.k, relu=True))
        differs = (relu.encode(x) != card_get_feature_acts(shifted, x, cfg.sae.k)).any(-1)
        assert differs.float().mean() > 0.5
        # and decoding through the card's formula is our reconstruction
        x_hat = card @ card_sae["W_dec"].T + card_sae["b_dec"]
        torch.testing.assert_close(ours(x).x_hat_BD, x_hat, rtol=1e-4, atol=1e-5)
    # the same check on random inputs far from the training distribution
    x = torch.randn(256, 64) * 4
    assert torch.equal(
        load.load_sae(run_dir / "export", layer=1).encode(x),
        card_get_feature_acts(torch.load(run_dir / "export" / "layer1.sae.pt", weights_only=True), x, cfg.sae.k),
    )


def test_stages_run_alone_and_say_what_is_missing(demo, tmp_path):
    _, run_dir, _ = demo
    with pytest.raises(FileNotFoundError, match="run the cache stage first"):
        run(compose(["experiment=demo", f"run_dir={tmp_path}", "stages=[fit]"]), Accelerator(cpu=True))
    for stage in ("evaluate", "export"):
        with pytest.raises(FileNotFoundError, match=rf"run the fit stage first \(stages=\[fit,{stage}\]\)"):
            run(compose(["experiment=demo", f"run_dir={tmp_path}", f"stages=[{stage}]"]), Accelerator(cpu=True))
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    cfg = compose(["experiment=demo", f"run_dir={tmp_path}", "stages=[fit,export]", "trainer.max_steps=5", *SMALL])
    assert run(cfg, Accelerator(cpu=True)) == {}
    assert (tmp_path / "export" / "layer2.sae.pt").is_file()
    assert "metrics" not in json.loads((tmp_path / "export" / "layer2.json").read_text())
    assert not (tmp_path / "eval").exists()


def test_existing_cache_is_reused_or_refused(demo):
    _, run_dir, _ = demo
    manifest = run_dir / "cache" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    run(compose(["experiment=demo", f"run_dir={run_dir}", "stages=[cache]", *SMALL]), Accelerator(cpu=True))
    assert manifest.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="already holds a cache made with other settings"):
        run(
            compose(["experiment=demo", f"run_dir={run_dir}", "stages=[cache]", "layers=[0]", *SMALL]),
            Accelerator(cpu=True),
        )


def test_console_command_runs_from_any_directory(fixtures_dir, tmp_path):
    exe = Path(sys.executable).with_name("qscope-train")
    args = [str(exe), f"run_dir={tmp_path / 'run'}", "trainer.max_steps=30", *SMALL]
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir))
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layer      FVU" in out.stdout
    assert (tmp_path / "run" / "export" / "layer1.sae.pt").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def test_console_command_gives_one_line_errors(fixtures_dir, tmp_path):
    exe = Path(sys.executable).with_name("qscope-train")
    out = subprocess.run(
        [str(exe), f"run_dir={tmp_path}", "stages=[export]"],
        cwd=tmp_path,
        env=dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "run the fit stage first" in out.stderr
    assert "Traceback" not in out.stderr


def test_qwen3_5_demo_pipeline(fixtures_dir, tmp_path):
    cfg = compose(["experiment=demo_qwen3_5", f"run_dir={tmp_path}", *SMALL])
    metrics = trained_metrics(run(cfg, Accelerator(cpu=True)))
    assert sorted(metrics) == [0, 1]
    assert all(m["fvu"] < 0.5 for m in metrics.values()), metrics


def _release_dir(path, layers, d_model=64, d_sae=1024, seed=0):
    from conftest import random_release

    for n in layers:
        t = random_release(d_model=d_model, d_sae=d_sae, seed=seed + n)
        t["W_dec"] = t["W_dec"] / t["W_dec"].norm(dim=0, keepdim=True)  # trained SAEs have unit-norm columns
        release.save_tensors(path / f"layer{n}.sae.pt", t)
    return path


def test_continue_from_a_release_starts_from_its_tensors(demo, tmp_path):
    _, run_dir, _ = demo
    src = _release_dir(tmp_path / "SAE-Res-tiny-W1K-L0_12", [1, 2])
    shutil.copytree(run_dir / "cache", tmp_path / "run" / "cache")
    base = ["experiment=demo", f"run_dir={tmp_path / 'run'}", f"init_from={src}", *SMALL]
    # a vanishing learning rate: one step must leave the loaded tensors as they were
    run(
        compose([*base, "stages=[fit]", "trainer.max_steps=1", "trainer.lr=1e-20", "trainer.warmup_steps=0"]),
        Accelerator(cpu=True),
    )
    for n in (1, 2):
        got = torch.load(tmp_path / "run" / "fit" / f"layer{n}.sae.pt", weights_only=True)
        want = torch.load(src / f"layer{n}.sae.pt", weights_only=True)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    side = json.loads((tmp_path / "run" / "fit" / "layer1.json").read_text())
    assert side["k"] == 12 and side["init_from"] == str(src)
    # real training moves them, and the export's card names the source
    run(compose([*base, "stages=[fit,export]", "trainer.max_steps=20"]), Accelerator(cpu=True))
    got = torch.load(tmp_path / "run" / "export" / "layer1.sae.pt", weights_only=True)
    want = torch.load(src / "layer1.sae.pt", weights_only=True)
    assert not torch.equal(got["W_enc"], want["W_enc"])
    assert torch.nn.functional.cosine_similarity(got["W_enc"], want["W_enc"], dim=1).mean() > 0.5
    assert f"Adapted from the SAEs `{src}`" in (tmp_path / "run" / "export" / "README.md").read_text()


def test_continue_from_a_release_of_another_width_is_refused(demo, tmp_path):
    _, run_dir, _ = demo
    src = _release_dir(tmp_path / "SAE-Res-other-W1K-L0_8", [1, 2], d_model=32)
    shutil.copytree(run_dir / "cache", tmp_path / "run" / "cache")
    cfg = compose(["experiment=demo", f"run_dir={tmp_path / 'run'}", f"init_from={src}", "stages=[fit]", *SMALL])
    with pytest.raises(ValueError, match="layer 1 has d_model 32, but .* has d_model 64"):
        run(cfg, Accelerator(cpu=True))


def _fit_cli(run_dir, *extra):
    exe = Path(sys.executable).with_name("qscope-train")
    return [
        str(exe),
        "experiment=demo",
        f"run_dir={run_dir}",
        "stages=[fit]",
        *SMALL,
        "trainer.max_steps=150",
        "trainer.checkpoint_every=5",
        "reader.shuffle_buffer_tokens=3000",
        *extra,
    ]


@pytest.mark.parametrize("source", ["cached", "live"])
def test_kill_9_during_fit_then_rerun_gives_the_uninterrupted_weights(demo, fixtures_dir, tmp_path, source):
    # live: the stream restarts at the checkpointed chunk (150 steps of 512 rows also cross the end of
    # the 65536-token split into a second pass)
    _, run_dir, _ = demo
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures_dir))
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    extra = ["reader.source=live"] if source == "live" else []
    if source == "cached":
        for d in (ref, crashed):
            shutil.copytree(run_dir / "cache", d / "cache")
    subprocess.run(_fit_cli(ref, *extra), env=env, check=True, capture_output=True, timeout=300)
    latest = crashed / "fit" / "checkpoints" / "latest.json"
    proc = subprocess.Popen(_fit_cli(crashed, *extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not latest.is_file() or json.loads(latest.read_text())["step"] < 29):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "fit" / "layer1.sae.pt").exists()
    out = subprocess.run(_fit_cli(crashed, *extra), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resume: continuing after step" in out.stdout
    for n in (1, 2):
        a = torch.load(ref / "fit" / f"layer{n}.sae.pt", weights_only=True)
        b = torch.load(crashed / "fit" / f"layer{n}.sae.pt", weights_only=True)
        for key in a:
            assert torch.equal(a[key], b[key]), (n, key)
    assert len(list((crashed / "fit" / "checkpoints").glob("step-*.pt"))) == 2  # keep_checkpoints


def test_resume_with_other_settings_is_refused(demo, tmp_path):
    _, run_dir, _ = demo
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    base = ["experiment=demo", f"run_dir={tmp_path}", "stages=[fit]", *SMALL, "trainer.checkpoint_every=5"]
    run(compose([*base, "trainer.max_steps=12"]), Accelerator(cpu=True))
    with pytest.raises(
        ValueError, match=r"written by a run with other settings.*\(differs: trainer\.lr: None -> 0\.5\)$"
    ):
        run(compose([*base, "trainer.max_steps=12", "trainer.lr=0.5"]), Accelerator(cpu=True))


def test_push_to_hub_dry_run_lists_exactly_the_exports_files(demo, tmp_path, capsys):
    from qscope_train.errors import ConfigError, InputError
    from qscope_train.release import ReleaseName

    cfg, run_dir, _ = demo
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("cache"))
    base = ["experiment=demo", f"run_dir={tmp_path / 'run'}", "stages=[export]", *SMALL, "export.dry_run=true"]
    repo = "me/SAE-Res-Tiny-Qwen3-W1K-L0_16"
    run(compose([*base, f"export.push_to_hub={repo}"]), Accelerator(cpu=True))
    export = tmp_path / "run" / "export"
    plan = json.loads((export / "push_plan.json").read_text())
    assert plan["repo_id"] == repo and plan["dry_run"] is True
    assert plan["files"] == sorted(p.name for p in export.iterdir() if p.name != "push_plan.json")
    assert ReleaseName.parse(repo) == ReleaseName("Tiny-Qwen3", 1, 16)  # the name SAELens reads d_sae and k from
    assert f"would upload to https://huggingface.co/{repo}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="must be owner/SAE-Res-<model>-W<N>K-L0_<k>"):
        run(compose([*base, "export.push_to_hub=me/my-saes"]), Accelerator(cpu=True))
    with pytest.raises(InputError, match=r"names width 32K and k 16, but these SAEs have d_sae 1024.*W1K-L0_16"):
        run(compose([*base, "export.push_to_hub=me/SAE-Res-Tiny-Qwen3-W32K-L0_16"]), Accelerator(cpu=True))


def test_the_compare_stage_writes_its_report_and_finds_the_corpus_and_the_chats_apart(demo, capsys):
    cfg, run_dir, _ = demo
    run(
        compose(["experiment=demo", f"run_dir={run_dir}", "stages=[compare]", "compare.texts=40", *SMALL]),
        Accelerator(cpu=True),
    )
    result = json.loads((run_dir / "compare" / "compare.json").read_text())
    assert result["texts"] == [40, 40] and result["max_tokens"] == 64 and set(result["layers"]) == {"1", "2"}
    for layer in result["layers"].values():
        assert layer["significant"] > 0 and layer["more_in_a"] and layer["more_in_b"]
        assert max(c["f1"] for c in layer["classifier"].values()) > 0.85  # documents and chats differ
    report = (run_dir / "compare" / "report.md").read_text()
    assert "## Layer 1" in report and (run_dir / "compare" / "rates_layer2.png").stat().st_size > 0
    assert "compare layer 1: more in A:" in capsys.readouterr().out
    with pytest.raises(Exception, match="set compare.b"):
        compose(["experiment=demo", f"run_dir={run_dir}", "stages=[compare]", "compare.b=null"])
