import pytest
import torch
from conftest import card_get_feature_acts, random_release

from qscope_train import sparse as sparse_module
from qscope_train.config import Activation
from qscope_train.losses import fvu
from qscope_train.sae import TopKSAE
from qscope_train.sparse import LatentMajor, sampled_dots


@pytest.mark.parametrize("activation", [Activation.topk, Activation.relu_topk])
def test_encode_equals_the_card_on_random_inputs(activation):
    tensors = random_release(d_model=32, d_sae=256)
    sae = TopKSAE.from_release(tensors, k=20, activation=activation)
    x = torch.randn(300, 32) * 3
    ours = sae.encode(x)
    card = card_get_feature_acts(tensors, x, 20, relu=activation is Activation.relu_topk)
    assert torch.equal(ours, card)
    assert (ours != 0).sum(-1).max() <= 20


def test_relu_variant_differs_from_plain_topk_when_pre_acts_are_negative():
    tensors = random_release(d_model=8, d_sae=64)
    tensors["b_enc"] -= 100.0  # every pre-activation negative
    x = torch.randn(10, 8)
    plain = TopKSAE.from_release(tensors, 4, Activation.topk).encode(x)
    relu = TopKSAE.from_release(tensors, 4, Activation.relu_topk).encode(x)
    assert (plain < 0).sum(-1).eq(4).all()
    assert torch.equal(relu, torch.zeros_like(relu))


def test_release_module_release_round_trip_is_exact():
    tensors = random_release()
    back = TopKSAE.from_release(tensors, k=8).to_release()
    assert list(back) == ["W_enc", "W_dec", "b_enc", "b_dec"]
    for key in tensors:
        assert torch.equal(back[key], tensors[key])


def test_decoder_is_stored_as_rows_and_released_as_columns():
    tensors = random_release(d_model=8, d_sae=32)
    sae = TopKSAE.from_release(tensors, k=4)
    assert sae.W_dec_FD.shape == (32, 8) and sae.W_dec_FD.is_contiguous()
    assert torch.equal(sae.W_dec, tensors["W_dec"])
    assert sae.to_release()["W_dec"].is_contiguous()


def test_a_centred_encoder_exports_the_same_features_for_the_card():
    tensors = random_release(d_model=32, d_sae=256)
    tensors["b_dec"] = torch.randn(32) * 3  # a large offset, so a missing fold would change the top-k
    sae = TopKSAE.from_release(tensors, k=20)
    x = torch.randn(200, 32) * 3 + tensors["b_dec"]
    sae.center_input_(True)  # the encoder now reads x - b_dec; b_enc is rewritten to keep its output
    assert not torch.equal(sae.b_enc, tensors["b_enc"])
    with torch.no_grad():  # train a little in the centred form: moving b_dec now moves the encoder too
        sae.b_dec.add_(0.5)
        sae.W_enc.mul_(1.1)
    exported = sae.to_release()
    card = card_get_feature_acts(exported, x, 20, relu=False)
    torch.testing.assert_close(card, sae.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x).x_hat_BD, sae.decode(card), rtol=1e-4, atol=1e-4)
    sae.center_input_(False)
    for key in tensors:
        torch.testing.assert_close(sae.to_release()[key], exported[key])


def test_sparse_decode_matches_dense_decode():
    sae = TopKSAE(16, 128, 10)
    x = torch.randn(50, 16)
    dense = sae.decode(sae.encode(x))
    torch.testing.assert_close(sae(x).x_hat_BD, dense, rtol=1e-5, atol=1e-5)


def test_init_gives_unit_norm_decoder_and_tied_encoder():
    sae = TopKSAE(16, 128, 10)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(128))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    sae.init_weights_(encoder_norm=0.5)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(128))
    torch.testing.assert_close(sae.W_enc, 0.5 * sae.W_dec.T)


def test_parallel_gradient_removal_and_renorm():
    sae = TopKSAE(16, 128, 10)
    x = torch.randn(64, 16)
    fvu(x, sae(x).x_hat_BD).backward()
    sae.remove_parallel_grad_()
    along = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(1)
    assert along.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec_FD.mul_(3.0)
    sae.unit_norm_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(128))


def test_fvu_is_one_for_the_mean_and_zero_for_perfect():
    x = torch.randn(100, 8)
    assert fvu(x, x).item() == 0
    torch.testing.assert_close(fvu(x, x.mean(0, keepdim=True).expand_as(x)), torch.tensor(1.0))


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k must be in 1..d_sae"):
        TopKSAE(8, 16, 17)


def test_latent_major_pieces_match_their_dense_forms():
    """LatentMajor's weighted row sums and dot products (internal op and public fallback) against dense
    algebra, with many latents chosen by no row (empty runs)."""
    torch.manual_seed(0)
    B, M, F, D = 50, 7, 300, 12
    idx = torch.randn(B, F).topk(M, dim=-1).indices
    w, y, W = torch.randn(B, M), torch.randn(B, D), torch.randn(F, D)
    pairs = LatentMajor(idx, F)
    S = torch.zeros(F, B).index_put_((idx.reshape(-1), torch.arange(B).repeat_interleave(M)), w.reshape(-1))
    torch.testing.assert_close(pairs.weighted_rows(w, y), S @ y)
    want = (W[idx] * y[:, None, :]).sum(-1)
    assert sparse_module.per_sample_backward() is not None  # the pinned torch has the fast op: it is what runs
    torch.testing.assert_close(pairs.dots(y, W), want)
    torch.testing.assert_close(sampled_dots(idx, y, W, F), want)


def test_latent_major_groups_pairs_by_latent_with_rows_in_order():
    """The regrouping (a stable sort of int32 keys) lists each latent's pairs in row order and marks where
    each latent's run starts; a latent nobody picked has an empty run."""
    torch.manual_seed(5)
    F, M = 300, 7
    idx = torch.randint(0, F - 1, (4096, M))  # latent F - 1 is never picked
    order, rows, latents, offsets = LatentMajor(idx, F)._build()
    flat = idx.reshape(-1)
    assert torch.equal(order, torch.sort(flat, stable=True).indices)
    assert torch.equal(latents, flat[order]) and torch.equal(rows, order // M)
    assert torch.equal(
        offsets, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(flat, minlength=F).cumsum(0)[:-1]])
    )
