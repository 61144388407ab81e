from itertools import islice

import pytest
import torch
from conftest import random_release

from qscope_train.config import Activation, DataConfig, ModelConfig
from qscope_train.data.activations import make_filter
from qscope_train.data.tokens import batched, load_text_dataset, token_stream
from qscope_train.lm import load_lm, run_captured
from qscope_train.sae import TopKSAE
from qscope_train.splice import downstream_metrics, final_hidden, logits, sae_replace


@pytest.fixture(scope="module")
def setup(fixtures_dir):
    lm = load_lm(ModelConfig(name_or_path=str(fixtures_dir / "tiny-qwen3")))
    data = DataConfig(dataset=str(fixtures_dir / "corpus.jsonl"), context_len=64)
    seqs = list(islice(token_stream(load_text_dataset(data), lm.tokenizer, data), 12))
    return lm, data, seqs


def perfect_sae(d_model: int) -> TopKSAE:
    """relu(x) - relu(-x) = x: latents [x, -x] with k = d_model reconstruct every input exactly."""
    eye = torch.eye(d_model)
    tensors = {
        "W_enc": torch.cat([eye, -eye]),
        "W_dec": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * d_model),
        "b_dec": torch.zeros(d_model),
    }
    return TopKSAE.from_release(tensors, d_model, Activation.relu_topk)


def random_sae(d_model: int, seed: int = 0) -> TopKSAE:
    """Independent random encoder and unit-norm decoder: a reconstruction unrelated to the input."""
    t = random_release(d_model=d_model, d_sae=1024, seed=seed)
    t["W_dec"] /= t["W_dec"].norm(dim=0, keepdim=True)
    return TopKSAE.from_release(t, 16)


def test_perfect_reconstruction_costs_nothing_and_a_random_sae_costs_a_lot(setup):
    lm, data, seqs = setup
    x = torch.randn(100, lm.d_model)
    torch.testing.assert_close(perfect_sae(lm.d_model)(x).x_hat_BD, x, rtol=0, atol=1e-6)
    sets = {"perfect": {1: perfect_sae(lm.d_model)}, "random": {1: random_sae(lm.d_model)}}
    out = downstream_metrics(lm, sets, seqs, make_filter(lm, data), 4, "cpu")
    perfect, rand = out["perfect"][1], out["random"][1]
    print(perfect, rand, sep="\n")
    assert abs(perfect["delta_ce"]) < 1e-5 and perfect["kl"] < 1e-6
    assert perfect["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["ce_zero_ablated"] > perfect["ce_clean"] + 0.5  # the layer matters to this model
    assert rand["delta_ce"] > 0.5 and rand["kl"] > 0.1
    assert rand["ce_recovered"] < 0.5
    assert rand["ce_clean"] == perfect["ce_clean"] and rand["ce_zero_ablated"] == perfect["ce_zero_ablated"]
    assert perfect["n_scored_tokens"] == sum(int(s.attention_mask[1:].sum()) for s in seqs)


def test_the_last_layer_splice_equals_a_manual_forward(setup):
    lm, data, seqs = setup
    ids, attn = next(batched(seqs, 4))
    last = len(lm.layers) - 1
    mask = make_filter(lm, data).token_mask(ids, attn)[0]
    assert not mask.all() and mask.any()  # position 0 (and any special token) keeps its clean value

    def replace(h):
        return 0.5 * h + 1.0

    got = logits(lm, ids, attn, last, replace, mask)
    h = run_captured(lm, [last], ids, attn.long())[last]
    stream = torch.where(mask.unsqueeze(-1), replace(h), h)
    with torch.no_grad():
        want = lm.model.lm_head(lm.model.model.norm(stream))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(lm, ids, attn), atol=1e-3)
    # what the spliced loss scores: the final norm's output, the head applied in chunks afterwards
    with torch.no_grad():
        torch.testing.assert_close(final_hidden(lm, ids, attn, last, replace, mask), lm.model.model.norm(stream))


def test_the_next_layer_receives_the_reconstruction(setup):
    lm, data, seqs = setup
    ids, attn = next(batched(seqs, 4))
    sae = random_sae(lm.d_model, seed=3)
    mask = make_filter(lm, data).token_mask(ids, attn)[0]
    seen = {}

    def grab(_module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = lm.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits(lm, ids, attn, 1, sae_replace(sae), mask)
    finally:
        handle.remove()
    h1 = run_captured(lm, [1], ids, attn.long())[1]
    with torch.no_grad():
        recon = sae(h1.reshape(-1, lm.d_model)).x_hat_BD.view_as(h1)
    torch.testing.assert_close(seen["h"], torch.where(mask.unsqueeze(-1), recon, h1))
    assert not torch.allclose(seen["h"], h1)


def test_one_clean_forward_per_batch_and_set_and_one_forward_per_layer_and_run(setup):
    lm, data, seqs = setup
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    sets = {"a": {1: random_sae(lm.d_model, 1), 2: random_sae(lm.d_model, 2)}, "b": {1: random_sae(lm.d_model, 3)}}
    try:
        downstream_metrics(lm, sets, seqs, make_filter(lm, data), 4, "cpu")
    finally:
        handle.remove()
    batches = 3  # 12 sequences, 4 per batch
    # per batch: a clean forward in each set's pass (2) + layer 1 (zero + a + b) + layer 2 (zero + a)
    assert len(calls) == batches * (2 + 3 + 2)
