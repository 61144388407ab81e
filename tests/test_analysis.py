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


def test_fisher_exact_and_benjamini_hochberg_match_their_definitions():
    from math import comb

    from qscope_train.analysis.compare import benjamini_hochberg, fisher_exact

    g = torch.Generator().manual_seed(0)
    n_a, n_b = 9, 13
    x, y = torch.randint(0, n_a + 1, (40,), generator=g), torch.randint(0, n_b + 1, (40,), generator=g)
    p = fisher_exact(x, n_a, y, n_b)
    for f in range(40):
        K, N = int(x[f] + y[f]), n_a + n_b
        table = [comb(K, i) * comb(N - K, n_a - i) / comb(N, n_a) for i in range(max(0, K - n_b), min(K, n_a) + 1)]
        seen = comb(K, int(x[f])) * comb(N - K, n_a - int(x[f])) / comb(N, n_a)
        assert abs(float(p[f]) - min(1.0, sum(t for t in table if t <= seen * (1 + 1e-7)))) < 1e-9
    tested = torch.rand(40, generator=g) < 0.8
    q = benjamini_hochberg(p, tested)
    pt = p[tested].tolist()
    m = len(pt)
    for f in range(40):
        if not tested[f]:
            assert q[f] == 1
            continue
        want = min(min(1.0, pj * m / sum(pk <= pj for pk in pt)) for pj in pt if pj >= float(p[f]))
        assert abs(float(q[f]) - want) < 1e-9


@pytest.fixture(scope="module")
def honey(fixtures_dir, an):
    """Docs with and without the word honey, and a layer-0 SAE whose latent 0 fires on honey's token only
    (its encoder row the linear discriminant of that token's residuals against the rest)."""
    from qscope_train.tiny import generate_corpus

    docs = [" ".join(d.split(". ")[:4]) for d in generate_corpus(400, seed=7)]
    with_honey = [d for d in docs if " honey" in d][:24]
    without = [d for d in docs if "honey" not in d][:24]
    honey_id = an.tokenize(" honey").tolist()
    assert len(honey_id) == 1 and len(with_honey) == 24
    resid, is_honey = [], []
    for d in with_honey + without:
        ids = an.tokenize(d)
        resid.append(run_captured(an.lm, [0], ids[None])[0][0][1:])
        is_honey.append(ids[1:] == honey_id[0])
    resid, is_honey = torch.cat(resid), torch.cat(is_honey)
    mean_h, mean_r = resid[is_honey].mean(0), resid[~is_honey].mean(0)
    cov = torch.cov((resid[~is_honey] - mean_r).T)
    w = torch.linalg.solve(cov + 1e-3 * cov.trace() / cov.shape[0] * torch.eye(cov.shape[0]), mean_h - mean_r)
    s = resid @ w
    assert s[is_honey].min() > s[~is_honey].max()  # the planted latent can tell them apart
    threshold = (s[is_honey].min() + s[~is_honey].max()) / 2
    sae = _sae(3)
    scale = 100.0 / (s[is_honey].min() - threshold)
    with torch.no_grad():
        sae.W_enc[0] = w * scale
        sae.b_enc[0] = -threshold * scale
        sae.W_dec_FD[0] = w / w.norm()
    return Analyzer(an.lm, {0: sae}), with_honey, without


def test_compare_finds_no_feature_between_identical_sets_and_the_planted_one_between_different_sets(honey):
    from qscope_train.analysis.compare import compare

    an1, with_honey, without = honey
    same = compare(an1, without, without)
    assert same["layers"][0]["significant"] == 0 and same["layers"][0]["footprint"]["b_covers_of_a"] == 1.0
    out = compare(an1, without, with_honey)["layers"][0]
    top = out["more_in_b"][0]
    assert top["feature"] == 0 and top["significant"] and top["rate_b"] == 1.0 and top["rate_a"] == 0.0
    assert top["q"] < 1e-6 and all(r["feature"] != 0 for r in out["more_in_a"])


def test_the_feature_classifier_scores_its_held_out_texts_as_a_brute_force_count_does(honey):
    from qscope_train.analysis.compare import compare, firing

    an1, with_honey, without = honey
    out = compare(an1, with_honey, without, classifier_features=3, seed=5)["layers"][0]["classifier"]["a"]
    assert 0 in out["features"] and len(out["features"]) <= 3
    # brute force: the same split, every held-out text's flag counted one by one
    import random

    from qscope_train.analysis.compare import _split

    g = random.Random(5)
    train_a, train_b = _split(24, 0.5, g), _split(24, 0.5, g)
    fa, fb = firing(an1, with_honey, [0])[0][0], firing(an1, without, [0])[0][0]
    tp = sum(any(fa[t, f] for f in out["features"]) for t in range(24) if not train_a[t])
    fp = sum(any(fb[t, f] for f in out["features"]) for t in range(24) if not train_b[t])
    fn = sum(1 for t in range(24) if not train_a[t]) - tp
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert out["precision"] == pytest.approx(precision) and out["recall"] == pytest.approx(recall)
    assert out["f1"] == pytest.approx(2 * precision * recall / (precision + recall)) and out["f1"] > 0.9
