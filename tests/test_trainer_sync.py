"""The training step reads nothing back to the host: on CPUs through a dispatch mode that records every
op that would wait for a GPU, and on CUDA (where present) under torch's own sync debug mode."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qscope_train import losses
from qscope_train.config import Activation, Objective, TrainerConfig
from qscope_train.data.batches import Unseekable
from qscope_train.sae import TopKSAE
from qscope_train.tracking import NullBar
from qscope_train.trainer import fit, new_state, train_steps

aten = torch.ops.aten
# ops whose result the host must see: a GPU stream stops for them
READS_BACK = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


@pytest.fixture(autouse=True)
def _device_path(monkeypatch):
    """The step as it runs on an accelerator: AuxK does not count its dead latents on the host."""
    monkeypatch.setattr(losses, "CPU_READS", False)


class HostReads(TorchDispatchMode):
    """Records the ops above, and indexing with a boolean mask (a nonzero inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS_BACK:
            self.seen.append(str(func))
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.seen.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def _data(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(64, d, generator=g), dim=-1)
    codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.08)
    return codes @ atoms + 0.5


def test_the_detector_sees_the_reads_the_old_step_made():
    x = torch.randn(8, 4)
    with HostReads() as mode:
        bool((x > 0).any())
        float(x.sum())
        x[x > 0] = 0
        torch.bincount(torch.tensor([1, 2]))
    assert len(mode.seen) == 4, mode.seen


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("activation", list(Activation))
def test_steps_with_auxk_and_every_objective_read_nothing_back(objective, activation):
    x = _data()
    sae = TopKSAE(16, 256, 4, activation)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[:100] = -50.0  # these never fire: AuxK has dead latents to train
    cfg = TrainerConfig(
        batch_size=256, objective=objective, dead_after_tokens=512, grad_clip=1.0, k_start=8, k_anneal_steps=3
    ).resolved(8)
    state = new_state(sae, cfg, 8, "cpu")
    state.sae.center_input_(True)
    train_steps({0: state}, {0: x[:256]}, cfg, 0)  # the first step sets AuxK's divisor
    state.tokens = cfg.dead_after_tokens
    state.since_fired_F[:100] = cfg.dead_after_tokens
    with HostReads() as mode:
        for step in range(1, 6):
            train_steps({0: state}, {0: x[step * 256 : (step + 1) * 256]}, cfg, step)
    assert mode.seen == []
    assert state.last[1] > 0  # AuxK did run
    # and the metrics are there to read on a log step
    fvu, auxk, l0 = state.last.tolist()
    assert 0 < fvu < 2 and l0 <= 4


def test_a_fit_reads_back_only_on_log_steps():
    x = _data()
    sae = TopKSAE(16, 256, 4)
    cfg = TrainerConfig(batch_size=256, dead_after_tokens=256, log_every=4, checkpoint_every=0)
    batches = Unseekable([{0: x[i * 256 : (i + 1) * 256]} for i in range(8)])
    reads, logged = [], []

    import qscope_train.trainer as trainer

    original = trainer.train_steps

    def watched(*args, **kwargs):
        with HostReads() as mode:
            original(*args, **kwargs)
        reads.append(mode.seen)

    trainer.train_steps = watched
    try:
        fit({0: sae}, batches, cfg, 8, "cpu", lambda s, m: logged.append(s), NullBar)
    finally:
        trainer.train_steps = original
    assert logged == [0, 4, 7] and reads == [[]] * 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_between_log_steps_do_not_synchronise():
    device = torch.device("cuda")
    x = _data(n=4096).to(device)
    sae = TopKSAE(16, 256, 4)
    cfg = TrainerConfig(batch_size=256, dead_after_tokens=256).resolved(16)
    state = new_state(sae, cfg, 16, device)
    state.sae.center_input_(True)
    for step in range(3):  # warm up: first-use allocations and AuxK's divisor
        train_steps({0: state}, {0: x[step * 256 : (step + 1) * 256]}, cfg, step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 12):
            train_steps({0: state}, {0: x[step * 256 : (step + 1) * 256]}, cfg, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.last).all()


def test_the_encoder_gemm_is_bf16_on_cuda_by_default_and_a_bf16_run_matches_fp32():
    from qscope_train.config import DType
    from qscope_train.trainer import gemm_dtype

    assert gemm_dtype(TrainerConfig(), torch.device("cuda")) == torch.bfloat16
    assert gemm_dtype(TrainerConfig(), torch.device("cpu")) == torch.float32
    assert gemm_dtype(TrainerConfig(encoder_dtype=DType.float32), torch.device("cuda")) == torch.float32
    x = _data(n=8192)
    final = {}
    for dtype in (DType.float32, DType.bfloat16):
        sae = TopKSAE(16, 256, 4)
        sae.init_weights_(generator=torch.Generator().manual_seed(0))
        cfg = TrainerConfig(batch_size=256, encoder_dtype=dtype, log_every=1)
        logs = []
        batches = Unseekable([{0: x[i * 256 : (i + 1) * 256]} for i in range(32)])
        fit({0: sae}, batches, cfg, 32, "cpu", lambda s, m, logs=logs: logs.append(m[0]["fvu"]), NullBar)
        final[dtype] = sum(logs[-8:]) / 8
    assert abs(final[DType.bfloat16] - final[DType.float32]) < 0.05 * final[DType.float32], final
