import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from conftest import random_release

from qscope_train import release
from qscope_train.cli import compose
from qscope_train.drift import feature_drift
from qscope_train.pipeline import run
from qscope_train.sae import TopKSAE

BASE_SMALL = ["data.train_tokens=131072", "data.eval_tokens=8192", "data.shard_tokens=8192", "trainer.batch_size=512"]
CHAT_SMALL = ["data.train_tokens=98304", "data.eval_tokens=8192", "data.shard_tokens=8192", "trainer.batch_size=512"]


def _sae(seed: int = 0) -> TopKSAE:
    return TopKSAE.from_release(random_release(d_model=16, d_sae=64, seed=seed), 4)


def test_drift_is_exactly_one_without_training():
    sae = _sae()
    d = feature_drift(sae, TopKSAE.from_release(sae.to_release(), 4))
    assert d["decoder_cos_mean"] == pytest.approx(1.0, abs=1e-6) and d["encoder_cos_mean"] == pytest.approx(
        1.0, abs=1e-6
    )
    assert d["frac_decoder_below_0.9"] == 0 and d["frac_encoder_below_0.9"] == 0
    assert sum(d["decoder_cos_hist"]["counts"]) == 64 and d["decoder_cos_hist"]["counts"][-1] == 64


def test_drift_finds_the_features_that_moved():
    src = _sae()
    moved = src.to_release()
    moved["W_dec"][:, [5, 9]] = -moved["W_dec"][:, [5, 9]]  # decoder cosine -1
    moved["W_dec"][:, 30] += 0.5 * moved["W_dec"][:, 30].norm() * torch.randn(16)
    moved["W_enc"][7] = torch.randn(16)
    d = feature_drift(
        src, TopKSAE.from_release(moved, 4), top=3, freq_before=torch.zeros(64), freq_after=torch.ones(64)
    )
    assert {f["feature"] for f in d["most_changed"][:2]} == {5, 9}
    assert d["most_changed"][0]["decoder_cos"] == pytest.approx(-1.0, abs=1e-5)
    assert d["most_changed"][0]["freq_after"] == 1.0
    assert d["frac_decoder_below_0.9"] >= 2 / 64 and d["frac_encoder_below_0.9"] >= 1 / 64
    with pytest.raises(ValueError, match="different shapes"):
        feature_drift(src, TopKSAE.from_release(random_release(d_model=16, d_sae=32), 4))


@pytest.fixture(scope="module")
def adapted(fixtures_dir, tmp_path_factory):
    """The demo on the tiny base model, then the adaptation to the tiny chat-tuned model."""
    root = tmp_path_factory.mktemp("adapt")
    # merging duplicates on in both runs: the fresh one merges, the continued one must not (merge passes
    # start after the first dead window: the demo's 200K tokens would be longer than this run)
    merge = "trainer.merge_cos=0.5"
    window = "trainer.dead_after_tokens=32768"
    run(compose(["experiment=demo", f"run_dir={root / 'base'}", *BASE_SMALL, merge, window]), Accelerator(cpu=True))
    cfg = compose(
        [
            "experiment=demo_adapt",
            f"run_dir={root / 'adapt'}",
            f"init_from={root / 'base' / 'export'}",
            *CHAT_SMALL,
            merge,
            window,
        ]
    )
    run(cfg, Accelerator(cpu=True))
    return root


def test_adaptation_lowers_fvu_and_delta_ce_on_the_post_trained_model(adapted):
    adapt = json.loads((adapted / "adapt" / "adapt.json").read_text())
    assert adapt["source"] == str(adapted / "base" / "export") and adapt["model"].endswith("tiny-qwen3-chat")
    assert adapt["source_model"].endswith("tiny-qwen3")
    assert sorted(adapt["layers"]) == ["1", "2"]
    for n, m in adapt["layers"].items():
        print(
            f"layer {n}: FVU {m['fvu_before']:.4f} -> {m['fvu_after']:.4f}, dCE {m['delta_ce_before']:.4f} -> {m['delta_ce_after']:.4f}"
        )
        assert m["fvu_after"] < 0.8 * m["fvu_before"]
        assert m["delta_ce_after"] < m["delta_ce_before"]
        assert 0 < m["drift"]["decoder_cos_mean"] < 1  # training moved the features, but they stay related
    # before/after are the source and adapted SAEs evaluated on the same held-out tokens
    ev = json.loads((adapted / "adapt" / "eval" / "eval.json").read_text())
    assert ev["sets"]["source"]["layers"]["1"]["n_tokens"] == ev["sets"]["trained"]["layers"]["1"]["n_tokens"]
    assert ev["sets"]["source"]["layers"]["1"]["fvu"] == adapt["layers"]["1"]["fvu_before"]


def test_a_fresh_fit_merges_duplicates_and_an_adaptation_keeps_every_source_latent(adapted):
    for layer in (1, 2):
        base = json.loads((adapted / "base" / "fit" / f"layer{layer}.json").read_text())["train"]
        adapt = json.loads((adapted / "adapt" / "fit" / f"layer{layer}.json").read_text())["train"]
        assert base["duplicates_merged"] > 0 and adapt["duplicates_merged"] == 0


def test_adaptation_report_and_export_card(adapted):
    out = adapted / "adapt"
    report = (out / "report.md").read_text()
    for png in ("before_after.png", "drift.png"):
        assert f"]({png})" in report and (out / png).stat().st_size > 10_000
    eval_report = (out / "eval" / "report.md").read_text()
    for png in ("fvu_per_layer.png", "delta_ce_per_layer.png", "dead_per_layer.png", "firing_hist.png"):
        assert f"]({png})" in eval_report and (out / "eval" / png).is_file()
    card = (out / "export" / "README.md").read_text()
    assert str(adapted / "base" / "export") in card and "tiny-qwen3-chat" in card
    side = json.loads((out / "export" / "layer1.json").read_text())
    assert side["init_from"] == str(adapted / "base" / "export") and "delta_ce" in side["metrics"]


def test_evaluate_a_release_on_another_model_without_a_cache(adapted, tmp_path):
    src = adapted / "base" / "export"
    cfg = compose(
        [
            "experiment=demo_adapt",
            f"run_dir={tmp_path}",
            "stages=[evaluate]",
            f"evaluate.saes={src}",
            "evaluate.downstream_tokens=2048",
            *CHAT_SMALL,
        ]
    )
    result = run(cfg, Accelerator(cpu=True))
    assert list(result["sets"]) == ["given"] and result["sets"]["given"]["source"] == str(src)
    assert "run live" in result["heldout"]
    m = result["sets"]["given"]["layers"]["1"]
    # the same SAE on the same held-out tokens as the adaptation's "before"
    before = json.loads((adapted / "adapt" / "adapt.json").read_text())["layers"]["1"]["fvu_before"]
    assert m["fvu"] == pytest.approx(before, rel=0.02)
    assert result["filters"]["1"]["dropped_padding"] > 0  # chat sequences are padded; the filters report it
    assert (tmp_path / "eval" / "report.md").is_file() and not (tmp_path / "cache").exists()


def test_evaluate_refuses_saes_of_another_model(adapted, tmp_path):
    bad = tmp_path / "SAE-Res-other-W1K-L0_8"
    for n in (1, 2):
        release.save_tensors(bad / f"layer{n}.sae.pt", random_release(d_model=32, d_sae=1024))
    cfg = compose(["experiment=demo_adapt", f"run_dir={tmp_path / 'run'}", "stages=[evaluate]", f"evaluate.saes={bad}"])
    with pytest.raises(ValueError, match="layer 1 has d_model 32, but .* has d_model 64"):
        run(cfg, Accelerator(cpu=True))


def test_adapt_needs_both_evaluations(adapted, tmp_path):
    shutil.copytree(adapted / "adapt" / "fit", tmp_path / "fit")
    cfg = compose(
        ["experiment=demo_adapt", f"run_dir={tmp_path}", "stages=[adapt]", f"init_from={adapted / 'base' / 'export'}"]
    )
    with pytest.raises(FileNotFoundError, match="lacks the source and trained evaluations"):
        run(cfg, Accelerator(cpu=True))
