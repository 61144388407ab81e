"""A random-weight Qwen3 with a real model's shape (or a reduced one), saved with the tiny fixtures'
tokenizer: real shapes and real code paths where no hub model can be downloaded.

Shapes: qwen3-1.7b (hidden 2048, 28 layers, 16/8 heads of 128, MLP 6144, vocabulary 151,936, tied
embeddings: Qwen3-1.7B's config; ~3.4 GB in bf16) and reduced (hidden 256, 4 layers: a quick stand-in
for dry runs). The fixtures' tokenizer has a smaller vocabulary than the model, which only leaves
embedding rows unused.

Usage: python scripts/make_random_qwen3.py --out DIR --fixtures FIXTURES_DIR [--shape qwen3-1.7b|reduced]
           [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qscope_train.plan import QWEN3_1_7B

SHAPES = {
    "qwen3-1.7b": QWEN3_1_7B,  # the shape plan=true also plans offline with
    "reduced": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fixtures", type=Path, required=True, help="tiny fixtures (make_tiny_model.py), for the tokenizer")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1.7b")
    p.add_argument("--device", default="cpu", help="where to initialise the weights (a GPU is much faster)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(a.fixtures / "tiny-qwen3")
    cfg = Qwen3Config(**SHAPES[a.shape], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(a.seed)
    with torch.device(a.device):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    params = sum(t.numel() for t in model.parameters())
    print(json.dumps({"out": str(a.out), "shape": a.shape, "parameters": params}))


if __name__ == "__main__":
    main()
