"""The quality scorecard: twin latents and SAEBench's core metrics, each against a brute-force reference."""

import pytest
import torch

from qscope_train.metrics import LEGACY_EV_ROWS, Evaluator
from qscope_train.sae import TopKSAE
from qscope_train.scorecard import MAX_COS_EDGES, SequenceFiring, max_cosines, twins, weight_metrics


def _brute_max_cos(M):
    unit = torch.nn.functional.normalize(M.double(), dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-torch.inf)
    return cos.max(1)


@pytest.mark.parametrize("chunk", [1, 7, 2048])
def test_max_cosines_equal_the_brute_force_maximum_in_chunks_and_among_a_subset(chunk):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(50, 12, generator=g)
    best, partner = max_cosines(M, chunk=chunk)
    want, at = _brute_max_cos(M)
    torch.testing.assert_close(best.double(), want, atol=1e-6, rtol=0)
    assert torch.equal(partner, at)
    among = torch.rand(50, generator=g) < 0.5
    best, partner = max_cosines(M, among, chunk=chunk)
    want, at = _brute_max_cos(M[among])
    torch.testing.assert_close(best[among].double(), want, atol=1e-6, rtol=0)
    assert torch.equal(partner[among], among.nonzero().squeeze(1)[at])
    assert (best[~among] == -torch.inf).all() and (partner[~among] == -1).all()


def test_planted_twins_are_counted_and_distinct_latents_are_not():
    g = torch.Generator().manual_seed(1)
    d_model, d_sae = 64, 40
    W = torch.linalg.qr(torch.randn(d_model, d_sae, generator=g))[0].T.clone()  # 40 orthonormal directions
    live = torch.ones(d_sae, dtype=torch.bool)
    assert twins(W, live)["twin_frac"] == 0.0
    # plant 5 pairs: latent 2i+1 a copy of 2i at cosine 0.97 (twins), and one more pair at 0.9 (not twins)
    for i in range(5):
        W[2 * i + 1] = 0.97 * W[2 * i] + (1 - 0.97**2) ** 0.5 * W[30 + i]
    W[21] = 0.9 * W[20] + (1 - 0.81) ** 0.5 * W[39]
    t = twins(W, live)
    assert t["twin_frac"] == pytest.approx(10 / 40) and t["twin_frac_99"] == 0.0 and t["live"] == 40
    # a twin of a dead latent is no twin: the user never sees the dead one
    live[0] = False
    assert twins(W, live)["twin_frac"] == pytest.approx(8 / 39)
    hist = twins(W, live)["max_decoder_cos_hist"]
    assert len(hist["counts"]) == len(MAX_COS_EDGES) - 1 and sum(hist["counts"]) == 39
    assert hist["counts"][-1] == 8  # the [0.95, 1] bin


def test_weight_metrics_equal_brute_force_sums():
    g = torch.Generator().manual_seed(2)
    W_enc, W_dec = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    m = weight_metrics(W_enc, W_dec)
    assert m["average_max_decoder_cosine_sim"] == pytest.approx(_brute_max_cos(W_dec)[0].mean().item(), abs=1e-6)
    assert m["average_max_encoder_cosine_sim"] == pytest.approx(_brute_max_cos(W_enc)[0].mean().item(), abs=1e-6)
    dots = (W_enc.double() * W_dec.double()).sum(1) / (W_enc.double().norm(dim=1) * W_dec.double().norm(dim=1))
    assert m["encoder_decoder_cosine_sim"] == pytest.approx(dots.mean().item(), abs=1e-6)


def test_evaluator_core_metrics_equal_brute_force_on_random_data():
    torch.manual_seed(3)
    sae = TopKSAE(16, 96, 5)
    with torch.no_grad():
        sae.b_enc[:2] = 1e4  # fire on every row: over 10 % of tokens
        sae.b_enc[10:30] = -1e4  # never fire
        sae.b_dec.normal_()
    x = torch.randn(3 * LEGACY_EV_ROWS + 100, 16) * 2 + 1
    ev = Evaluator(sae)
    for part in x.split(5000):  # two calls; the legacy EV's batches are LEGACY_EV_ROWS rows of each call
        ev.update(part)
    m = ev.result()
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z).double()
    x = x.double()
    assert m["l2_ratio"] == pytest.approx((x_hat.norm(dim=1) / x.norm(dim=1)).mean().item(), rel=1e-5)
    bias = (x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean()).item()
    assert m["relative_reconstruction_bias"] == pytest.approx(bias, rel=1e-5)
    per_token = []
    for part in x.split(5000):
        for b in part.split(LEGACY_EV_ROWS):
            xh = x_hat[len(torch.cat(per_token)) if per_token else 0 :][: b.shape[0]]
            per_token.append(1 - (b - xh).pow(2).sum(1) / (b - b.mean(0)).pow(2).sum(1))
    assert m["explained_variance_legacy"] == pytest.approx(torch.cat(per_token).mean().item(), rel=1e-5)
    freq = (z != 0).double().mean(0)
    assert m["freq_over_1_percent"] == pytest.approx((freq > 0.01).double().mean().item())
    assert (
        m["freq_over_10_percent"] == pytest.approx((freq > 0.1).double().mean().item())
        and m["freq_over_10_percent"] > 0
    )
    alive = freq > 0
    unit = torch.nn.functional.normalize(sae.W_dec_FD.detach().double()[alive], dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    assert m["twin_frac"] == pytest.approx((cos.max(1).values >= 0.95).double().mean().item())
    assert m["live"] == int(alive.sum()) <= 96 - 20


def test_consistent_activation_heuristic_is_tokens_over_sequences_it_fires_in():
    # 3 sequences of 4 tokens, d_sae 5, k 2; mask drops the last token of sequence 0
    idx = torch.tensor(
        [
            [[0, 1], [0, 2], [0, 1], [3, 4]],
            [[1, 2], [1, 2], [2, 3], [2, 3]],
            [[4, 0], [4, 1], [4, 2], [4, 3]],
        ]
    )
    vals = torch.ones(3, 4, 2)
    vals[2, :, 1] = 0  # selected but not fired
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False
    f = SequenceFiring(5)
    f.add(idx[:2], vals[:2], mask[:2])  # in two calls
    f.add(idx[2:], vals[2:], mask[2:])
    fired = torch.zeros(3, 4, 5)
    fired.scatter_(2, idx, vals)
    fired = (fired > 0) & mask[..., None]
    tokens, seqs = fired.sum((0, 1)).double(), fired.any(1).sum(0).double()
    want = (tokens[seqs > 0] / seqs[seqs > 0]).mean().item()
    assert f.result()["consistent_activation_heuristic"] == pytest.approx(want)
    assert want != pytest.approx(1.0)  # the case tells a per-sequence count from a per-token one
