import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_release

from qscope_train import load, release
from qscope_train.release import ReleaseFormatError, ReleaseName


def test_save_load_round_trip_is_exact(tmp_path):
    tensors = random_release()
    path = release.save_tensors(tmp_path / "layer3.sae.pt", tensors)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["W_enc", "W_dec", "b_enc", "b_dec"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in raw.values())
    loaded = release.load_tensors(path)
    for key in tensors:
        assert torch.equal(loaded[key], tensors[key])


def test_release_file_loaded_and_saved_again_is_identical(tmp_path):
    # Written the way the release's own files are: a plain torch.save of the four tensors.
    src = tmp_path / "src" / "layer0.sae.pt"
    src.parent.mkdir()
    torch.save(random_release(seed=3), src)
    again = release.save_tensors(tmp_path / "out" / "layer0.sae.pt", release.load_tensors(src))
    a, b = torch.load(src, weights_only=True), torch.load(again, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key])


def test_bf16_input_is_saved_as_fp32(tmp_path):
    tensors = {k: v.bfloat16() for k, v in random_release().items()}
    raw = torch.load(release.save_tensors(tmp_path / "l.sae.pt", tensors), weights_only=True)
    assert {t.dtype for t in raw.values()} == {torch.float32}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad(kind):
    t = random_release(d_model=8, d_sae=32)
    if kind == "missing":
        del t["b_dec"]
    elif kind == "extra":
        t["scale"] = torch.ones(1)
    elif kind == "transposed":
        t["W_dec"] = t["W_dec"].T.contiguous()
    elif kind == "int":
        t["b_enc"] = t["b_enc"].long()
    elif kind == "nan":
        t["W_enc"][3, 4] = float("nan")
    elif kind == "not_a_dict":
        t = list(t.values())
    elif kind == "code":
        t = {"W_enc": Evil()}
    return t


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("missing", "missing key(s) ['b_dec']"),
        ("extra", "unexpected key(s) ['scale']"),
        (
            "transposed",
            "key 'W_dec': expected shape (8, 32) = (d_model, d_sae) from b_enc/b_dec, found (32, 8) (transposed?)",
        ),
        ("int", "key 'b_enc': expected a floating dtype (float32), found torch.int64"),
        ("nan", "key 'W_enc': expected finite values, found 1 NaN/inf entries"),
        ("not_a_dict", "expected a dict of the four tensors"),
        ("code", "refused by torch.load(weights_only=True)"),
    ],
)
def test_bad_checkpoint_gives_one_clear_error(tmp_path, kind, needle):
    path = tmp_path / f"{kind}.sae.pt"
    with open(path, "wb") as f:
        pickle.dump(_bad(kind), f) if kind == "code" else torch.save(_bad(kind), f)
    with pytest.raises(ReleaseFormatError) as info:
        release.load_tensors(path)
    msg = str(info.value)
    assert needle in msg
    assert str(path) in msg and "\n" not in msg


def test_code_pickle_is_never_executed(tmp_path, capfd):
    path = tmp_path / "evil.sae.pt"
    torch.save({"W_enc": Evil()}, path)
    with pytest.raises(ReleaseFormatError) as info:
        release.load_tensors(path)
    assert "pwned" not in capfd.readouterr().out
    assert "system" in str(info.value) and "never load it with weights_only=False" in str(info.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = release.save_tensors(tmp_path / "layer0.sae.pt", random_release())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ReleaseFormatError, match="not a readable torch checkpoint"):
        release.load_tensors(path)


def test_release_names_parse_and_format():
    name = ReleaseName.parse("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_100")
    assert name == ReleaseName("Qwen3-1.7B-Base", 32, 100)
    assert str(name) == "SAE-Res-Qwen3-1.7B-Base-W32K-L0_100"
    assert ReleaseName.parse("SAE-Res-Qwen3.5-2B-Base-W32K-L0_50/").k == 50
    assert ReleaseName.parse("Qwen/Qwen3-1.7B-Base") is None
    assert str(ReleaseName.for_sae("Qwen3.5-2B-Base", 32768, 50)) == "SAE-Res-Qwen3.5-2B-Base-W32K-L0_50"


def test_directory_needs_an_existing_layer(tmp_path):
    release.save_tensors(tmp_path / "layer2.sae.pt", random_release())
    assert load.resolve(tmp_path, 2) == tmp_path / "layer2.sae.pt"
    with pytest.raises(FileNotFoundError, match=r"layer5.sae.pt does not exist.*layer2.sae.pt"):
        load.resolve(tmp_path, 5)
    with pytest.raises(ValueError, match="say which layer"):
        load.resolve(tmp_path)


def test_load_sae_reads_k_from_the_directory_name(tmp_path):
    d = tmp_path / "SAE-Res-Tiny-W1K-L0_7"
    release.save_tensors(d / "layer1.sae.pt", random_release(d_model=8, d_sae=1024))
    sae = load.load_sae(d, layer=1)
    assert (sae.k, sae.d_sae, sae.d_model) == (7, 1024, 8)
    with pytest.raises(ValueError, match="cannot tell k"):
        load.load_sae(release.save_tensors(tmp_path / "plain" / "layer1.sae.pt", random_release()))


def test_hub_repo_id_loads_from_the_local_hf_cache_offline(tmp_path):
    """A hub id resolves through huggingface_hub; with HF_HUB_OFFLINE=1 it is served from the cache."""
    repo = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_100"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--Qwen--SAE-Res-Qwen3-1.7B-Base-W32K-L0_100"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(commit)
    tensors = random_release(d_model=8, d_sae=256, seed=5)
    release.save_tensors(snap / "snapshots" / commit / "layer3.sae.pt", tensors)
    torch.save(tensors, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from qscope_train import load
        sae = load.load_sae({repo!r}, layer=3)
        want = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert sae.k == 100, sae.k
        assert all(torch.equal(getattr(sae, k), want[k]) for k in want)
        print("ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file or directory nor a hub repo id"):
        load.resolve(str(tmp_path / "nope" / "x" / "y"), 0)
