"""Activation shards on disk: zstd-compressed row-major tensors, a sha256 per shard, a JSON manifest.

This module knows nothing about models: it stores (rows, width) tensors and reads them back,
verified, in order or shuffled through a bounded buffer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import zstandard
from torch import Tensor

from .fsutil import atomic_write_bytes, atomic_write_json, read_json

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"


class CorruptShardError(RuntimeError):
    """A shard whose bytes do not match the manifest (checksum, size or decompression)."""


@dataclass(frozen=True)
class ShardRecord:
    file: str  # relative to the cache root
    rows: int
    sha256: str
    nbytes: int


def _to_bytes(x_ND: Tensor, dtype: str) -> bytes:
    t = x_ND.detach().to(device="cpu", dtype=STORE_DTYPES[dtype]).contiguous()
    return t.view(torch.uint8).numpy().tobytes()


def write_shard(root: Path, rel: str, x_ND: Tensor, dtype: str, level: int = 3) -> ShardRecord:
    data = zstandard.ZstdCompressor(level=level).compress(_to_bytes(x_ND, dtype))
    atomic_write_bytes(root / rel, data)
    return ShardRecord(rel, int(x_ND.shape[0]), hashlib.sha256(data).hexdigest(), len(data))


def read_shard(root: Path, rec: ShardRecord, width: int, dtype: str) -> Tensor:
    """Load one shard as a (rows, width) tensor of the stored dtype, after checking its checksum."""
    path = root / rec.file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptShardError(f"shard {path} is missing (listed in {root / MANIFEST})") from None
    if len(data) != rec.nbytes or hashlib.sha256(data).hexdigest() != rec.sha256:
        raise CorruptShardError(
            f"shard {path} is corrupt: {len(data)} bytes with sha256 {hashlib.sha256(data).hexdigest()[:12]}…, "
            f"manifest says {rec.nbytes} bytes with sha256 {rec.sha256[:12]}…"
        )
    torch_dtype = STORE_DTYPES[dtype]
    expected = rec.rows * width * torch.finfo(torch_dtype).bits // 8
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise CorruptShardError(f"shard {path} does not decompress: {e}") from None
    if len(raw) != expected:
        raise CorruptShardError(
            f"shard {path} holds {len(raw)} bytes, expected {expected} ({rec.rows}×{width} {dtype})"
        )
    flat = torch.from_numpy(np.frombuffer(bytearray(raw), dtype=np.uint8))
    return flat.view(torch_dtype).view(rec.rows, width)


class ShardWriter:
    """Buffers rows for one stream (e.g. train/layer3) and writes shards of exactly shard_rows rows."""

    def __init__(self, root: Path, prefix: str, width: int, dtype: str, shard_rows: int) -> None:
        self.root, self.prefix, self.width, self.dtype, self.shard_rows = root, prefix, width, dtype, shard_rows
        self.records: list[ShardRecord] = []
        self._pending: list[Tensor] = []
        self._pending_rows = 0

    def add(self, x_ND: Tensor) -> None:
        if x_ND.shape[-1] != self.width:
            raise ValueError(f"{self.prefix}: rows of width {x_ND.shape[-1]}, expected {self.width}")
        self._pending.append(x_ND.detach().to("cpu", STORE_DTYPES[self.dtype]))
        self._pending_rows += x_ND.shape[0]
        while self._pending_rows >= self.shard_rows:
            rows = torch.cat(self._pending)
            self._write(rows[: self.shard_rows])
            rest = rows[self.shard_rows :]
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> list[ShardRecord]:
        if self._pending_rows:
            self._write(torch.cat(self._pending))
            self._pending, self._pending_rows = [], 0
        return self.records

    def _write(self, rows: Tensor) -> None:
        rel = f"{self.prefix}/shard-{len(self.records):05d}.zst"
        self.records.append(write_shard(self.root, rel, rows, self.dtype))


def write_manifest(root: Path, manifest: dict) -> Path:
    return atomic_write_json(root / MANIFEST, manifest)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no activation cache at {root} ({MANIFEST} missing): run the cache stage first")
    return read_json(path)


def records(entries: Sequence[dict]) -> list[ShardRecord]:
    return [ShardRecord(**e) for e in entries]


def as_dicts(recs: Sequence[ShardRecord]) -> list[dict]:
    return [asdict(r) for r in recs]


def iter_rows(root: Path, recs: Sequence[ShardRecord], width: int, dtype: str, batch_size: int) -> Iterator[Tensor]:
    """Every row once, in stored order, as fp32 batches of up to batch_size rows."""
    for rec in recs:
        shard = read_shard(root, rec, width, dtype)
        for start in range(0, shard.shape[0], batch_size):
            yield shard[start : start + batch_size].float()


def iter_shuffled(
    root: Path,
    recs: Sequence[ShardRecord],
    width: int,
    dtype: str,
    batch_size: int,
    buffer_shards: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """Endless fp32 batches: shard order shuffled per epoch, rows shuffled within a buffer of shards.

    Rank r of `world` reads shards r, r+world, ...; memory is bounded by buffer_shards shards.
    """
    mine = list(recs)[rank::world]
    if not mine:
        raise ValueError(f"rank {rank} of {world} has no shards to read (cache has {len(recs)})")
    g = generator or torch.Generator().manual_seed(seed)
    carry = torch.empty(0, width)
    while True:
        order = torch.randperm(len(mine), generator=g).tolist()
        for start in range(0, len(order), buffer_shards):
            group = [read_shard(root, mine[i], width, dtype).float() for i in order[start : start + buffer_shards]]
            rows = torch.cat([carry, *group])
            rows = rows[torch.randperm(rows.shape[0], generator=g)]
            n_full = rows.shape[0] // batch_size * batch_size
            for b in range(0, n_full, batch_size):
                yield rows[b : b + batch_size]
            carry = rows[n_full:]
