import copy
import math

import pytest
import torch
from conftest import ListSource

from qscope_train import losses, screen
from qscope_train import sparse as sparse_module
from qscope_train.config import Activation, DecoderInit, OptimizerName, TrainerConfig
from qscope_train.data.batches import Unseekable
from qscope_train.losses import fvu
from qscope_train.objectives import auxk_loss
from qscope_train.optim import default_lr, lr_factor
from qscope_train.sae import TopKSAE
from qscope_train.tracking import NullBar
from qscope_train.trainer import NonFiniteLossError, fit


def _encoder_input(sae: TopKSAE, x):
    return x - sae.b_dec if sae.centered else x


def _dense_reference(sae: TopKSAE, x):
    """Autograd through the dense form: scatter the top-k into zeros, then z @ W_dec.T + b_dec."""
    pre = _encoder_input(sae, x) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    return z @ sae.W_dec.T + sae.b_dec


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("dots", ["latent-major", "sampled_addmm"])
def test_sparse_path_gradients_equal_the_dense_reference_for_every_parameter(dots, centered, monkeypatch):
    if dots == "sampled_addmm":  # the public fallback where torch lacks the internal op
        monkeypatch.setattr(sparse_module, "per_sample_backward", lambda: None)
    torch.manual_seed(0)
    sae = TopKSAE(16, 128, 8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 1.0)
    sae.centered = centered  # the encoder reads x - b_dec (trainer.center_input)
    x = torch.randn(64, 16)
    fvu(x, sae(x).x_hat_BD).backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    fvu(x, _dense_reference(sae, x)).backward()
    for name, p in sae.named_parameters():
        assert sparse[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _dense_loss_with_auxk(sae: TopKSAE, x, dead, k_aux, coef):
    """FVU + coef * AuxK written densely, for autograd to differentiate. AuxK reads the even rows only, and
    its encoder reads x - b_dec with b_dec held constant: its gradient stays on the dead latents' own
    parameters."""
    pre = _encoder_input(sae, x) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    x_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec.T + sae.b_dec
    loss = fvu(x, x_hat)
    x, x_hat = x[0::2], x_hat[0::2]
    e = (x - x_hat).detach()
    x_in = x - sae.b_dec.detach() if sae.centered else x
    pre = x_in @ sae.W_enc.T + sae.b_enc
    aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals) @ sae.W_dec.T
    return loss + coef * fvu(e, e_hat)


def _sae_with_dead(seed=0, n_dead=40, activation=Activation.topk):
    torch.manual_seed(seed)
    sae = TopKSAE(16, 128, 8, activation)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    return sae, dead


# auxk_loss selects dead latents from gathered columns on a CPU (some latents dead), from masked ones on a
# device (CPU_READS off emulates it), and masked with every latent dead
DEAD_COUNTS = [10, 40, 128]


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("dots", ["latent-major", "sampled_addmm"])
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("n_dead", DEAD_COUNTS)
def test_auxk_gradients_equal_the_dense_reference_for_every_parameter(n_dead, gather, dots, centered, monkeypatch):
    monkeypatch.setattr(losses, "CPU_READS", gather)
    # AuxK values dead latents outside the screen's candidates at bf16 accuracy (screen.py); the fp32 GEMM here
    monkeypatch.setattr(screen, "applies", lambda *a: False)
    if dots == "sampled_addmm":
        monkeypatch.setattr(sparse_module, "per_sample_backward", lambda: None)
    sae, dead = _sae_with_dead(n_dead=n_dead)
    sae.centered = centered
    x = torch.randn(64, 16)
    out = sae(x)
    (fvu(x, out.x_hat_BD) + 0.25 * auxk_loss(sae, x, out, dead, 6)).backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    _dense_loss_with_auxk(sae, x, dead, 6, 0.25).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("activation", list(Activation))
@pytest.mark.parametrize("n_dead", DEAD_COUNTS)
def test_auxk_alone_trains_the_encoder_and_decoder_of_dead_latents(n_dead, activation, centered):
    """AuxK moves only the dead latents' own rows: never a live latent and never b_dec (with a centred
    encoder its gradient would reach b_dec through x - b_dec; on real activations that cost FVU)."""
    sae, dead = _sae_with_dead(1, n_dead, activation)
    sae.centered = centered
    x = torch.randn(64, 16)
    out = sae(x)
    auxk_loss(sae, x, out, dead, 12).backward()
    for name in ("W_enc", "b_enc", "W_dec_FD"):
        g = getattr(sae, name).grad
        rows = g.abs().reshape(128, -1).sum(1)
        assert rows[dead].sum() > 0, f"AuxK sent no gradient to {name}"
        assert rows[~dead].sum() == 0, f"AuxK touched live latents in {name}"
    assert sae.b_dec.grad is None or sae.b_dec.grad.abs().sum() == 0


def _sparse_data(n=4096, d=32, atoms=256, active=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=-1)
    idx = torch.randint(0, atoms, (n, active), generator=g)
    coef = torch.rand(n, active, generator=g) * 3
    return (coef.unsqueeze(-1) * D[idx]).sum(1) + 0.5


def _batches(x, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Unseekable({0: x[torch.randint(0, x.shape[0], (batch,), generator=g)]} for _ in iter(int, 1))


def test_fifty_steps_lower_fvu_and_keep_decoder_columns_unit_norm():
    x = _sparse_data()
    sae = TopKSAE(32, 256, 8)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    before = fvu(x, sae(x).x_hat_BD).item()
    logs = []
    cfg = TrainerConfig(batch_size=256, optimizer=OptimizerName.adam, lr=3e-3, warmup_steps=5, log_every=10)
    summary = fit({0: sae}, _batches(x, 256), cfg, 50, "cpu", lambda s, m: logs.append((s, m)), NullBar)
    after = fvu(x, sae(x).x_hat_BD).item()
    assert after < 0.5 * before, (before, after)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(256))
    assert summary[0]["tokens_trained"] == 50 * 256 and summary[0]["steps"] == 50
    assert [s for s, _ in logs] == [0, 10, 20, 30, 40, 49]
    assert logs[-1][1][0]["lr"] == pytest.approx(3e-3 * lr_factor(49, 50, 5, 0.2))


def test_latents_that_never_fire_are_counted_dead():
    x = _sparse_data()
    sae = TopKSAE(32, 256, 8)
    with torch.no_grad():
        sae.b_enc[:64] = -1e4  # these can never be among the top 8
    cfg = TrainerConfig(batch_size=256, lr=1e-3, warmup_steps=0, dead_after_tokens=2048, log_every=100, auxk_coef=0)
    summary = fit({0: sae}, _batches(x, 256), cfg, 20, "cpu", lambda s, m: None, NullBar)
    assert 64 / 256 <= summary[0]["dead_frac"] < 0.6  # the 64 blocked ones, not everything


def test_non_finite_loss_stops_with_layer_and_step():
    sae = TopKSAE(8, 32, 4)
    bad = Unseekable([{3: torch.randn(16, 8)}, {3: torch.full((16, 8), float("nan"))}])
    with pytest.raises(NonFiniteLossError, match="layer 3, step 1: loss is nan"):
        fit({3: sae}, bad, TrainerConfig(batch_size=16, warmup_steps=0), 2, "cpu", lambda s, m: None, NullBar)


def test_learning_rate_schedule_and_default():
    assert default_lr(16384, OptimizerName.adam) == pytest.approx(2e-4)
    assert default_lr(32768, OptimizerName.adam) == pytest.approx(2e-4 / math.sqrt(2))
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)


def test_k_anneals_from_k_start_to_k():
    x = _sparse_data()
    sae = TopKSAE(32, 256, 8)
    cfg = TrainerConfig(batch_size=128, lr=1e-3, warmup_steps=0, k_start=32, k_anneal_steps=10, log_every=1)
    logs = []
    fit({0: sae}, _batches(x, 128), cfg, 14, "cpu", lambda s, m: logs.append(m[0]["l0"]), NullBar)
    assert logs[0] == 32 and logs[5] == 20 and logs[10:] == [8, 8, 8, 8]


def _record_grad_norm(state) -> list:
    """Wrap the optimizer step to record the gradient norm it is given (gradients are freed after it)."""
    seen, original = [], state.opt.step

    def step():
        seen.append(torch.cat([p.grad.flatten() for p in state.sae.parameters()]).norm())
        original()

    state.opt.step = step
    return seen


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy wraps step
def test_gradient_clipping_bounds_the_step():
    from qscope_train.trainer import new_state, train_step

    x = _sparse_data() * 1000  # huge gradients
    steps = {}
    for clip in (None, 1e-3):
        sae = TopKSAE(32, 256, 8)
        sae.init_weights_(generator=torch.Generator().manual_seed(0))
        cfg = TrainerConfig(batch_size=256, lr=1e-3, warmup_steps=0, grad_clip=clip, auxk_coef=0).resolved(10)
        state = new_state(sae, cfg, 10, "cpu")
        seen = _record_grad_norm(state)
        train_step(state, x[:256], cfg)
        steps[clip] = seen[0].item()
    assert steps[1e-3] <= 1e-3 * 1.0001 < steps[None]


@pytest.mark.parametrize("keep", [False, True])
def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_again(keep):
    """A freed 256 MiB tensor, allocated again and again: glibc's default unmaps and re-faults it page by page."""
    import subprocess
    import sys

    code = f"""
import resource, torch
from qscope_train.allocator import keep_freed_memory_on_cpu
if {keep}:
    assert keep_freed_memory_on_cpu()
# glibc settles within the first steps: until freed blocks next to each other coalesce, a freed block is a
# little too small for the next aligned request of the same size and the heap grows instead (strace; measured:
# the last re-faulting allocation was the 6th to the 10th in 12 runs)
for _ in range(24):
    torch.ones(64 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(64 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    if keep:
        assert faults < 1000
    else:
        assert faults > 500  # the default allocator (4 KiB pages: 65,536; huge pages: 128 or more)


def test_sign_descent_moves_each_weight_by_lr_against_its_gradient_sign():
    from qscope_train.optim import SignSGD

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    w.grad = torch.tensor([0.5, -1e-6, 0.0])
    SignSGD([w], lr=0.1).step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9, 3.0]))


@pytest.mark.parametrize("optimizer,center", [("adam", False), ("signum", False), ("signum", True)])
def test_a_crashed_run_resumes_to_the_uninterrupted_weights(optimizer, center, tmp_path):
    from qscope_train.config import OptimizerName
    from qscope_train.trainer import Checkpoints

    x = _sparse_data(n=4096)
    batches = [{0: x[i * 256 : (i + 1) * 256]} for i in range(12)]
    cfg = TrainerConfig(
        batch_size=256, optimizer=OptimizerName(optimizer), warmup_steps=3, dead_after_tokens=512, center_input=center
    )

    def train(directory, source):
        sae = TopKSAE(32, 256, 8)
        sae.init_weights_(generator=torch.Generator().manual_seed(1))
        ckpts = Checkpoints(directory, 4, 2, {"test": 1})
        merged.append(fit({0: sae}, source, cfg, 12, "cpu", lambda s, m: None, NullBar, checkpoints=ckpts))
        return sae

    merged = []
    whole = train(tmp_path / "a", ListSource(batches))
    assert merged[0][0]["duplicates_merged"] > 0  # duplicate merges (on by default) resume exactly too
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", ListSource(batches, fail_at=9))
    resumed = train(tmp_path / "b", ListSource(batches))
    for name, p in whole.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


def test_signum_trains_and_exports_the_schedule_free_average():
    from schedulefree import ScheduleFreeWrapper

    from qscope_train.config import OptimizerName
    from qscope_train.optim import default_lr
    from qscope_train.trainer import new_state

    assert default_lr(16384, OptimizerName.signum) == pytest.approx(2.5e-3)
    # signum: lower for runs longer than 2^20 tokens, by sqrt of the ratio, at most 4x
    assert default_lr(16384, OptimizerName.signum, 2**20) == pytest.approx(2.5e-3)
    assert default_lr(16384, OptimizerName.signum, 2**22) == pytest.approx(2.5e-3 / 2)
    assert default_lr(16384, OptimizerName.signum, 2**30) == pytest.approx(2.5e-3 / 4)
    assert default_lr(16384, OptimizerName.adam, 2**30) == pytest.approx(2e-4)
    x = _sparse_data()
    sae = TopKSAE(32, 256, 8)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    before = fvu(x, sae(x).x_hat_BD).item()
    cfg = TrainerConfig(batch_size=256, optimizer=OptimizerName.signum, warmup_steps=5, decay_fraction=0.0)
    state = new_state(sae, cfg, 40, "cpu")
    assert isinstance(state.opt, ScheduleFreeWrapper) and state.opt.train_mode
    fit({0: sae}, _batches(x, 256), cfg, 40, "cpu", lambda s, m: None, NullBar)
    assert fvu(x, sae(x).x_hat_BD).item() < 0.5 * before
    # the exported weights are the average x, not the last iterate y: off unit norm after averaging
    norms = sae.W_dec.norm(dim=0)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_swap_free_schedule_free_steps_exactly_as_the_package(monkeypatch):
    """Our wrapper only changes how a parameter and its z buffer change places: a fit with it and one with
    schedulefree's own XOR swap end in identical weights and optimizer state."""
    import schedulefree

    from qscope_train import optim
    from qscope_train.config import OptimizerName
    from qscope_train.trainer import new_state, train_step

    x = _sparse_data()
    cfg = TrainerConfig(batch_size=256, optimizer=OptimizerName.signum)

    def run():
        sae = TopKSAE(32, 256, 8)
        sae.init_weights_(generator=torch.Generator().manual_seed(1))
        state = new_state(sae, cfg, 16, "cpu")
        for step, xb in enumerate(x.split(256)):
            train_step(state, xb, cfg.resolved(16), step)
        z = [state.opt.state[p]["z"].clone() for p in sae.parameters()]
        return type(state.opt), [p.detach().clone() for p in sae.parameters()], z

    ours, weights, z = run()
    assert ours is optim.SwapFreeScheduleFree
    monkeypatch.setattr(optim, "SwapFreeScheduleFree", schedulefree.ScheduleFreeWrapper)
    package, weights_ref, z_ref = run()
    assert package is schedulefree.ScheduleFreeWrapper
    for a, b in zip(weights + z, weights_ref + z_ref, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(weights[0], z[0])  # y and z are distinct sequences, so the swap had work to do


@pytest.mark.parametrize("center", [False, True])
def test_center_input_starts_the_pre_activations_at_zero_mean(center):
    x = _sparse_data() + 2.0  # a large shared offset, as residual streams have
    sae = TopKSAE(32, 256, 8)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    cfg = TrainerConfig(batch_size=4096, center_input=center, decoder_init=DecoderInit.random)
    fit({0: sae}, Unseekable([{0: x}]), cfg, 0, "cpu", lambda s, m: None, NullBar)  # initialisation only
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    mean_pre = sae.pre_acts(x).mean(0).abs().max().item()
    assert (mean_pre < 1e-4) if center else (mean_pre > 0.1)


def test_center_input_trains_b_dec_through_the_encoder_and_exports_the_card_form():
    x = _sparse_data() + 2.0
    runs = {}
    for center in (False, True):
        sae = TopKSAE(32, 256, 8)
        sae.init_weights_(generator=torch.Generator().manual_seed(1))
        cfg = TrainerConfig(batch_size=256, warmup_steps=2, center_input=center)
        fit({0: sae}, _batches(x, 256), cfg, 20, "cpu", lambda s, m: None, NullBar)
        assert not sae.centered  # back in the release's form
        runs[center] = sae
    assert not torch.allclose(runs[True].b_enc, runs[False].b_enc)  # a different training, not a relabelling
    # the centred run's release computes what it trained: b_enc absorbed -W_enc @ b_dec
    mean_pre = runs[True].pre_acts(x).mean(0)
    assert mean_pre.abs().mean() < runs[False].pre_acts(x).mean(0).abs().mean()


def test_the_probe_sees_the_exported_weights_and_leaves_training_alone():
    from qscope_train.config import OptimizerName

    x = _sparse_data()
    cfg = TrainerConfig(batch_size=256, optimizer=OptimizerName.signum, center_input=True, log_every=5)
    seen = {}

    def train(probe):
        sae = TopKSAE(32, 256, 8)
        sae.init_weights_(generator=torch.Generator().manual_seed(1))
        fit({0: sae}, _batches(x, 256), cfg, 12, "cpu", lambda s, m: None, NullBar, probe=probe)
        return sae

    probed = train(lambda step, saes: seen.update({step: saes[0]}))
    plain = train(None)
    assert sorted(seen) == [0, 5, 10, 11]
    for name, p in plain.state_dict().items():
        assert torch.equal(p, probed.state_dict()[name]), name
        assert torch.equal(p, seen[11].state_dict()[name]), name  # the last probe saw the export
    assert not torch.equal(seen[5].W_dec, plain.W_dec)


def test_decoder_init_data_starts_each_direction_at_a_distinct_centred_row():
    from qscope_train.config import DecoderInit

    x = _sparse_data(n=400) + 2.0
    batches = [{0: x[i * 200 : (i + 1) * 200]} for i in range(2)]
    sae = TopKSAE(32, 512, 8)  # more latents than the two batches have rows
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    random_dirs = sae.W_dec_FD.detach().clone()
    cfg = TrainerConfig(batch_size=200, decoder_init=DecoderInit.data)
    seen = []
    source = Unseekable(b for b in batches if not seen.append(1))
    fit({0: sae}, source, cfg, 0, "cpu", lambda s, m: None, NullBar)  # initialisation only
    assert len(seen) == 2  # both batches were read for rows
    centred = torch.nn.functional.normalize(x - x[:200].mean(0), dim=-1)
    best, which = (sae.W_dec_FD.detach() @ centred.T).max(1)
    assert (best[:400] > 0.9999).all() and which[:400].unique().numel() == 400
    assert torch.equal(sae.W_dec_FD[400:], random_dirs[400:])  # no rows left for these
    # the encoder: the decoder's transpose at the first batch's least-squares scale (fit_encoder_scale_)
    scale = sae.W_enc.norm(dim=1).mean()
    torch.testing.assert_close(sae.W_enc, scale * sae.W_dec_FD)


@pytest.mark.parametrize("decoder_init", ["data", "random"])
def test_the_first_batch_is_reconstructed_below_fvu_1_at_the_least_squares_encoder_scale(decoder_init):
    from qscope_train.config import DecoderInit
    from qscope_train.init import fit_encoder_scale_

    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=-1)
    x = (torch.rand(1024, 200, generator=g) * (torch.rand(1024, 200, generator=g) < 0.05)) @ atoms + 1.0
    batches = [{0: x[i * 256 : (i + 1) * 256]} for i in range(4)]
    sae = TopKSAE(32, 512, 16)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    cfg = TrainerConfig(batch_size=256, decoder_init=DecoderInit(decoder_init))
    fit({0: sae}, Unseekable(batches), cfg, 0, "cpu", lambda s, m: None, NullBar)  # initialisation only
    first = batches[0][0]
    with torch.no_grad():
        fvu = ((first - sae(first).x_hat_BD).pow(2).sum() / (first - first.mean(0)).pow(2).sum()).item()
        assert fvu < 1
        # the scale is the least-squares one: scaling the encoder either way reconstructs worse
        for factor in (0.8, 1.25):
            other = copy.deepcopy(sae)
            other.W_enc.mul_(factor)
            other.b_enc.mul_(factor)  # b_dec folded in: the pre-activations scale as a whole
            worse = ((first - other(first).x_hat_BD).pow(2).sum() / (first - first.mean(0)).pow(2).sum()).item()
            assert worse > fvu
        # a tied encoder at unit norm, as before the scale, reconstructs this batch many times over
        unit = copy.deepcopy(sae)
        unit.W_enc.copy_(unit.W_dec_FD)
        unit.b_enc.copy_(-(unit.W_enc @ unit.b_dec))
        unit.center_input_(True)
        assert fit_encoder_scale_(unit, first) < 0.5


def test_unset_schedule_and_dead_window_follow_the_optimizer_and_the_run_length():
    from qscope_train.config import OptimizerName

    adam = TrainerConfig(batch_size=1000, optimizer=OptimizerName.adam).resolved(160)
    assert (adam.warmup_steps, adam.decay_fraction, adam.dead_after_tokens) == (100, 0.2, 2_500)  # 1/64
    sign = TrainerConfig(batch_size=1000, optimizer=OptimizerName.signum).resolved(10**6)
    assert (sign.warmup_steps, sign.decay_fraction, sign.dead_after_tokens) == (0, 0.0, 10_000_000)
    assert TrainerConfig(batch_size=1000).resolved(3).dead_after_tokens == 1000  # never below one batch
    mine = TrainerConfig(warmup_steps=7, decay_fraction=0.5, dead_after_tokens=123).resolved(10)
    assert (mine.warmup_steps, mine.decay_fraction, mine.dead_after_tokens) == (7, 0.5, 123)


def test_a_crash_while_initialisation_batches_wait_resumes_exactly(tmp_path):
    """decoder_init=data reads 4 batches ahead for 1024 latents; a checkpoint taken before they are all
    trained would record a reader position past untrained batches, so none is taken then."""
    from qscope_train.trainer import Checkpoints

    x = _sparse_data(n=4096)
    batches = [{0: x[i * 256 : (i + 1) * 256]} for i in range(12)]
    cfg = TrainerConfig(batch_size=256, dead_after_tokens=1024, log_every=1)

    def crash_at(step):
        def log(s, m):
            if s == step:
                raise KeyboardInterrupt("crash")

        return log

    def train(directory, log):
        sae = TopKSAE(32, 1024, 8)
        sae.init_weights_(generator=torch.Generator().manual_seed(1))
        ckpts = Checkpoints(directory, 2, 2, {"t": 1})
        fit({0: sae}, ListSource(batches), cfg, 12, "cpu", log, NullBar, checkpoints=ckpts)
        return sae

    whole = train(tmp_path / "a", lambda s, m: None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", crash_at(2))  # after step 1's checkpoint time, before step 3's
    resumed = train(tmp_path / "b", lambda s, m: None)
    for name, p in whole.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


@pytest.mark.parametrize("n_dead", [0, 5])
def test_a_cpu_step_with_no_dead_latent_skips_auxk_and_matches_the_device_step(n_dead, monkeypatch):
    """On a CPU the step asks whether any latent is dead and leaves AuxK out when none is; the device path
    (CPU_READS off) runs the term, zero then. Both leave the same weights, bit for bit."""
    import qscope_train.trainer as trainer

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return auxk_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "auxk_loss", counted)
    x = _sparse_data(n=2048, d=16, atoms=64)
    cfg = TrainerConfig(batch_size=256, dead_after_tokens=256).resolved(8)
    weights, runs = [], []
    for cpu_reads in (True, False):
        monkeypatch.setattr(losses, "CPU_READS", cpu_reads)
        sae = TopKSAE(16, 128, 4)
        sae.init_weights_(generator=torch.Generator().manual_seed(0))
        state = trainer.new_state(sae, cfg, 8, "cpu")
        calls.clear()
        for step in range(6):
            state.since_fired_F.zero_()
            state.since_fired_F[:n_dead] = cfg.dead_after_tokens  # exactly n_dead latents are dead
            trainer.train_step(state, x[step * 256 : (step + 1) * 256], cfg, step)
        runs.append(len(calls))
        weights.append([p.detach().clone() for p in sae.parameters()])
    # AuxK starts on the 2nd step (the first sets its divisor) once dead_after_tokens tokens are seen
    assert runs == ([0, 5] if n_dead == 0 else [5, 5])
    for cpu_p, device_p in zip(*weights, strict=True):
        assert torch.equal(cpu_p, device_p)
