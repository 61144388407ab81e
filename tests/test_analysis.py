import pytest
import torch
from conftest import random_release

from qscope_train.analysis import Analyzer, analyze, steer
from qscope_train.analysis.model import sae_layers
from qscope_train.analysis.steer import Edit, steering
from qscope_train.config import Activation, ModelConfig
from qscope_train.errors import InputError
from qscope_train.lm import load_lm, run_captured
from qscope_train.release import save_tensors
from qscope_train.sae import TopKSAE

PROMPT = "the cat sat on the mat and the dog ran to the park"


def _sae(seed: int) -> TopKSAE:
    """Random unit decoder directions, each latent's encoder row its own direction (as a trained SAE's
    roughly is: a random encoder would let one latent's step move the others' far more than its own)."""
    t = random_release(d_model=64, d_sae=256, seed=seed)
    t["W_dec"] /= t["W_dec"].norm(dim=0, keepdim=True)
    t["W_enc"] = t["W_dec"].T.clone()
    return TopKSAE.from_release(t, 8, Activation.relu_topk)


@pytest.fixture(scope="module")
def an(fixtures_dir):
    lm = load_lm(ModelConfig(name_or_path=str(fixtures_dir / "tiny-qwen3")))
    return Analyzer(lm, {1: _sae(1), 2: _sae(2)})


def test_analyze_lists_each_tokens_strongest_features_as_the_sae_encodes_them(an):
    out = analyze(an, PROMPT, top=3)
    ids = an.tokenize(PROMPT)
    assert out["ids"] == ids.tolist() and len(out["tokens"]) == ids.numel()
    resid = run_captured(an.lm, [2], ids[None])[2][0]
    dense_TF = an.saes[2].encode(resid)  # the card's dense encoder, brute force
    for t, feats in enumerate(out["layers"][2]["per_token"]):
        want_v, want_f = dense_TF[t].topk(3)
        assert [f for f, _ in feats] == want_f.tolist()
        torch.testing.assert_close(torch.tensor([a for _, a in feats]), want_v)
    top = out["layers"][2]["features"]
    peak_F = dense_TF.max(0).values
    assert [f["feature"] for f in top] == peak_F.topk(3).indices.tolist()
    torch.testing.assert_close(torch.tensor(top[0]["acts"]), dense_TF[:, top[0]["feature"]])


def test_bad_inputs_name_the_culprit(an):
    with pytest.raises(InputError, match="empty"):
        analyze(an, "   ")
    with pytest.raises(InputError, match="no SAE for layer 3"):
        analyze(an, PROMPT, layers=[3])
    with pytest.raises(InputError, match="feature 256 is out of range"):
        steer(an, PROMPT, [Edit(layer=1, feature=256, strength=1.0)])


def test_steering_at_strength_zero_reproduces_the_clean_generation_token_for_token(an):
    for temperature in (0.0, 1.0):
        out = steer(an, PROMPT, [Edit(layer=1, feature=5, strength=0.0)], max_new_tokens=12, temperature=temperature)
        assert out["steered"]["ids"] == out["original"]["ids"]
        assert out["steered"]["probs"] == out["original"]["probs"]
    strong = steer(an, PROMPT, [Edit(layer=1, feature=5, strength=8.0)], max_new_tokens=12)
    assert strong["steered"]["ids"] != strong["original"]["ids"]  # the same edit with strength changes the text
    assert strong["norms"][1] > 0 and strong["norms_measured_on"] in ("the prompt", "measure_norms")


def test_a_clamped_feature_reads_back_at_the_clamped_value_where_it_was_clamped(an):
    ids = an.tokenize(PROMPT)
    prompt_len = 6
    clean = run_captured(an.lm, [2], ids[None])[2][0]
    value = 1.5 * float(an.saes[2].pre_acts(clean).max())  # above every token's k-th pre-activation
    edit = Edit(layer=2, feature=17, clamp=value, positions="generated")
    with steering(an, [edit], prompt_len):
        steered = run_captured(an.lm, [2], ids[None])[2][0]
    read = an.saes[2].encode(steered)[:, 17]
    torch.testing.assert_close(read[prompt_len:], torch.full_like(read[prompt_len:], value), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(steered[:prompt_len], clean[:prompt_len])  # the prompt's positions untouched
    # the step is along the feature's decoder direction only
    step = steered[prompt_len:] - clean[prompt_len:]
    d = an.saes[2].W_dec_FD[17]
    torch.testing.assert_close(step - (step @ d)[:, None] * d / d.dot(d), torch.zeros_like(step), atol=1e-4, rtol=0)


def test_an_analyzer_loads_every_layer_a_release_directory_holds(fixtures_dir, tmp_path):
    for n in (0, 3):
        save_tensors(tmp_path / f"layer{n}.sae.pt", random_release(d_model=64, d_sae=128, seed=n))
    assert sae_layers(tmp_path) == [0, 3]
    (tmp_path / "layer3.json").write_text('{"k": 4}')
    (tmp_path / "layer0.json").write_text('{"k": 4}')
    an = Analyzer.load(str(fixtures_dir / "tiny-qwen3"), tmp_path)
    assert an.layers == [0, 3] and an.saes[3].k == 4
    with pytest.raises(InputError, match="no layer<n>.sae.pt"):
        sae_layers(fixtures_dir / "tiny-qwen3")
