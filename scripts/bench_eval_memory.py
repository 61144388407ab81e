"""Peak memory of the spliced-loss evaluation at the real vocabulary; prints one JSON line.

A tiny Qwen3 (the fixtures' shape) with Qwen3's vocabulary size (151,936) is built and saved in a first
subprocess; a second one loads it through load_lm, resets the kernel's peak-RSS counter (clear_refs 5),
and runs splice.downstream_metrics with one SAE set on two layers over `--tokens` held-out tokens in
forwards of `--batch-tokens` tokens. The figure is the peak RSS above the loaded model, next to the size
of one (batch-tokens x vocab) fp32 logit matrix.

Usage: python scripts/bench_eval_memory.py [--batch-tokens 8192] [--tokens 8192] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 151_936
CONTEXT = 512


def build(root: Path) -> None:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from qscope_train.tiny import TINY_SHAPE, build_fixtures

    fx = build_fixtures(root / "fixtures")
    tok = AutoTokenizer.from_pretrained(fx["tiny-qwen3"])
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, **TINY_SHAPE)
    Qwen3ForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(root: Path, tokens: int, batch_tokens: int, threads: int) -> dict:
    from qscope_train.config import DataConfig, ModelConfig
    from qscope_train.data.activations import make_filter
    from qscope_train.data.tokens import heldout_sequences
    from qscope_train.lm import load_lm
    from qscope_train.sae import TopKSAE
    from qscope_train.splice import downstream_metrics

    torch.set_num_threads(threads)
    lm = load_lm(ModelConfig(name_or_path=str(root / "model")))
    data = DataConfig(dataset=str(root / "fixtures" / "corpus.jsonl"), context_len=CONTEXT)
    seqs = heldout_sequences(lm.tokenizer, data, tokens)
    saes = {n: TopKSAE(lm.d_model, 1024, 16) for n in (1, 2)}
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    out = downstream_metrics(lm, {"set": saes}, seqs, make_filter(lm, data), max(1, batch_tokens // CONTEXT), "cpu")
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    matrix_mb = batch_tokens * VOCAB * 4 / 2**20
    return {
        "peak_above_model_mb": round(peak - base, 1),
        "logit_matrix_mb": round(matrix_mb, 1),
        "peak_in_matrices": round((peak - base) / matrix_mb, 3),
        "rss_after_load_mb": round(base, 1),
        "seconds": round(seconds, 1),
        "tokens": len(seqs) * CONTEXT,
        "batch_tokens": batch_tokens,
        "delta_ce_layer1": round(out["set"][1]["delta_ce"], 4),
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--_measure", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._measure:
        print(json.dumps(measure(a._measure, a.tokens, a.batch_tokens, a.threads)))
        return
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        build(root)
        cmd = [sys.executable, __file__, "--_measure", str(root), "--tokens", str(a.tokens)]
        cmd += ["--batch-tokens", str(a.batch_tokens), "--threads", str(a.threads)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
