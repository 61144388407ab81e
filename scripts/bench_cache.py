"""Benchmark of the cache stage and the reader on a mid-size random Qwen3; prints one JSON line.

Model: Qwen3 with hidden 1024, 8 layers, 16 heads (random weights, the fixtures' tokenizer), seq
512, caching layers 1, 3, 5, 7. In the same process it times the bare truncated forward (hooks, no
filters, no writes) and the cache stage over the same tokens. The reader is timed on caches made
from those real activations (rows rescaled by 1 + 1% noise so that no two rows repeat), at two
sizes 4x apart, each read in its own subprocess so that its peak RSS is its own.

With --writer-only it times the cache stage's writer alone instead (no model forward in the timed part):
real activation rows of a random Qwen3 with d_model 2048 replayed over 28 layers (each layer's copy
rescaled row-wise by 1 + 1% noise), written by the cache's own writer with one thread and with the
default pool (data.writer_threads=0), each in its own subprocess, plus the default at 3x the chunks
for the peak RSS.

Usage: python scripts/bench_cache.py [--tokens 16384] [--threads 2] [--workdir DIR]
       python scripts/bench_cache.py --writer-only [--writer-chunks 4] [--chunk-rows 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYERS = [1, 3, 5, 7]


def random_qwen3(root: Path, name: str, n_docs: int, **shape) -> Path:
    """A random-weight Qwen3 of the given shape with the tiny fixtures' tokenizer (fixtures of n_docs
    documents built under root), saved as root/name."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from qscope_train.tiny import build_fixtures

    fx = build_fixtures(root / "fixtures", n_docs=n_docs)
    tok = AutoTokenizer.from_pretrained(fx["tiny-qwen3"])
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    out = root / name
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_model(root: Path) -> Path:
    shape = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16)
    return random_qwen3(root, "qwen3-mid", 12000, **shape, num_key_value_heads=8, head_dim=64)


def data_config(corpus: Path, tokens: int):
    from qscope_train.config import DataConfig

    return DataConfig(
        dataset=str(corpus),
        context_len=512,
        train_tokens=tokens,
        eval_tokens=512 * 8,
        forward_batch_tokens=4096,
        shard_tokens=4096,
    )


def time_forward(lm, cfg) -> float:
    from qscope_train.data.tokens import batched, load_text_dataset, token_stream
    from qscope_train.lm import run_captured

    seqs = token_stream(load_text_dataset(cfg), lm.tokenizer, cfg)
    seqs = [s for _, s in zip(range((cfg.train_tokens + cfg.eval_tokens) // 512), seqs, strict=False)]
    run_captured(lm, LAYERS, seqs[0].input_ids[None])  # warm-up
    start, n = time.perf_counter(), 0
    for ids, mask in batched(seqs, cfg.forward_sequences):
        run_captured(lm, LAYERS, ids, mask.long())
        n += ids.numel()
    return n / (time.perf_counter() - start)


def scaled_cache(src: Path, manifest: dict, dst: Path, copies: int) -> Path:
    """A cache of `copies` × the real one's train rows per layer, in the same format and codec."""
    from qscope_train.data import shards
    from qscope_train.data.shards import Codec

    codec = Codec(**manifest["codec"])
    g = torch.Generator().manual_seed(0)
    splits = {"train": {"layers": {}}, "eval": manifest["splits"]["eval"]}
    for n, lay in manifest["splits"]["train"]["layers"].items():
        real = torch.cat(
            [
                shards.read_shard(src, shards.ShardRecord(**r), manifest["d_model"], codec, torch.float32)
                for r in lay["shards"]
            ]
        )
        recs = []
        for i in range(copies):
            x = real * (1 + 0.01 * torch.randn(real.shape[0], 1, generator=g))
            recs.append(shards.write_shard(dst, f"train/layer{n}/shard-{i:06d}.zst", x, codec))
        splits["train"]["layers"][n] = {"rows": sum(r.rows for r in recs), "shards": shards.as_dicts(recs)}
    shards.write_manifest(dst, {**manifest, "splits": splits})
    return dst


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the process image, so it starts afresh at exec; getrusage's
    ru_maxrss does not (Linux carries it across exec), and in a child started from the benchmark's parent
    it would report the parent's peak, model and all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bench(cache: Path, layer: int, batch: int, threads: int, seconds: float, dtype: str, verify: str) -> dict:
    """Runs in a subprocess: read shuffled fp32 batches of one layer for `seconds`; rows/s and peak RSS."""
    from qscope_train.config import ReaderConfig, Verify
    from qscope_train.data import shards
    from qscope_train.data.batches import cached_batches

    torch.set_num_threads(threads)
    manifest = shards.read_manifest(cache)
    cfg = ReaderConfig(threads=threads, verify_shards=Verify(verify))
    out_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    it = iter(cached_batches(cache, manifest, [layer], batch, cfg, seed=0, out_dtype=out_dtype))
    next(it)
    start, rows = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        rows += next(it)[layer].shape[0]
    rate = rows / (time.perf_counter() - start)
    return {
        "rows_per_s": rate,
        "peak_rss_mb": peak_rss_mb(),
        "cache_rows": manifest["splits"]["train"]["layers"][str(layer)]["rows"],
    }


WRITER_LAYERS = 28
WRITER_D_MODEL = 2048


def writer_rows(root: Path, tokens: int) -> Path:
    """Real layer-1 activations of a random Qwen3 with the release's width (d_model 2048, 2 layers, the
    fixtures' tokenizer), saved as bf16 for the writer benchmark to replay."""
    from qscope_train.config import ModelConfig
    from qscope_train.data.activations import forward_chunk, make_filter
    from qscope_train.data.tokens import load_text_dataset, token_stream
    from qscope_train.lm import load_lm

    shape = dict(hidden_size=WRITER_D_MODEL, intermediate_size=6144, num_hidden_layers=2, num_attention_heads=16)
    model = random_qwen3(root, "qwen3-2048", 3000, **shape, num_key_value_heads=8, head_dim=128)
    lm = load_lm(ModelConfig(name_or_path=str(model)))
    data = data_config(root / "fixtures" / "corpus.jsonl", tokens)
    stream = token_stream(load_text_dataset(data), lm.tokenizer, data)
    seqs = [s for _, s in zip(range(tokens // data.context_len), stream, strict=False)]
    rows = forward_chunk(lm, [1], seqs, data, make_filter(lm, data), "cpu").rows[1]
    torch.save(rows, root / "rows.pt")
    return root / "rows.pt"


def write_bench(rows_file: Path, out: Path, threads: int, chunks: int, chunk_rows: int) -> dict:
    """Runs in a subprocess: the cache stage's writer alone, `chunks` chunks of `chunk_rows` rows for each of
    28 layers (the real rows, each layer's rescaled row-wise by 1 + 1% noise, so no two layers repeat)."""
    from qscope_train.config import DataConfig
    from qscope_train.data.activations import ChunkRows, FilterCounts
    from qscope_train.data.writer import _Progress, _Writer, codec_for

    torch.set_num_threads(1)
    real = torch.load(rows_file, weights_only=True).float()
    real = real.repeat(-(-chunk_rows // real.shape[0]), 1)[:chunk_rows]
    g = torch.Generator().manual_seed(0)
    layers = {
        n: (real * (1 + 0.01 * torch.randn(chunk_rows, 1, generator=g))).to(torch.bfloat16)
        for n in range(WRITER_LAYERS)
    }
    cfg = DataConfig(dataset="unused", writer_threads=threads)
    counts = {n: FilterCounts() for n in layers}
    ids = torch.zeros(1, 1, dtype=torch.long)
    progress = _Progress(out, 0, {"bench_cache": "writer"})
    writer = _Writer(out, progress, codec_for(cfg), False, cfg.writer_pool())
    start = time.perf_counter()
    for c in range(chunks):
        chunk = ChunkRows(layers, {}, ids, counts, (0, 0))
        writer.put((c, "train", chunk, {"next_chunk": c + 1, "stream": [0, 0], "medians": {}}))
    writer.close()
    seconds = time.perf_counter() - start
    compressed = writer.bytes
    raw = chunks * WRITER_LAYERS * chunk_rows * WRITER_D_MODEL * 2
    return {
        "tokens_per_s_per_layer": chunks * chunk_rows / seconds,
        "compression_ratio": raw / compressed,
        "peak_rss_mb": peak_rss_mb(),
        "threads": cfg.writer_pool(),
    }


def writer_only(args) -> None:
    """One JSON line: the writer with one thread and with the default pool, and its peak RSS at two run lengths."""
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        rows = writer_rows(tmp, args.writer_source_tokens)

        def run(threads: int, chunks: int) -> dict:
            out = tmp / f"writer-{threads}-{chunks}"
            res = subprocess.run(
                [sys.executable, __file__, "--_write", str(rows), str(out), str(threads), str(chunks)]
                + ["--chunk-rows", str(args.chunk_rows)],
                capture_output=True,
                text=True,
                check=True,
            )
            shutil.rmtree(out)
            return json.loads(res.stdout.strip().splitlines()[-1])

        one = run(1, args.writer_chunks)
        default = run(0, args.writer_chunks)
        longer = run(0, 3 * args.writer_chunks)
    print(
        json.dumps(
            {
                "writer_tokens_per_s_per_layer": {
                    "one_thread": round(one["tokens_per_s_per_layer"], 1),
                    "default": round(default["tokens_per_s_per_layer"], 1),
                },
                "default_over_one_thread": round(default["tokens_per_s_per_layer"] / one["tokens_per_s_per_layer"], 3),
                "compression_ratio": round(default["compression_ratio"], 3),
                "writer_peak_rss_mb": {
                    f"{args.writer_chunks}_chunks": round(default["peak_rss_mb"], 1),
                    f"{3 * args.writer_chunks}_chunks": round(longer["peak_rss_mb"], 1),
                },
                "settings": {
                    "d_model": WRITER_D_MODEL,
                    "layers": WRITER_LAYERS,
                    "chunk_rows": args.chunk_rows,
                    "chunks": args.writer_chunks,
                    "default_threads": default["threads"],
                    "cores": len(os.sched_getaffinity(0)),
                    "codec": "bfloat16, byte-split, zstd level 1, frame checksum",
                },
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="training tokens to forward and cache")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reader-seconds", type=float, default=8.0)
    p.add_argument("--small-copies", type=int, default=16, help="the small reader cache is this many × the real one")
    p.add_argument(
        "--reader-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the batches read"
    )
    p.add_argument(
        "--verify",
        choices=["frame", "sha256"],
        default="frame",
        help="how the reader checks shards (reader.verify_shards)",
    )
    p.add_argument("--workdir", type=Path, help="keep the model and caches here (default: a temporary directory)")
    p.add_argument("--_read", nargs=2, help=argparse.SUPPRESS)
    p.add_argument(
        "--writer-only",
        action="store_true",
        help="time the cache writer alone (no model forward): real d_model-2048 rows replayed over 28 layers",
    )
    p.add_argument("--writer-chunks", type=int, default=4, help="chunks the writer benchmark writes (and 3x that)")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per layer and chunk in the writer benchmark")
    p.add_argument("--writer-source-tokens", type=int, default=8192, help="tokens forwarded for the replayed rows")
    p.add_argument("--_write", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._write:
        rows, out, threads, chunks = args._write
        print(json.dumps(write_bench(Path(rows), Path(out), int(threads), int(chunks), args.chunk_rows)))
        return
    if args.writer_only:
        writer_only(args)
        return
    if args._read:
        print(
            json.dumps(
                read_bench(
                    Path(args._read[0]),
                    int(args._read[1]),
                    4096,
                    args.threads,
                    args.reader_seconds,
                    args.reader_dtype,
                    args.verify,
                )
            )
        )
        return

    from qscope_train.config import ModelConfig
    from qscope_train.data.writer import build_cache
    from qscope_train.lm import load_lm
    from qscope_train.tracking import NullBar

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        model_dir = build_model(tmp)
        lm = load_lm(ModelConfig(name_or_path=str(model_dir)))
        cfg = data_config(tmp / "fixtures" / "corpus.jsonl", args.tokens)
        forward = time_forward(lm, cfg)
        start = time.perf_counter()
        manifest = build_cache(lm, LAYERS, cfg, tmp / "cache", "cpu", NullBar)
        cache_rate = (cfg.train_tokens + cfg.eval_tokens) / (time.perf_counter() - start)
        rows = sum(lay["rows"] for sp in manifest["splits"].values() for lay in sp["layers"].values())
        out = {
            "forward_tokens_per_s": round(forward, 1),
            "cache_tokens_per_s": round(cache_rate, 1),
            "cache_over_forward": round(cache_rate / forward, 3),
            "bytes_per_token_per_layer": round(manifest["compressed_bytes"] / rows, 1),
            "compression_ratio": round(manifest["raw_bytes"] / manifest["compressed_bytes"], 3),
        }
        reads = {}
        for name, copies in (("small", args.small_copies), ("large", 4 * args.small_copies)):
            cache = scaled_cache(tmp / "cache", manifest, tmp / f"reader_{name}", copies)
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_read",
                    str(cache),
                    str(LAYERS[0]),
                    "--threads",
                    str(args.threads),
                    "--reader-seconds",
                    str(args.reader_seconds),
                    "--reader-dtype",
                    args.reader_dtype,
                    "--verify",
                    args.verify,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            reads[name] = json.loads(res.stdout.strip().splitlines()[-1])
        out["reader_tokens_per_s_per_layer"] = round(reads["small"]["rows_per_s"], 1)
        out["reader_tokens_per_s_per_layer_large"] = round(reads["large"]["rows_per_s"], 1)
        out["reader_peak_rss_mb_small"] = round(reads["small"]["peak_rss_mb"], 1)
        out["reader_peak_rss_mb_large"] = round(reads["large"]["peak_rss_mb"], 1)
        out["reader_cache_rows_small"] = reads["small"]["cache_rows"]
        out["reader_cache_rows_large"] = reads["large"]["cache_rows"]
        out["settings"] = {
            "d_model": 1024,
            "layers": LAYERS,
            "seq": 512,
            "threads": args.threads,
            "tokens": args.tokens,
            "codec": manifest["codec"],
            "reader_batch": 4096,
            "reader_dtype": args.reader_dtype,
            "verify_shards": args.verify,
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
