import torch

from qscope_train.evaluate import Evaluator
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
