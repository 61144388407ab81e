"""Importing EleutherAI sparsify checkpoints: the folded release SAE computes what sparsify computes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qscope_train import convert, load, release
from qscope_train.config import Activation
from qscope_train.errors import QScopeError
from qscope_train.sae import TopKSAE

D_IN, D_SAE, K = 16, 64, 4


def sparsify_cfg(**overrides) -> dict:
    """cfg.json as SparseCoder.save_to_disk writes it (SparseCoderConfig.to_dict() plus d_in)."""
    cfg = dict(
        activation="topk",
        expansion_factor=32,
        normalize_decoder=True,
        num_latents=D_SAE,
        k=K,
        multi_topk=False,
        skip_connection=False,
        transcode=False,
        d_in=D_IN,
    )
    return {**cfg, **overrides}


def sparsify_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g).to(dtype),
        "encoder.bias": (torch.randn(D_SAE, generator=g) * 0.5).to(dtype),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g).to(dtype),
        "b_dec": (torch.randn(D_IN, generator=g) + 1.0).to(dtype),  # far from 0, so a missing fold shows
    }


def write_hookpoint(hook_dir: Path, cfg: dict | None = None, weights: dict | None = None, seed: int = 0) -> Path:
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "cfg.json").write_text(json.dumps(cfg or sparsify_cfg()))
    save_file(weights or sparsify_weights(seed), str(hook_dir / "sae.safetensors"))
    return hook_dir


def sparsify_reference(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify 1.3.3 by hand: fused_encoder's relu(linear(x - b_dec)) + topk, decode = acts @ W_dec + b_dec."""
    w = {key: t.float() for key, t in w.items()}
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    return z, z @ w["W_dec"] + w["b_dec"]


def residual_like(n: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 2 + 0.7


def assert_matches_sparsify(sae: TopKSAE, weights: dict, x: torch.Tensor, k: int = K, atol: float = 1e-4) -> None:
    z_want, x_hat_want = sparsify_reference(weights, x, k)
    z = sae.encode(x)
    assert torch.equal(z != 0, z_want != 0), "a different set of latents fired"
    torch.testing.assert_close(z, z_want, atol=atol, rtol=1e-5)
    torch.testing.assert_close(sae.decode(z), x_hat_want, atol=atol, rtol=1e-5)
    torch.testing.assert_close(sae(x).x_hat_BD, x_hat_want, atol=atol, rtol=1e-5)


def test_folded_release_reproduces_sparsify_encode_and_decode(tmp_path):
    weights = sparsify_weights()
    tensors, k, activation = convert.from_sparsify(write_hookpoint(tmp_path / "layers.3", weights=weights))
    assert (k, activation) == (K, Activation.relu_topk)
    assert release.validate(tensors) == (D_IN, D_SAE)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    x = residual_like()
    assert_matches_sparsify(TopKSAE.from_release(tensors, k, activation), weights, x)
    # The b_dec fold is what makes it match: copying encoder.bias as b_enc does not.
    naive = {**tensors, "b_enc": weights["encoder.bias"]}
    z_want, _ = sparsify_reference(weights, x, K)
    assert not torch.allclose(TopKSAE.from_release(naive, k, activation).encode(x), z_want, atol=1e-3)


def test_bf16_checkpoint_is_folded_in_fp32(tmp_path):
    weights = sparsify_weights(dtype=torch.bfloat16)
    tensors, k, activation = convert.from_sparsify(write_hookpoint(tmp_path / "layers.0", weights=weights))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert_matches_sparsify(TopKSAE.from_release(tensors, k, activation), weights, residual_like())


def _drop(key):
    return lambda w: {name: t for name, t in w.items() if name != key}


REFUSALS = {
    "transcoder": (sparsify_cfg(transcode=True), None, "cfg.json", "transcode"),
    "skip connection flag": (sparsify_cfg(skip_connection=True), None, "cfg.json", "skip_connection"),
    "W_skip tensor": (None, lambda w: {**w, "W_skip": torch.zeros(D_IN, D_IN)}, "sae.safetensors", "W_skip"),
    "groupmax": (sparsify_cfg(activation="groupmax"), None, "cfg.json", "groupmax"),
    "signed": (sparsify_cfg(signed=True), None, "cfg.json", "signed"),
    "no k": ({key: v for key, v in sparsify_cfg().items() if key != "k"}, None, "cfg.json", "'k'"),
    "missing key": (None, _drop("b_dec"), "sae.safetensors", "b_dec"),
    "unknown key": (None, lambda w: {**w, "log_threshold": torch.zeros(D_SAE)}, "sae.safetensors", "log_threshold"),
    "W_dec shape": (None, lambda w: {**w, "W_dec": w["W_dec"].T.contiguous()}, "sae.safetensors", "W_dec"),
    "d_in mismatch": (sparsify_cfg(d_in=D_IN + 1), None, "sae.safetensors", "d_in=17"),
    "num_latents mismatch": (sparsify_cfg(num_latents=2 * D_SAE), None, "sae.safetensors", "d_sae=128"),
    "k too large": (sparsify_cfg(k=D_SAE + 1), None, "cfg.json", "k=65"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_or_broken_checkpoints_are_refused_naming_the_culprit(tmp_path, case):
    cfg, edit_weights, file, culprit = REFUSALS[case]
    weights = sparsify_weights()
    hook_dir = write_hookpoint(tmp_path / "layers.2", cfg=cfg, weights=edit_weights(weights) if edit_weights else None)
    with pytest.raises(QScopeError) as err:
        convert.from_sparsify(hook_dir)
    message = str(err.value)
    assert str(hook_dir / file) in message and culprit in message, message
    assert "\n" not in message


@pytest.mark.parametrize("missing", ["cfg.json", "sae.safetensors"])
def test_missing_file_is_named(tmp_path, missing):
    hook_dir = write_hookpoint(tmp_path / "layers.1")
    (hook_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{hook_dir / missing} does not exist"):
        convert.from_sparsify(hook_dir)


def make_run(run: Path) -> Path:
    """A sparsify save_dir/run_name tree: hookpoints, a non-residual one, trainer state, and best/."""
    for i, name in enumerate(["layers.0", "model.layers.3", "language_model.layers.11", "layers.2.mlp"]):
        write_hookpoint(run / name, seed=i)
    write_hookpoint(run / "best" / "layers.0", seed=9)
    (run / "config.json").write_text("{}")
    (run / "state.pt").write_bytes(b"")
    return run


def test_hookpoint_names_map_to_decoder_layers(tmp_path):
    run = make_run(tmp_path / "run")
    assert convert.sparsify_layers(run) == {
        0: run / "layers.0",
        3: run / "model.layers.3",
        11: run / "language_model.layers.11",
    }
    assert convert.sparsify_layers(run / "model.layers.3") == {3: run / "model.layers.3"}
    assert [convert.hookpoint_layer(n) for n in ("layers.7", "h.7", "layers.7.mlp", "layers")] == [7, None, None, None]
    write_hookpoint(run / "layers.3")
    with pytest.raises(ValueError, match="'layers.3' and 'model.layers.3' both name layer 3"):
        convert.sparsify_layers(run)
    write_hookpoint(tmp_path / "mlp_only" / "layers.2.mlp")
    with pytest.raises(FileNotFoundError, match=r"no residual-stream hookpoint.*\['layers.2.mlp'\]"):
        convert.sparsify_layers(tmp_path / "mlp_only")


def test_load_sae_reads_a_sparsify_directory(tmp_path):
    run = make_run(tmp_path / "run")
    weights = sparsify_weights(seed=1)  # model.layers.3 was written with seed 1
    for sae in (load.load_sae(run, layer=3), load.load_sae(run / "model.layers.3")):
        assert (sae.k, sae.activation, sae.d_model, sae.d_sae) == (K, Activation.relu_topk, D_IN, D_SAE)
        assert_matches_sparsify(sae, weights, residual_like())
    assert load.resolve(run, 11) == run / "language_model.layers.11"
    assert load.load_sae(run, layer=3, k=2).k == 2  # explicit arguments still win
    with pytest.raises(FileNotFoundError, match=r"no sparsify hookpoint for layer 5; it has layers \[0, 3, 11\]"):
        load.load_sae(run, layer=5)
    with pytest.raises(ValueError, match="say which layer"):
        load.load_sae(run)


def test_import_writes_release_files_and_sidecars(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    written = convert.import_sparsify(run, out, layers=[11, 0], model_name="Qwen/Qwen3-1.7B-Base")
    assert written == {0: out / "layer0.sae.pt", 11: out / "layer11.sae.pt"}
    side = json.loads((out / "layer11.json").read_text())
    assert {key: side[key] for key in ("k", "activation", "d_model", "d_sae", "layer", "imported_from")} == {
        "k": K,
        "activation": "relu_topk",
        "d_model": D_IN,
        "d_sae": D_SAE,
        "layer": 11,
        "imported_from": str(run),
    }
    assert side["hookpoint"] == "language_model.layers.11" and side["sparsify_cfg"]["d_in"] == D_IN
    assert_matches_sparsify(load.load_sae(out, layer=11), sparsify_weights(seed=2), residual_like())
    with pytest.raises(FileNotFoundError, match=r"layer\(s\) \[5\]"):
        convert.import_sparsify(run, out, layers=[0, 5])


def test_cli_imports_and_reports_errors_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "qscope_train.convert", "sparsify", str(run), str(out), "--layers", "0", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1 and "imported 2 sparsify layer(s) [0, 3]" in done.stdout
    for n in (0, 3):
        assert release.validate(release.load_tensors(out / f"layer{n}.sae.pt")) == (D_IN, D_SAE)
    assert sorted(p.name for p in out.iterdir()) == ["layer0.json", "layer0.sae.pt", "layer3.json", "layer3.sae.pt"]

    write_hookpoint(run / "layers.5", cfg=sparsify_cfg(transcode=True))
    assert convert.main(["sparsify", str(run), str(tmp_path / "out2"), "--layers", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "transcode" in err
    assert not (tmp_path / "out2").exists()


SPARSIFY_SCRIPT = """
import sys, torch
from sparsify import SparseCoder, SparseCoderConfig

out = sys.argv[1]
torch.manual_seed(0)
sc = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4))
with torch.no_grad():  # a freshly built coder has zero biases; make the fold matter
    sc.encoder.bias.normal_(0, 0.5)
    sc.b_dec.normal_(1.0, 1.0)
sc.save_to_disk(f"{out}/run/layers.3")
x = torch.randn(128, 16) * 2 + 0.7
enc = sc.encode(x)
z = torch.zeros(128, 64).scatter(-1, enc.top_indices, enc.top_acts)
with torch.no_grad():
    torch.save({"x": x, "z": z, "x_hat": sc(x).sae_out}, f"{out}/expected.pt")
"""


@pytest.mark.skipif(
    not os.environ.get("QSCOPE_SPARSIFY_PYTHON"), reason="set QSCOPE_SPARSIFY_PYTHON to a python with sparsify"
)
def test_real_sparsify_checkpoint_round_trips(tmp_path):
    """sparsify's own SparseCoder.save_to_disk output, imported here, reproduces sparsify's own forward."""
    done = subprocess.run(
        [os.environ["QSCOPE_SPARSIFY_PYTHON"], "-c", textwrap.dedent(SPARSIFY_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, SPARSIFY_DISABLE_TRITON="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want = torch.load(tmp_path / "expected.pt", weights_only=True)
    convert.import_sparsify(tmp_path / "run", tmp_path / "out")
    for sae in (load.load_sae(tmp_path / "out", layer=3), load.load_sae(tmp_path / "run", layer=3)):
        z = sae.encode(want["x"])
        assert torch.equal(z != 0, want["z"] != 0)
        torch.testing.assert_close(z, want["z"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(sae.decode(z), want["x_hat"], atol=1e-4, rtol=1e-5)


def test_a_sparsify_run_is_evaluated_on_the_model_directly(fixtures_dir, tmp_path):
    from accelerate import Accelerator

    from qscope_train.cli import compose
    from qscope_train.pipeline import run

    g = torch.Generator().manual_seed(0)
    for n in (1, 2):
        weights = {
            "encoder.weight": torch.randn(256, 64, generator=g) / 8,
            "encoder.bias": torch.zeros(256),
            "W_dec": torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=1),
            "b_dec": torch.zeros(64),
        }
        write_hookpoint(tmp_path / "sparsify" / f"layers.{n}", sparsify_cfg(d_in=64, num_latents=256, k=8), weights)
    cfg = compose(
        [
            "experiment=demo",
            f"run_dir={tmp_path / 'run'}",
            "stages=[evaluate]",
            f"evaluate.saes={tmp_path / 'sparsify'}",
            "evaluate.downstream_tokens=1024",
            "data.eval_tokens=4096",
            "data.shard_tokens=4096",
        ]
    )
    result = run(cfg, Accelerator(cpu=True))
    for n in ("1", "2"):
        m = result["sets"]["given"]["layers"][n]
        assert m["l0"] <= 8 and 0 < m["fvu"] and m["delta_ce"] > 0
