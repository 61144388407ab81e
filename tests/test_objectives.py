"""Multi-TopK and Matryoshka: gradients against dense autograd references, and exports the card reads."""

import pytest
import torch
from conftest import card_get_feature_acts

from qscope_train import release
from qscope_train.config import Activation, Objective, TrainerConfig
from qscope_train.data.batches import Unseekable
from qscope_train.losses import fvu
from qscope_train.objectives import compute, prefix_sizes
from qscope_train.sae import TopKSAE
from qscope_train.tracking import NullBar
from qscope_train.trainer import fit


def _sae(activation=Activation.topk, centered=False):
    torch.manual_seed(0)
    sae = TopKSAE(16, 128, 6, activation)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    sae.centered = centered
    return sae


def _dense_topk(sae: TopKSAE, x, k, below=None):
    """Autograd through the dense form; `below` keeps only latents with index < below in the decode."""
    pre = (x - sae.b_dec if sae.centered else x) @ sae.W_enc.T + sae.b_enc
    if sae.activation is Activation.relu_topk:
        pre = torch.relu(pre)
    vals, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    if below is not None:
        z = z * (torch.arange(sae.d_sae) < below)
    return z @ sae.W_dec.T + sae.b_dec


def _dense_loss(sae, x, cfg):
    if cfg.objective is Objective.multi_topk:
        return fvu(x, _dense_topk(sae, x, sae.k)) + cfg.multi_topk_coef * fvu(
            x, _dense_topk(sae, x, cfg.multi_topk_factor * sae.k)
        )
    sizes = prefix_sizes(sae.d_sae, cfg.matryoshka_prefixes)
    return torch.stack([fvu(x, _dense_topk(sae, x, sae.k, below=m)) for m in sizes]).mean()


def _grads(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


CFGS = {
    "multi_topk": TrainerConfig(objective=Objective.multi_topk, multi_topk_factor=3, multi_topk_coef=0.3),
    "matryoshka": TrainerConfig(objective=Objective.matryoshka, matryoshka_prefixes=[1 / 8, 0.25, 0.6]),
}


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("activation", list(Activation))
@pytest.mark.parametrize("name", list(CFGS))
def test_objective_gradients_equal_the_dense_reference(name, activation, centered):
    cfg = CFGS[name]
    sae = _sae(activation, centered)
    x = torch.randn(64, 16) + 0.3
    step = compute(sae, x, cfg, sae.k)
    sparse = _grads(sae, step.loss)
    dense = _grads(sae, _dense_loss(sae, x, cfg))
    plain = _grads(sae, fvu(x, _dense_topk(sae, x, sae.k)))
    for name_, g in sparse.items():
        torch.testing.assert_close(g, dense[name_], rtol=1e-4, atol=1e-6, msg=name_)
    # the objective is not plain TopK under another name
    assert any(not torch.allclose(g, plain[n], rtol=1e-3, atol=1e-5) for n, g in sparse.items())
    # what is logged and what dead counting reads stay those of the top-k code
    torch.testing.assert_close(step.fvu, fvu(x, _dense_topk(sae, x, sae.k)).detach(), rtol=1e-5, atol=1e-6)
    assert step.out.code.idx_BK.shape == (64, sae.k)


def test_prefix_sizes_are_ascending_and_end_with_every_latent():
    assert prefix_sizes(1024, [0.5, 1 / 16, 1 / 8, 1.0, 0.5]) == [64, 128, 512, 1024]


@pytest.mark.parametrize("name", list(CFGS))
def test_an_objectives_export_loads_and_encodes_with_the_card(name, tmp_path):
    g = torch.Generator().manual_seed(3)
    atoms = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
    x = (torch.rand(2048, 64, generator=g) < 0.05).float() @ atoms + 1.0
    sae = TopKSAE(16, 128, 6)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    cfg = CFGS[name]
    cfg = TrainerConfig(**{**cfg.__dict__, "batch_size": 256, "warmup_steps": 2, "center_input": True})
    batches = Unseekable({0: x[i * 256 : (i + 1) * 256]} for i in range(8))
    before = fvu(x, sae(x).x_hat_BD).item()
    fit({0: sae}, batches, cfg, 8, "cpu", lambda s, m: None, NullBar)
    assert fvu(x, sae(x).x_hat_BD).item() < before
    path = tmp_path / "layer3.sae.pt"
    release.save_tensors(path, sae.to_release())
    loaded = torch.load(path, weights_only=True)  # the card's own loading line
    assert sorted(loaded) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    card = card_get_feature_acts(loaded, x, 6)
    assert torch.equal(card, sae.encode(x))
    torch.testing.assert_close(card @ loaded["W_dec"].T + loaded["b_dec"], sae(x).x_hat_BD, rtol=1e-4, atol=1e-4)
