"""What only a CUDA device can show: the fast paths the trainer takes there. Skipped without CUDA;
scripts/gpu_check.sh runs them (pytest -m cuda) on a machine that has one."""

import pytest
import torch
from conftest import ListSource

from qscope_train.config import DecoderInit, DType, ReaderConfig, TrainerConfig
from qscope_train.data.batches import cached_batches
from qscope_train.data.prefetch import Prefetched, to_device
from qscope_train.sae import TopKSAE
from qscope_train.tracking import NullBar
from qscope_train.trainer import fit

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _data(n: int, d: int = 64, atoms: int = 512, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of random unit directions, plus an offset and a little noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=-1)
    codes = torch.rand(n, atoms, generator=g) * (torch.rand(n, atoms, generator=g) < 8 / atoms)
    return codes @ dictionary + 0.5 + 0.01 * torch.randn(n, d, generator=g)


def _final_fvu(x: torch.Tensor, dtype, steps: int = 64, batch: int = 512) -> float:
    sae = TopKSAE(x.shape[1], 1024, 8)
    sae.init_weights_(generator=torch.Generator().manual_seed(0))
    cfg = TrainerConfig(batch_size=batch, encoder_dtype=dtype, log_every=1, decoder_init=DecoderInit.random)
    logs = []
    batches = ListSource([{0: x[i * batch : (i + 1) * batch]} for i in range(steps)])
    fit({0: sae}, batches, cfg, steps, "cuda", lambda s, m: logs.append(m[0]["fvu"]), NullBar)
    return sum(logs[-8:]) / 8


def test_the_default_bf16_encoder_gemm_matches_fp32_on_a_short_run():
    x = _data(64 * 512)
    bf16, fp32 = _final_fvu(x, None), _final_fvu(x, DType.float32)  # None: bf16 on CUDA
    assert bf16 < 0.5 and abs(bf16 - fp32) < 0.05 * fp32, (bf16, fp32)


def test_encode_on_cuda_is_the_cards_fp32_encoder():
    sae = TopKSAE(64, 1024, 8)
    sae.init_weights_(generator=torch.Generator().manual_seed(1))
    x = _data(256)
    want = sae.encode(x)
    got = sae.to("cuda").encode(x.cuda()).cpu()
    assert torch.equal(got != 0, want != 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefetched_batches_are_pinned_and_arrive_on_the_device_in_their_stored_dtype():
    batches = ListSource([{0: torch.randn(128, 64).to(torch.bfloat16)} for _ in range(4)])
    with Prefetched(batches, depth=2, pin=True) as src:
        items = list(src)
    assert len(items) == 4 and all(b[0].is_pinned() for b, _ in items)
    on_device = to_device(items[0][0], "cuda")
    assert on_device[0].device.type == "cuda" and on_device[0].dtype == torch.bfloat16
    torch.testing.assert_close(on_device[0].cpu(), items[0][0][0])


def test_a_fit_from_a_real_cache_on_cuda_learns_as_on_the_cpu(tmp_path):
    """The same fit (same cache, seeds and batches) on CUDA and on the CPU: both learn (held FVU well under
    the mean predictor's 1.0) and end within a few hundredths of each other. Their arithmetic differs
    (kernels, reduction orders, top-k ties), so they are not equal step by step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_fit import write_cache

    manifest = write_cache(tmp_path, [0, 1], 128, 40 * 512)
    ends = {}
    for device in ("cuda", "cpu"):
        batches = cached_batches(
            tmp_path, manifest, [0, 1], 512, ReaderConfig(threads=2), seed=0, out_dtype=torch.bfloat16
        )
        saes = {n: TopKSAE(128, 2048, 16) for n in (0, 1)}
        for n, sae in saes.items():
            sae.init_weights_(generator=torch.Generator().manual_seed(n))
        logs = []
        cfg = TrainerConfig(batch_size=512, log_every=4, checkpoint_every=0)
        summary = fit(saes, batches, cfg, 36, device, lambda s, m, logs=logs: logs.append(m), NullBar)
        for n in (0, 1):
            assert summary[n]["tokens_trained"] == 36 * 512
            assert all(torch.isfinite(p).all() for p in saes[n].parameters())
        ends[device] = logs[-1]
    for n in (0, 1):
        cuda, cpu = ends["cuda"][n], ends["cpu"][n]
        assert cuda["fvu"] < 0.5 and cpu["fvu"] < 0.5, (cuda, cpu)
        assert abs(cuda["fvu"] - cpu["fvu"]) < 0.05, (cuda, cpu)
        assert abs(cuda["dead_frac"] - cpu["dead_frac"]) < 0.1, (cuda, cpu)
