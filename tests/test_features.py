"""Streaming per-feature statistics equal a brute-force computation over the dense activation matrix."""

import math

import torch

from qscope_train.features import HIST_BINS, FirstPass, Ranges, hist_bin, logit_lens, neighbours, window_activations


def _codes(n_tok=600, d_sae=50, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n_tok)])
    val = torch.rand(n_tok, k, generator=g).mul(4).round(decimals=1)  # ties and zeros happen
    dense = torch.zeros(n_tok, d_sae).scatter_(1, idx, val)
    return idx, val, dense


def test_first_pass_equals_brute_force_top_n_histogram_and_counts():
    idx, val, dense = _codes()
    fp = FirstPass.new(50, 5)
    for s in range(0, 600, 128):  # batches that do not divide the stream evenly
        fp.add(idx[s : s + 128], val[s : s + 128], torch.arange(s, min(s + 128, 600)))
    assert fp.tokens == 600
    for f in range(50):
        col = dense[:, f]
        toks = [t for t in range(600) if col[t] > 0]
        toks.sort(key=lambda t: (-col[t].item(), t))
        want = toks[:5] + [-1] * (5 - len(toks[:5]))
        assert fp.top.tok[f].tolist() == want, f
        got_v = fp.top.val[f].tolist()
        assert got_v == [col[t].item() if t >= 0 else -math.inf for t in want]
        assert fp.fires[f] == len(toks)
        hist = torch.bincount(hist_bin(col[col > 0]), minlength=HIST_BINS)
        assert torch.equal(fp.hist[f], hist)


def test_lower_range_examples_are_the_first_in_each_band():
    idx, val, dense = _codes(seed=1)
    max_val = dense.max(0).values
    r = Ranges(max_val, bands=3, m=2)
    for s in range(0, 600, 100):
        r.add(idx[s : s + 100], val[s : s + 100], torch.arange(s, s + 100))
    for f in range(50):
        for b in range(2):
            col = dense[:, f]
            band = (col / max_val[f].clamp_min(1e-12) * 3).long().clamp(0, 2)
            toks = [t for t in range(600) if col[t] > 0 and band[t] == b][:2]
            assert r.tok[f, b].tolist() == toks + [-1] * (2 - len(toks)), (f, b)
            assert r.filled[f, b] == len(toks)
            assert r.seen[f, b] == int(((band == b) & (col > 0)).sum())


def test_window_activations_read_the_codes_around_each_token():
    idx, val, dense = _codes(n_tok=40)
    row_of = torch.arange(40)
    row_of[7] = -1  # a filtered token: no code, shown as 0
    feat, tok = torch.tensor([3, 9, 3]), torch.tensor([0, 20, 39])
    got = window_activations(feat, tok, idx, val, row_of, width=2)
    for e in range(3):
        for j, t in enumerate(range(tok[e] - 2, tok[e] + 3)):
            want = dense[t, feat[e]].item() if 0 <= t < 40 and t != 7 else 0.0
            assert got[e, j].item() == want


def test_logit_lens_and_neighbours_equal_the_dense_computation():
    g = torch.Generator().manual_seed(2)
    W_dec, W_U, gain = torch.randn(16, 70, generator=g), torch.randn(90, 16, generator=g), torch.rand(16, generator=g)
    ti, tv, bi, bv = logit_lens(W_dec, lambda x: x * gain, W_U, k=3, chunk=32)
    full = (W_U @ (W_dec * gain[:, None])).T
    assert torch.equal(ti, full.topk(3, dim=1).indices) and torch.equal(bi, full.topk(3, dim=1, largest=False).indices)
    torch.testing.assert_close(tv, full.topk(3, dim=1).values)
    ni, nc = neighbours(W_dec, k=4, chunk=32)
    unit = torch.nn.functional.normalize(W_dec, dim=0)
    sim = unit.T @ unit
    sim.fill_diagonal_(-math.inf)
    assert torch.equal(ni, sim.topk(4, dim=1).indices)
    torch.testing.assert_close(nc, sim.topk(4, dim=1).values)
