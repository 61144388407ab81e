"""Duplicate latents: finding near-parallel pairs, counting co-firing, choosing merges, the merge (one
latent takes the pair over, the other is re-seeded on the residual), and a fit that gives planted tilted
copies' feature one latent with no twin (and leaves them tilted without trainer.merge_cos)."""

import copy
import dataclasses

import pytest
import torch

from qscope_train import duplicates
from qscope_train.config import ConfigError, DecoderInit, OptimizerName, TrainerConfig
from qscope_train.data.batches import Unseekable
from qscope_train.optim import averaged_weight
from qscope_train.sae import SparseCode, TopKSAE
from qscope_train.scorecard import twins
from qscope_train.tracking import NullBar
from qscope_train.trainer import fit, new_state, train_steps


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_near_parallel_pairs_are_found_in_chunks_most_parallel_first_and_only_among_live_latents():
    W = _unit([1, 0, 0, 0], [0, 1, 0, 0], [0.95, 0.1, 0, 0], [0, 0, 1, 0], [0, 0.8, 0.6, 0], [0, 0, 0, 1])
    alive = torch.ones(6, dtype=torch.bool)
    for chunk in (1, 2, 2048):
        i, j, c = duplicates.near_parallel_pairs(W, alive, 0.75, chunk=chunk)
        # cos(0, 2) = 0.994, cos(1, 4) = 0.8; (3, 4) at 0.6 is below the bar
        assert (i.tolist(), j.tolist()) == ([0, 1], [2, 4])
        torch.testing.assert_close(c, torch.linalg.vecdot(W[i], W[j]))
    alive[2] = False
    i, j, _ = duplicates.near_parallel_pairs(W, alive, 0.75)
    assert (i.tolist(), j.tolist()) == ([1], [4])
    i, j, c = duplicates.near_parallel_pairs(W, torch.zeros(6, dtype=torch.bool), 0.75)
    assert i.numel() == j.numel() == c.numel() == 0
    # a cluster of 10 directions: each latent keeps its `partners` most parallel later latents
    cluster = torch.nn.functional.normalize(torch.ones(10, 8) + 0.1 * torch.randn(10, 8), dim=1)
    i, j, _ = duplicates.near_parallel_pairs(cluster, torch.ones(10, dtype=torch.bool), 0.5, partners=2)
    assert torch.bincount(i, minlength=10).tolist() == [2] * 8 + [1, 0] and (i < j).all()


def test_firing_counts_count_rows_activations_and_rows_shared():
    idx = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1]])
    # row 1's latent 2 did not fire; row 2's latent 1 fired negative (a plain top-k can): counted, weightless
    vals = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0], [0.5, 0.5]])
    for entries in (1, 3, 1024):  # the pairs are taken a few fired-row entries at a time
        counts = duplicates.firing_counts(SparseCode(vals, idx), torch.tensor([0, 1]), torch.tensor([1, 2]), 3, entries)
        fired, act, sq, both, cross = counts.split([3, 3, 3, 2, 2])
        assert fired.tolist() == [3, 3, 1]
        assert act.tolist() == [4.5, 2.5, 1.0]
        assert sq.tolist() == [10.25, 4.25, 1.0]
        assert both.tolist() == [2, 1]  # (0, 1) on rows 0 and 3; (1, 2) on row 2
        assert cross.tolist() == [2.25, 0.0]  # 1 * 2 + 0.5 * 0.5; the negative value weighs nothing


@pytest.mark.parametrize("d_sae", [300, 50_000])
def test_firing_counts_equal_a_dense_count_for_pairs_in_either_order(d_sae):
    g = torch.Generator().manual_seed(d_sae)
    vals, idx = torch.randn(97, d_sae, generator=g).topk(7, dim=1)
    vals[torch.rand(vals.shape, generator=g) < 0.2] = 0  # picked but not fired
    seen = idx[:40, :2]  # pairs that co-fire, some given high index first; and pairs at random
    i = torch.cat([seen[:, 0], torch.randint(0, d_sae, (60,), generator=g)])
    j = torch.cat([seen[:, 1], torch.randint(0, d_sae, (60,), generator=g)])
    key = torch.minimum(i, j) * d_sae + torch.maximum(i, j)
    first = torch.tensor([n for n, kk in enumerate(key.tolist()) if kk not in key[:n].tolist() and i[n] != j[n]])
    i, j = i[first], j[first]
    fired_BF = torch.zeros(97, d_sae).scatter_(1, idx, (vals != 0).float())
    act_BF = torch.zeros(97, d_sae).scatter_(1, idx, vals.clamp_min(0))
    for entries in (None, 5, 1):
        counts = duplicates.firing_counts(SparseCode(vals, idx), i, j, d_sae, entries)
        both, cross = counts[3 * d_sae :].split([i.numel()] * 2)
        torch.testing.assert_close(both, (fired_BF[:, i] * fired_BF[:, j]).sum(0))
        torch.testing.assert_close(cross, (act_BF[:, i] * act_BF[:, j]).sum(0))
    assert (both > 0).sum() >= 20  # most of the seen pairs really co-fire


def _counts(fired, act, both, sq=None, cross=None, err=None):
    sq = torch.zeros_like(fired) if sq is None else sq
    cross = torch.zeros_like(both) if cross is None else cross
    return torch.cat([fired, act, sq, both, cross, *([] if err is None else [torch.tensor([err])])])


def test_pick_merges_co_firing_pairs_once_each_into_their_activation_weighted_direction():
    W = _unit([1, 0], [0.9, 0.1], [0.8, 0.3], [0, 1])
    i, j = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    c = torch.linalg.vecdot(W[i], W[j])
    fired = torch.tensor([10.0, 20.0, 10.0, 5.0])
    act = torch.tensor([1.0, 3.0, 1.0, 1.0])
    both = torch.tensor([9.0, 9.0, 9.0])  # every pair co-fires; each latent may merge once
    m = duplicates.pick(W, i, j, c, _counts(fired, act, both), cofire=0.5, max_cost=None)
    assert m.frequent_M.tolist() == [1] and m.rare_M.tolist() == [0]  # latent 1 fires more often
    want = torch.nn.functional.normalize(3.0 * W[1] + 1.0 * W[0], dim=0)
    torch.testing.assert_close(m.direction_MD[0], want)
    # a pair that only ever fired at 0 still merges into a unit direction
    zero = duplicates.pick(W, i, j, c, _counts(fired, torch.zeros(4), both), cofire=0.5, max_cost=None)
    torch.testing.assert_close(zero.direction_MD.norm(dim=1), torch.ones(1))
    # split features (near-parallel, but firing on different rows) and rare pairs stay apart below TWIN_COS,
    # and merge from it on (twins: the same direction shown twice, wherever each fires)
    for cos, merges in ((0.9, 0), (0.96, 1)):
        W_split = _unit([1, 0], [cos, (1 - cos**2) ** 0.5], [0, 1], [0, -1])
        c_split = torch.linalg.vecdot(W_split[i], W_split[j])
        for shared, rows in ((4.0, 10.0), (3.0, 3.0)):
            counts = _counts(torch.tensor([rows, rows, 0, 0]), act, torch.tensor([shared, 0, 0]))
            m = duplicates.pick(W_split, i, j, c_split, counts, cofire=0.5, max_cost=None)
            assert m.frequent_M.numel() == merges, (cos, shared, rows)
    # a dense latent (100 rows) that fires on all 10 rows of a rarer one shares a tenth of its own rows:
    # no copy under cofire_frequent 0.25, so the rarer latent is not pulled onto it
    # (at cosine 0.9: a twin merges whatever it shares)
    W = _unit([1, 0], [0.9, 0.19**0.5], [0, 1], [0, -1])
    c = torch.linalg.vecdot(W[i], W[j])
    counts = _counts(torch.tensor([100.0, 10, 0, 0]), act, torch.tensor([10.0, 0, 0]))
    assert duplicates.pick(W, i, j, c, counts, 0.5, cofire_frequent=0.25, max_cost=None).frequent_M.numel() == 0
    assert duplicates.pick(W, i, j, c, counts, 0.5, cofire_frequent=0.1, max_cost=None).frequent_M.tolist() == [0]


def test_merge_cost_is_the_squared_error_the_merge_adds_at_the_best_encoder_scale_and_caps_the_merges():
    g = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    W[1] = torch.nn.functional.normalize(W[0] + 0.5 * W[2], dim=0)  # latent 1 near latent 0
    a = torch.rand(50, 3, generator=g) * (torch.rand(50, 3, generator=g) < 0.6)
    a[:, 0] += 0.1  # latent 0 fires on every row, so it is the more frequent one
    code = SparseCode(a, torch.arange(3).expand(50, 3))
    i, j = torch.tensor([0]), torch.tensor([1])
    c = torch.linalg.vecdot(W[i], W[j])
    counts = duplicates.firing_counts(code, i, j, 3)
    fired, act, sq, both, cross = counts.split([3, 3, 3, 1, 1])
    m = duplicates.pick(W, i, j, c, counts, cofire=0.1, max_cost=None)
    assert m.frequent_M.tolist() == [0] and m.rare_M.tolist() == [1]
    cost, scale = duplicates.merge_cost(c, act[:1], act[1:2], sq[:1], sq[1:2], cross)
    # latent 0 takes the pair's direction with its activations scaled by s; latent 1's output leaves
    before = a[:, :2] @ W[:2]
    best_s = float((a[:, :1] * (before @ m.direction_MD[0])[:, None]).sum() / a[:, 0].square().sum())
    torch.testing.assert_close(scale, torch.tensor([best_s]))
    after = best_s * a[:, :1] * m.direction_MD
    torch.testing.assert_close(cost, (before - after).square().sum()[None])
    assert 1 < best_s < 2
    torch.testing.assert_close(m.scale_M, scale)
    # the cap compares it with the counted rows' squared error (the entry after the counts)
    for err, merges in ((float(cost) * 10.5, 1), (float(cost) * 9.5, 0)):
        with_err = torch.cat([counts, torch.tensor([err])])
        assert duplicates.pick(W, i, j, c, with_err, 0.1, max_cost=0.1).frequent_M.numel() == merges


def test_a_step_keeps_its_code_and_squared_error_for_a_merge_pass_only_when_asked():
    sae = TopKSAE(8, 32, 4)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=64).resolved(10)
    state = new_state(sae, cfg, 10, "cpu")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    train_steps({0: state}, {0: x}, cfg, 0)
    assert state.step_code is None and state.step_err is None and state.step_resid is None
    seen = copy.deepcopy(sae)  # the weights the next step's forward reads (its update comes after)
    train_steps({0: state}, {0: x}, cfg, 1, keep_code=True)
    code, err, resid = duplicates.step_code(seen, x)
    kept, order = state.step_code.idx_BK.sort(1)
    assert torch.equal(kept, code.idx_BK.sort(1).values)
    torch.testing.assert_close(state.step_code.vals_BK.gather(1, order), code.vals_BK.gather(1, code.idx_BK.argsort(1)))
    torch.testing.assert_close(state.step_err, err)
    torch.testing.assert_close(state.step_resid, resid)
    assert not state.step_code.vals_BK.requires_grad and not state.step_resid.requires_grad
    train_steps({0: state}, {0: x}, cfg, 2)  # a later step without a pass drops them
    assert state.step_code is None and state.step_err is None and state.step_resid is None


@pytest.mark.parametrize("optimizer", list(OptimizerName))
def test_merge_gives_one_latent_the_pair_and_reseeds_the_other_on_the_residual_in_the_exported_weights(optimizer):
    sae = TopKSAE(4, 8, 2)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=64, dead_after_tokens=640, merge_cos=0.9, optimizer=optimizer).resolved(10)
    state = new_state(sae, cfg, 10, "cpu")
    x = torch.randn(64, 4)
    train_steps({0: state}, {0: x}, cfg, 0)  # the schedule-free z buffers now differ from the parameters
    with torch.no_grad():  # latent 1: a copy of latent 0, tilted a little, firing on the same rows
        sae.W_dec_FD[1] = torch.nn.functional.normalize(sae.W_dec_FD[0] + 0.2 * sae.W_dec_FD[2], dim=0)
        sae.W_enc[1] = sae.W_enc[0]
        sae.b_enc[1] = sae.b_enc[0] + 1e-3
    x = torch.randn(256, 4) @ torch.diag(torch.tensor([3.0, 1, 1, 1]))
    code = sae.encode_sparse(x)
    assert ((code.idx_BK == 0).any(1) & (code.idx_BK == 1).any(1)).sum() >= 4
    W_enc_before, b_enc_before = sae.W_enc.detach().clone(), sae.b_enc.detach().clone()
    enc_avg_before = averaged_weight(state.opt, sae.W_enc)
    others_before = averaged_weight(state.opt, sae.W_dec_FD)[2:]
    state.since_fired_F[1] = 500
    d0, d1 = (torch.nn.functional.normalize(sae.W_dec_FD[i].detach(), dim=0) for i in (0, 1))
    code, err, resid = duplicates.step_code(sae, x)
    # a merge that would cost anything is refused (the cap compares with err)
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, err * 1e-9, resid, cfg) == 0
    with torch.no_grad():
        pairs = duplicates.near_parallel_pairs(sae.W_dec_FD, torch.ones(8, dtype=torch.bool), 0.9)
        counts = duplicates.firing_counts(code, torch.tensor([0]), torch.tensor([1]), 8)
        pick = duplicates.pick(sae.W_dec_FD, *pairs, torch.cat([counts, err[None]]))
    keep, rare = int(pick.frequent_M[0]), int(pick.rare_M[0])
    assert {keep, rare} == {0, 1}
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, err, resid, cfg, seed=3) == 1
    W_avg, enc_avg = averaged_weight(state.opt, sae.W_dec_FD), averaged_weight(state.opt, sae.W_enc)
    # the kept latent: the pair's direction (between the two) and its encoder scaled, in y, z and the average x
    torch.testing.assert_close(sae.W_dec_FD[keep].detach(), pick.direction_MD[0])
    torch.testing.assert_close(W_avg[keep], pick.direction_MD[0])
    assert float(pick.direction_MD[0] @ d0) > float(d0 @ d1) and float(pick.direction_MD[0] @ d1) > float(d0 @ d1)
    s = float(pick.scale_M[0])
    torch.testing.assert_close(sae.W_enc[keep].detach(), s * W_enc_before[keep])
    torch.testing.assert_close(enc_avg[keep], s * W_enc_before[keep])
    torch.testing.assert_close(sae.b_enc[keep].detach(), s * b_enc_before[keep])
    # the other: the step's re-seed direction, its encoder that direction at RESEED_ENCODER of the live
    # norm, counted as dead so that AuxK trains it
    seed_dir = sae.W_dec_FD[rare].detach()
    torch.testing.assert_close(seed_dir, _reseed(resid, 1, seed=3)[0])
    torch.testing.assert_close(W_avg[rare], seed_dir)
    live_norm = W_enc_before.norm(dim=1).mean()  # every latent was live
    torch.testing.assert_close(enc_avg[rare], seed_dir * live_norm * duplicates.RESEED_ENCODER)
    assert float(sae.b_enc[rare]) == 0 and int(state.since_fired_F[rare]) == cfg.dead_after_tokens
    # nothing else changed
    torch.testing.assert_close(W_avg[2:], others_before)
    torch.testing.assert_close(enc_avg[2:], enc_avg_before[2:])
    if optimizer is OptimizerName.adam:  # the rewritten rows' moments restart
        moments = state.opt.state[sae.W_dec_FD]
        assert not moments["exp_avg"][[0, 1]].any() and not moments["exp_avg_sq"][[0, 1]].any()
        assert moments["exp_avg_sq"].any()


def test_a_twins_only_pass_leaves_a_co_firing_copy_and_merges_a_twin():
    sae = TopKSAE(4, 8, 2)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=64, dead_after_tokens=640, merge_cos=0.5).resolved(10)
    state = new_state(sae, cfg, 10, "cpu")
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1)) @ torch.diag(torch.tensor([3.0, 1, 1, 1]))

    def tilt_latent_1(t):  # latent 1 at cosine 1 / sqrt(1 + t^2) to latent 0, firing on the same rows
        with torch.no_grad():
            d0 = sae.W_dec_FD[0] / sae.W_dec_FD[0].norm()
            u = sae.W_dec_FD[2] - (sae.W_dec_FD[2] @ d0) * d0
            sae.W_dec_FD[1] = torch.nn.functional.normalize(d0 + t * u / u.norm(), dim=0)
            sae.W_enc[1], sae.b_enc[1] = sae.W_enc[0], sae.b_enc[0] + 1e-3
        return duplicates.step_code(sae, x)

    code, err, resid = tilt_latent_1(0.5)  # cosine 0.89: a copy, not a twin
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, err, resid, cfg, only_twins=True) == 0
    assert all(torch.equal(p, before[n]) for n, p in sae.named_parameters())
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, err, resid, cfg) >= 1  # a full pass would
    state.since_fired_F[:2] = 0  # the pair under test is live (the full pass may have re-seeded either)
    code, err, resid = tilt_latent_1(0.1)  # cosine 0.995: a twin
    pair_before = sae.W_dec_FD[:2].detach().clone()
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, err, resid, cfg, only_twins=True) >= 1
    assert float(sae.W_dec_FD[0] @ sae.W_dec_FD[1]) < 0.95 and not torch.equal(sae.W_dec_FD[:2], pair_before)


def _tilted_copy(tilt=0.5):
    """An SAE (8 x 64, k 4) whose latent 1 is a copy of latent 0 at cosine 1 / sqrt(1 + tilt^2) (0.89),
    firing on the same rows; its state, a step's (code, residuals) and the merge_cost of that pair."""
    sae = TopKSAE(8, 64, 4)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=64, dead_after_tokens=640, merge_cos=0.85).resolved(10)
    state = new_state(sae, cfg, 10, "cpu")
    with torch.no_grad():
        d0 = sae.W_dec_FD[0] / sae.W_dec_FD[0].norm()
        u = sae.W_dec_FD[2] - (sae.W_dec_FD[2] @ d0) * d0
        sae.W_dec_FD[1] = torch.nn.functional.normalize(d0 + tilt * u / u.norm(), dim=0)
        sae.W_enc[1], sae.b_enc[1] = sae.W_enc[0], sae.b_enc[0] + 1e-3
    code, _, resid = duplicates.step_code(sae, torch.randn(512, 8, generator=torch.Generator().manual_seed(1)))
    i, j, c = duplicates.near_parallel_pairs(sae.W_dec_FD, torch.ones(64, dtype=torch.bool), 0.85)
    p = [n for n, pair in enumerate(zip(i.tolist(), j.tolist(), strict=True)) if set(pair) == {0, 1}][0]
    fired, act, sq, both, cross = duplicates.firing_counts(code, i, j, 64).split([64] * 3 + [i.numel()] * 2)
    assert both[p] >= duplicates.MIN_ROWS
    a, b = (0, 1) if fired[0] >= fired[1] else (1, 0)
    cost, _ = duplicates.merge_cost(c[p], act[a] + 1e-12, act[b] + 1e-12, sq[a], sq[b], cross[p])
    assert cost > 0
    return sae, state, cfg, code, resid, cost


def test_a_cheap_pass_takes_a_copy_only_if_it_costs_at_most_one_live_latents_share_of_the_error():
    sae, state, cfg, code, resid, cost = _tilted_copy()
    pair_before = sae.W_dec_FD[:2].detach().clone()
    # the merge costs 5 % of the error: more than one of 64 live latents' share, so a cheap pass refuses it
    duplicates.merge_(sae, state.opt, state.since_fired_F, code, cost / 0.05, resid, cfg, cheap=True)
    assert torch.equal(sae.W_dec_FD[:2], pair_before)
    # at 1 % of the error a cheap pass takes it
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, cost / 0.01, resid, cfg, cheap=True) >= 1
    assert not torch.equal(sae.W_dec_FD[:2], pair_before)


def test_a_cheap_pass_still_merges_a_twin_that_costs_more_than_a_live_latents_share():
    sae, state, cfg, code, resid, cost = _tilted_copy(tilt=0.1)  # cosine 0.995
    pair_before = sae.W_dec_FD[:2].detach().clone()
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, cost / 0.05, resid, cfg, cheap=True) >= 1
    assert not torch.equal(sae.W_dec_FD[:2], pair_before)


def test_a_full_pass_takes_the_copy_a_cheap_pass_refuses():
    sae, state, cfg, code, resid, cost = _tilted_copy()
    pair_before = sae.W_dec_FD[:2].detach().clone()
    assert duplicates.merge_(sae, state.opt, state.since_fired_F, code, cost / 0.05, resid, cfg) >= 1
    assert not torch.equal(sae.W_dec_FD[:2], pair_before)


def test_fit_hands_each_pass_what_it_may_merge(monkeypatch):
    calls = []

    def record(*args, **kwargs):
        # args: sae, opt, since_fired, code, err, resid, cfg, seed, only_twins, search, cheap
        calls.append((args[8], args[10]))
        return 0

    monkeypatch.setattr(duplicates, "merge_", record)
    cfg = TrainerConfig(
        batch_size=100, dead_after_tokens=500, merge_cos=0.5, merge_every_tokens=300, checkpoint_every=0
    )
    batches = [{0: torch.randn(100, 8, generator=torch.Generator().manual_seed(s))} for s in range(80)]
    sae = TopKSAE(8, 32, 4)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    fit({0: sae}, Unseekable(batches), cfg, 80, "cpu", lambda *_: None, NullBar)
    resolved = cfg.resolved(80)
    passes = [s for s in range(80) if duplicates.merge_step(s, resolved, 80)]
    assert calls == [(duplicates.twins_only(s, resolved, 80), duplicates.cheap_only(s, resolved, 80)) for s in passes]
    assert set(calls) == {(False, False), (False, True), (True, True)}


def _reseed(resid, m, seed):
    """The directions merge_ gives m re-seeded latents when no live latent is near them."""
    return duplicates.shift_to_shared(*duplicates.residual_rows(resid, m, seed))


def test_reseed_directions_start_at_the_rows_holding_the_error_and_move_to_what_their_neighbours_share():
    g = torch.Generator().manual_seed(0)
    resid = torch.randn(100, 6, generator=g)
    resid[:, :3] = 0  # the other rows lie in the last three axes, far from the three rows below
    # three rows hold almost all the squared error, each nearly along one of the first three axes
    resid[:3] = torch.nn.functional.normalize(torch.eye(6)[:3] + 0.01 * torch.randn(3, 6, generator=g), dim=1) * 100
    dirs = _reseed(resid, 3, seed=1)
    unit = torch.nn.functional.normalize(resid, dim=1)
    which = (dirs @ unit.T).argmax(1)
    assert sorted(which.tolist()) == [0, 1, 2]
    torch.testing.assert_close(dirs, unit[which])  # no other candidate near them: they stay
    assert torch.equal(dirs, _reseed(resid, 3, seed=1))  # the seed decides
    assert _reseed(torch.zeros(5, 6), 3, seed=1).shape == (0, 6)  # nothing to re-seed on


def _copies_fit(merge_cos):
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=-1)
    batches = []
    for _ in range(12):
        freq = torch.tensor([0.4] * 4 + [0.1] * 20)  # the copied directions fire often
        codes = torch.rand(256, 24, generator=g) * (torch.rand(256, 24, generator=g) < freq)
        batches.append({0: codes @ atoms + 0.2})
    sae = TopKSAE(16, 64, 4)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    cfg = TrainerConfig(
        batch_size=256,
        decoder_init=DecoderInit.random,
        merge_cos=merge_cos,
        merge_every_tokens=1024,
        checkpoint_every=0,
    )
    with torch.no_grad():  # latents 0-3 and 4-7 both hold the first four true directions, tilted apart
        tilt = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
        for copies, sign in ((slice(0, 4), 1), (slice(4, 8), -1)):
            sae.W_dec_FD[copies] = torch.nn.functional.normalize(atoms[:4] + sign * 0.4 * tilt, dim=-1)
            sae.W_enc[copies] = sae.W_dec_FD[copies]
    logs = []
    summary = fit({0: sae}, Unseekable(batches), cfg, 12, "cpu", lambda s, m: logs.append(m), NullBar, init_b_dec=False)
    assert logs[-1][0]["merged"] == summary[0]["duplicates_merged"]  # the log lines count them too
    unit = torch.nn.functional.normalize(sae.W_dec_FD, dim=1)
    live = sae.encode_sparse(torch.cat([b[0] for b in batches])).fire_counts(64) > 0
    twin_frac = twins(sae.W_dec_FD, live)["twin_frac"]
    return summary[0]["duplicates_merged"], torch.linalg.vecdot(unit[:4], unit[4:8]), unit @ atoms[:4].T, twin_frac


def test_a_fit_gives_planted_tilted_copies_feature_one_latent_without_twins_and_leaves_them_without_merging():
    merged, _, to_atoms, twin_frac = _copies_fit(0.5)
    best = to_atoms.max(0).values  # each true direction's best column
    assert merged >= 4 and (best > 0.93).all() and twin_frac == 0, (best, twin_frac)
    merged, cos, to_atoms, twin_frac = _copies_fit(None)
    best = to_atoms.max(0).values
    assert merged == 0 and (cos < 0.8).all() and (best < 0.93).all(), (cos, best)


@pytest.mark.parametrize(
    "bad",
    [
        {"merge_cos": 1.0},
        {"merge_cos": 0.0},
        {"merge_every_tokens": 0},
    ],
)
def test_merge_settings_out_of_range_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainerConfig(**bad)


def test_merge_passes_start_after_the_first_dead_window_and_take_only_twins_at_the_runs_end():
    cfg = TrainerConfig(batch_size=100, dead_after_tokens=500, merge_cos=0.5, merge_every_tokens=300).resolved(80)
    # every third step, from the fifth step's end on (500 tokens)
    passes = [s for s in range(80) if duplicates.merge_step(s, cfg, 80)]
    assert passes == list(range(5, 80, 3))
    assert not any(duplicates.merge_step(s, dataclasses.replace(cfg, merge_cos=None), 80) for s in range(80))
    # those that end past the run's first three quarters (60 steps of 80) merge twins only
    assert [s for s in passes if duplicates.twins_only(s, cfg, 80)] == [62, 65, 68, 71, 74, 77]
    # between the first half (40 steps) and three quarters, only cheap copy merges
    cheap = [s for s in passes if duplicates.cheap_only(s, cfg, 80) and not duplicates.twins_only(s, cfg, 80)]
    assert cheap == [41, 44, 47, 50, 53, 56, 59]
    # a window of 1,800 tokens: the last four windows (72 steps) take twins only, from the eighth step on
    long = dataclasses.replace(cfg, dead_after_tokens=1800)
    passes = [s for s in range(80) if duplicates.merge_step(s, long, 80)]
    assert passes[:2] == [17, 20]
    assert [s for s in passes if not duplicates.twins_only(s, long, 80)] == []
    long = dataclasses.replace(cfg, dead_after_tokens=1500)  # 60 steps: copies until the 20th step's end
    assert [s for s in range(80) if not duplicates.twins_only(s, long, 80)] == list(range(20))


@pytest.mark.parametrize("window", [1, 99, 100, 101, 1000, 2500, 3900, 4100])
@pytest.mark.parametrize("every", [None, 100, 250, 300])
def test_first_merge_step_is_the_first_step_merge_step_takes(window, every):
    cfg = TrainerConfig(batch_size=100, dead_after_tokens=window, merge_every_tokens=every).resolved(40)
    taken = [s for s in range(40) if duplicates.merge_step(s, cfg, 40)]
    assert duplicates.first_merge_step(cfg, 40) == (taken[0] if taken else None)


def test_a_fit_whose_dead_window_leaves_no_merge_pass_says_so(capsys):
    sae = TopKSAE(4, 16, 2)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    batches = [{0: torch.randn(32, 4)} for _ in range(8)]
    # the first window ends after the run
    cfg = TrainerConfig(batch_size=32, dead_after_tokens=9 * 32, checkpoint_every=0)
    fit({0: sae}, Unseekable(batches), cfg, 8, "cpu", lambda *_: None, NullBar)
    assert "no duplicate-merge pass fits this run" in capsys.readouterr().out
    fit(
        {0: sae},
        Unseekable(batches),
        dataclasses.replace(cfg, dead_after_tokens=3 * 32),
        8,
        "cpu",
        lambda *_: None,
        NullBar,
    )
    assert "no duplicate-merge pass" not in capsys.readouterr().out


def test_a_reseed_direction_moves_from_one_rows_mixture_to_the_feature_its_neighbours_share():
    """Rows each hold a shared feature f plus a different other feature; a seed at one row (f mixed with
    that row's other feature) ends nearer f than it started, and a seed with no neighbour stays."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    f, others = basis[0], basis[1:21]
    rows = f + 0.8 * others  # 20 rows: f plus one other feature each, at cosine 0.78 to f
    lone = basis[25:26] * 2.0  # a row near nothing else
    seeds = torch.nn.functional.normalize(torch.cat([rows[:1], lone]), dim=1)
    shifted = duplicates.shift_to_shared(seeds, torch.cat([rows, lone]))
    assert float(seeds[0] @ f) < 0.8 and float(shifted[0] @ f) > 0.98
    torch.testing.assert_close(shifted[1], seeds[1])
    torch.testing.assert_close(shifted.norm(dim=1), torch.ones(2))
    # two seeds from rows that share f would both end at it: the second stays at its own row
    seeds = torch.nn.functional.normalize(rows[:2], dim=1)
    shifted = duplicates.shift_to_shared(seeds, rows)
    assert float(shifted[0] @ f) > 0.98
    torch.testing.assert_close(shifted[1], seeds[1])
