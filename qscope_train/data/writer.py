"""The resumable cache writer: one truncated forward per batch for every layer, written as checksummed shards.

The sequence stream is cut into chunks of shard_tokens; chunk c is one shard per layer, written
by rank c % world. After a chunk's shards are on disk, the rank appends a line to its progress
log and then rewrites its resume state (stream position, running medians); a killed run started
again continues after the last recorded chunk and ends with the same shards and manifest. The
main process merges the ranks' logs into manifest.json once every rank is done.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import InputError
from ..fsutil import atomic_write_json, read_json
from ..lm import LoadedLM, weights_digest
from ..schema import fingerprint, fingerprint_diff
from . import shards
from .activations import ChunkRows, FilterCounts, RunningMedian, chunked, forward_chunk, make_filter
from .config import DataConfig
from .shards import Codec
from .tokens import StreamState, load_text_dataset, plan, split_of, token_stream

CACHE_FORMAT = 3  # 3: shards carry zstd's content checksum (Codec.frame_checksum)
SPLITS = ("eval", "train")


def codec_for(cfg: DataConfig) -> Codec:
    return Codec(cfg.cache_dtype.value, cfg.byte_split, cfg.zstd_level, frame_checksum=True)


def cache_fingerprint(
    model: str,
    revision: str | None,
    layers: Sequence[int],
    cfg: DataConfig,
    world: int,
    dtype: str = "float32",
    weights: str | None = None,
) -> dict:
    """Everything that decides the cached bytes; a cache is reused or resumed only when this matches."""
    return {
        "format": CACHE_FORMAT,
        "model": model,
        "revision": revision,
        "weights": weights,
        "model_dtype": dtype,
        "layers": sorted(layers),
        "data": fingerprint(cfg),
        "world": world,
    }


class _Progress:
    """One rank's append-only chunk log plus its overwritten resume state."""

    def __init__(self, root: Path, rank: int, fp: dict) -> None:
        self.log = root / "progress" / f"rank{rank}.jsonl"
        self.state_file = root / "progress" / f"rank{rank}.state.json"
        self.fp = fp
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_line()

    def _cut_torn_line(self) -> None:
        """A kill during an append can leave half a line; cut it so the next record starts on its own line."""
        if not self.log.is_file():
            return
        data = self.log.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.log, "r+b") as f:
                f.truncate(keep)

    def load(self) -> dict | None:
        if not self.state_file.is_file():
            return None
        state = read_json(self.state_file)
        if state["fingerprint"] != self.fp:
            raise InputError(
                f"{self.state_file.parent.parent} holds a partial cache made with other settings; delete it or "
                f"choose another run_dir (differs: {fingerprint_diff(state['fingerprint'], self.fp)})"
            )
        return state

    def commit(self, entry: dict, state: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(self.state_file, {"fingerprint": self.fp, **state})

    def finish(self) -> None:
        state = self.load() or {"next_chunk": 0, "stream": [0, 0], "medians": {}}
        atomic_write_json(self.state_file, {**state, "fingerprint": self.fp, "finished": True})

    def entries(self, before_chunk: int) -> dict[int, dict]:
        """Complete log lines for chunks below before_chunk (a torn last line is ignored)."""
        out = {}
        if self.log.is_file():
            for line in self.log.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if e["chunk"] < before_chunk:
                    out[e["chunk"]] = e
        return out


def _submit_chunk(
    pool: ThreadPoolExecutor, root: Path, c: int, split: str, chunk: ChunkRows, codec: Codec, store_tokens: bool
):
    """Start one job per file of the chunk (each layer's shard, and with store_tokens its positions and
    the token ids); returns {name: future of its ShardRecord}."""
    ids_codec = Codec("int32", False, codec.level, codec.frame_checksum)
    jobs = {}
    for n, rows in chunk.rows.items():
        jobs[("shard", n)] = pool.submit(shards.write_shard, root, f"{split}/layer{n}/shard-{c:06d}.zst", rows, codec)
        if store_tokens:
            rel = f"{split}/layer{n}/positions-{c:06d}.zst"
            jobs[("positions", n)] = pool.submit(shards.write_shard, root, rel, chunk.positions[n], ids_codec)
    if store_tokens:
        jobs[("tokens", None)] = pool.submit(
            shards.write_shard, root, f"{split}/tokens-{c:06d}.zst", chunk.input_ids, ids_codec
        )
    return jobs


def _entry(c: int, split: str, chunk: ChunkRows, recs: dict) -> dict:
    """The progress-log line of a chunk whose files are all written."""
    entry = {"chunk": c, "split": split, "sequences": int(chunk.input_ids.shape[0]), "layers": {}}
    for n in chunk.rows:
        entry["layers"][str(n)] = {"shard": asdict(recs[("shard", n)]), "filters": asdict(chunk.counts[n])}
        if ("positions", n) in recs:
            entry["layers"][str(n)]["positions"] = asdict(recs[("positions", n)])
    if ("tokens", None) in recs:
        entry["token_ids"] = asdict(recs[("tokens", None)])
    return entry


class _Writer:
    """Writes chunks while the forward pass goes on: a pool of `threads` compresses, hashes and writes
    every file of a chunk at once (zstd, sha256 and file writes run without Python's lock), and a
    committer thread records chunks in the progress log in order, each once all its files are on disk.
    put() blocks while `depth` chunks wait, so memory stays flat however many chunks a run writes."""

    def __init__(
        self, root: Path, progress: _Progress, codec: Codec, store_tokens: bool, threads: int = 1, depth: int = 2
    ) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.bytes = 0
        self._root, self._codec, self._store_tokens = root, codec, store_tokens
        self._progress = progress
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="qscope-writer")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            c, split, chunk, jobs, state = item
            try:
                recs = {name: fut.result() for name, fut in jobs.items()}
                if self.error is None:
                    entry = _entry(c, split, chunk, recs)
                    self._progress.commit(entry, state)
                    self.bytes += sum(v["shard"]["nbytes"] for v in entry["layers"].values())
            except BaseException as e:  # surfaced to the producer on its next put/close
                if self.error is None:
                    self.error = e

    def put(self, item) -> None:
        """Queue (chunk index, split, ChunkRows, resume state after it) for writing."""
        if self.error:
            raise self.error
        c, split, chunk, state = item
        jobs = _submit_chunk(self._pool, self._root, c, split, chunk, self._codec, self._store_tokens)
        self.q.put((c, split, chunk, jobs, state))

    def close(self) -> None:
        self.q.put(None)
        self._thread.join()
        self._pool.shutdown(wait=True)
        if self.error:
            raise self.error


def build_cache(
    lm: LoadedLM,
    layer_ids: Sequence[int],
    cfg: DataConfig,
    root: Path,
    device: torch.device | str,
    progress: Callable[..., object],
    revision: str | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    digest: str | None = None,
) -> dict:
    """Write (or finish) the cache under root and return its manifest. `digest` is weights_digest() of the
    model when the caller has it (the cache stage computes it once and shares it across ranks)."""
    model_dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    digest = weights_digest(lm.name, revision) if digest is None else digest
    fp = cache_fingerprint(lm.name, revision, layer_ids, cfg, world, model_dtype, digest)
    if (root / shards.MANIFEST).is_file():
        old = shards.read_manifest(root)
        if old.get("fingerprint") == fp:
            return old
        raise InputError(
            f"{root} already holds a cache made with other settings; delete it or choose another run_dir "
            f"(differs: {fingerprint_diff(old.get('fingerprint') or {}, fp)})"
        )
    chunks = plan(cfg)
    total = chunks["train"].stop
    prog = _Progress(root, rank, fp)
    saved = prog.load() or {"next_chunk": 0, "stream": [0, 0], "medians": {}}
    start = saved["next_chunk"]
    medians = {s: {int(n): RunningMedian(m) for n, m in saved["medians"].get(s, {}).items()} for s in SPLITS}
    filters = {s: make_filter(lm, cfg, medians[s]) for s in SPLITS}
    stream = token_stream(load_text_dataset(cfg), lm.tokenizer, cfg, StreamState(*saved["stream"]))
    writer = _Writer(root, prog, codec_for(cfg), cfg.store_tokens, cfg.writer_pool())
    mine = [c for c in range(start, total) if c % world == rank]
    with progress(total=len(mine) * cfg.shard_tokens, desc=f"cache[rank {rank}]", unit="tok") as bar:
        try:
            for c, seqs in zip(range(start, total), chunked(stream, cfg.shard_sequences), strict=False):
                if c % world != rank:
                    continue
                split = split_of(c, chunks)
                chunk = forward_chunk(lm, layer_ids, seqs, cfg, filters[split], device, out_device="cpu")
                state = {
                    "next_chunk": c + 1,
                    "stream": list(chunk.state),
                    "medians": {s: {str(n): m.state() for n, m in medians[s].items()} for s in SPLITS},
                }
                writer.put((c, split, chunk, state))
                bar.update(len(seqs) * cfg.context_len)
                bar.set_postfix(written=f"{writer.bytes / 2**20:.1f}MiB")
        finally:
            writer.close()
    prog.finish()
    barrier()
    if rank == 0:
        shards.write_manifest(root, merge(root, lm, layer_ids, cfg, fp, world, revision))
    barrier()
    return shards.read_manifest(root)


def merge(root: Path, lm: LoadedLM, layer_ids, cfg: DataConfig, fp: dict, world: int, revision) -> dict:
    """One manifest from every rank's progress log: shards in chunk order, filter counts summed."""
    entries: dict[int, dict] = {}
    for r in range(world):
        p = _Progress(root, r, fp)
        state = p.load()
        if not state or not state.get("finished"):
            raise RuntimeError(f"rank {r} has not finished its part of the cache under {root}")
        mine = p.entries(state["next_chunk"])
        expected = set(range(r, state["next_chunk"], world))
        if not expected <= set(mine):
            raise RuntimeError(f"rank {r}'s progress log under {root} lacks chunks {sorted(expected - set(mine))[:10]}")
        entries.update(mine)
    splits = {}
    for split in SPLITS:
        mine = [entries[c] for c in sorted(entries) if entries[c]["split"] == split]
        if not mine:
            raise InputError(f"the dataset ran out before the {split} split got any sequences")
        layers = {}
        for n in layer_ids:
            counts = FilterCounts()
            for e in mine:
                counts.add(FilterCounts(**e["layers"][str(n)]["filters"]))
            layers[str(n)] = {
                "rows": counts.kept,
                "filters": asdict(counts),
                "shards": [e["layers"][str(n)]["shard"] for e in mine],
                **({"positions": [e["layers"][str(n)]["positions"] for e in mine]} if cfg.store_tokens else {}),
            }
        splits[split] = {
            "chunks": [e["chunk"] for e in mine],
            "sequences": sum(e["sequences"] for e in mine),
            "tokens": sum(e["sequences"] for e in mine) * cfg.context_len,
            "layers": layers,
            **({"token_ids": [e["token_ids"] for e in mine]} if cfg.store_tokens else {}),
        }
    codec = codec_for(cfg)
    compressed = sum(s["nbytes"] for sp in splits.values() for lay in sp["layers"].values() for s in lay["shards"])
    raw_rows = sum(lay["rows"] for sp in splits.values() for lay in sp["layers"].values())
    return {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "model": lm.name,
        "revision": revision,
        "d_model": lm.d_model,
        "layers": sorted(layer_ids),
        "codec": asdict(codec),
        "context_len": cfg.context_len,
        "world": world,
        "compressed_bytes": compressed,
        "raw_bytes": raw_rows * lm.d_model * codec.itemsize,
        "splits": splits,
    }
