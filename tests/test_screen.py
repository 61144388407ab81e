"""The bf16 screen of the fp32 training top-k (screen.py): same latents and values as an fp32 GEMM, rows it
cannot prove sent back to fp32, its error bound a bound, and the training step's gradients unchanged."""

from __future__ import annotations

import torch

from qscope_train import screen
from qscope_train.losses import fvu
from qscope_train.sae import TopKSAE


def _fp32_topk(x, W, b, k):
    vals, idx = torch.addmm(b, x, W.T).topk(k, dim=-1)
    return vals, idx.sort(-1).values


def test_screened_top_k_is_the_fp32_top_k_with_fp32_values():
    torch.manual_seed(0)
    B, D, F, k = 256, 64, 1024, 16
    x, W, b = torch.randn(B, D) * 3 + 1, torch.randn(F, D) / 8, torch.randn(F) * 0.1
    pre, top, _ = screen.screened_pre(x, W, b, k)
    vals, idx = pre.topk(k, dim=-1)
    want_vals, want_idx = _fp32_topk(x, W, b, k)
    assert torch.equal(idx.sort(-1).values, want_idx)
    assert torch.equal(top.sort(-1).values, want_idx)  # the top k it hands back, taken from its candidates
    torch.testing.assert_close(vals, want_vals, rtol=1e-5, atol=1e-5)
    # outside the top k the values are only screened: bf16's accuracy, not fp32's
    assert (pre - torch.addmm(b, x, W.T)).abs().max() > 1e-4


def test_rows_the_bound_cannot_prove_are_formed_again_in_fp32():
    """200 latents whose directions differ below bf16's resolution: the screen ranks them as ties and picks its
    candidates among them blindly; only the bound's fallback finds the fp32 top k."""
    torch.manual_seed(1)
    B, D, F, k = 64, 64, 1024, 16
    base = torch.randn(D)
    W = torch.randn(F, D) / 8
    W[:200] = base + torch.randn(200, D) * 1e-4  # each within 2^-8 of base: the same bf16 row
    x = base + torch.randn(B, D) * 0.01
    b = torch.zeros(F)
    pre, top, redone = screen.screened_pre(x, W, b, k)
    assert redone > B // 2
    assert torch.equal(pre.topk(k, dim=-1).indices.sort(-1).values, _fp32_topk(x, W, b, k)[1])
    assert torch.equal(top.sort(-1).values, _fp32_topk(x, W, b, k)[1])


def test_under_a_relu_the_top_k_comes_from_the_candidates_also_where_fewer_than_k_are_positive():
    """relu_topk ranks relu(pre): in a row with fewer than k positive latents every other pick is a 0, and
    any latent at or below 0 ties with it, so the row needs no fp32 GEMM of its own."""
    torch.manual_seed(4)
    B, D, F, k = 128, 64, 1024, 16
    x, W = torch.randn(B, D), torch.randn(F, D) / 8
    b = torch.full((F,), -4.0)
    b[:8] = 5.0  # 8 latents positive on every row, the rest almost never
    pre, top, redone = screen.screened_pre(x, W, b, k, relu=True)
    fp32 = torch.addmm(b, x, W.T).relu()
    assert ((fp32 > 0).sum(1) < k).all() and redone == 0
    want = fp32.gather(-1, fp32.topk(k, dim=-1).indices).sort(-1).values
    torch.testing.assert_close(fp32.gather(-1, top).sort(-1).values, want)
    assert ((top < 8).sum(1) == 8).all()  # the positive ones are picked in every row


def test_rounding_bound_holds_where_the_roundings_add_up():
    """All-positive rows and inputs (every rounding error pushes one way) against an fp64 product."""
    torch.manual_seed(2)
    for D in (64, 1024):
        x, W = torch.rand(32, D) + 0.5, torch.rand(500, D) + 0.5
        approx = (x.bfloat16().float() @ W.bfloat16().float().T).double()
        exact = x.double() @ W.double().T
        err = (approx - exact).abs().max(1).values
        bound = screen.rounding_bound(x, W).double()
        assert (err <= bound).all()
        assert (err > bound / 50).all()  # a bound near the errors, not a vacuous one


def test_the_trainer_reaches_the_screen_and_its_gradients_are_the_fp32_ones(monkeypatch):
    torch.manual_seed(3)
    sae = TopKSAE(32, 512, 8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(128, 32)
    grads, real = {}, screen.screened_pre
    for on in (False, True):
        calls = []

        def spy(*args, calls=calls, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        def select(*args, calls=calls, **kwargs):  # the full top-k: only where no screen handed one back
            calls.append("select")
            return TopKSAE.select(sae, *args, **kwargs)

        monkeypatch.setattr(screen, "applies", lambda *a, on=on: on)
        monkeypatch.setattr(screen, "screened_pre", spy)
        monkeypatch.setattr(sae, "select", select)
        sae.zero_grad()
        fvu(x, sae(x).x_hat_BD).backward()
        grads[on] = {n: p.grad.clone() for n, p in sae.named_parameters()}
        assert calls == ([1] if on else ["select"])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_screen_runs_only_where_it_pays():
    cpu = torch.device("cpu")
    assert not screen.applies(cpu, screen.MIN_D_MODEL // 2, 16384, 64)
    assert not screen.applies(torch.device("meta"), 2048, 32768, 100)
    assert not screen.applies(cpu, 2048, 1024, 100)  # the candidates would be a fifth of the latents
    assert screen.applies(cpu, 2048, 32768, 100) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
