import pytest
import torch

from qscope_train.metrics import Evaluator
from qscope_train.sae import TopKSAE


def test_metrics_match_an_independent_computation_across_update_calls():
    torch.manual_seed(0)
    sae = TopKSAE(16, 128, 6)
    with torch.no_grad():
        sae.b_enc[:32] = -1e4  # never selected
        sae.b_dec.normal_()
    x = torch.randn(1000, 16) * 2 + 3
    ev = Evaluator(sae, max_batch=128)
    for part in x.split(333):
        ev.update(part)
    m = ev.result()
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    want = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(m["fvu"] - want.item()) < 1e-4
    assert abs(m["mse"] - ((x - x_hat) ** 2).mean().item()) < 1e-5
    assert m["l0"] == 6 and m["n_tokens"] == 1000
    fired = (sae.encode(x) != 0).any(0)
    assert m["dead_frac"] == 1 - fired.float().mean().item() and m["dead_frac"] >= 32 / 128


def test_cosine_norm_uncentered_dense_and_histogram_match_independent_computations():
    torch.manual_seed(1)
    sae = TopKSAE(16, 64, 4)
    with torch.no_grad():
        sae.b_enc[:3] = 1e4  # always among the k=4 selected: dense
        sae.b_enc[8:20] = -1e4  # never selected: dead
    x = torch.randn(500, 16) + 1
    ev = Evaluator(sae, max_batch=100, dense_threshold=0.1)
    ev.update(x)
    m = ev.result()
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
        z = sae.encode(x)
    cos = torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).mean()
    assert m["cosine"] == pytest.approx(cos.item(), abs=1e-5)
    assert m["l2_ratio"] == pytest.approx((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(), rel=1e-5)
    assert m["fvu_uncentered"] == pytest.approx((((x - x_hat) ** 2).sum() / (x**2).sum()).item(), rel=1e-5)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["fvu_uncentered"] < m["fvu"]  # x has a non-zero mean, so sum ||x||^2 > centered variance
    freq = (z != 0).float().mean(0)
    assert m["dense_frac"] == pytest.approx((freq > 0.1).float().mean().item()) and m["dense_frac"] >= 3 / 64
    hist = m["firing_hist"]
    assert hist["never"] == int((freq == 0).sum()) >= 12
    assert sum(hist["counts"]) == 64 - hist["never"]
    assert len(hist["log10_edges"]) == len(hist["counts"]) + 1
    # the 3 always-on latents fire on every row: log10 frequency 0, the last bin
    assert hist["counts"][-1] >= 3
