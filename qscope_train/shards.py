"""Activation shards on disk: zstd-compressed row-major tensors with a sha256 each, and JSON manifests.

This module knows nothing about models. 16-bit values can be stored byte-split (all low bytes,
then all high bytes), which zstd compresses better because the high bytes (sign, exponent) repeat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from torch import Tensor

from .errors import MissingInputError, QScopeError
from .fsutil import atomic_write_bytes, atomic_write_json, read_json

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32}
MANIFEST = "manifest.json"


class CorruptShardError(QScopeError, RuntimeError):
    """A shard whose bytes do not match the manifest (checksum, size or decompression)."""


@dataclass(frozen=True)
class Codec:
    dtype: str = "bfloat16"
    byte_split: bool = True
    level: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def encode(self, x: Tensor) -> bytes:
        """Compress a tensor (any shape) as this codec's dtype, in row-major order."""
        t = x.detach().to(device="cpu", dtype=self.torch_dtype).contiguous()
        raw = t.view(torch.uint8).numpy()
        if self.byte_split and self.itemsize == 2:
            raw = raw.reshape(-1, 2).T  # plane 0: low bytes, plane 1: high bytes (little endian)
        return zstandard.ZstdCompressor(level=self.level).compress(np.ascontiguousarray(raw).tobytes())

    def decode(self, data: bytes, numel: int, out_dtype: torch.dtype | None = None) -> Tensor:
        """Inverse of encode as a flat tensor of the stored dtype (or straight to out_dtype)."""
        nbytes = numel * self.itemsize
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"decompressed to {len(raw)} bytes, expected {nbytes}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if self.byte_split and self.itemsize == 2:
            lo, hi = flat[:numel], flat[numel:]
            if self.dtype == "bfloat16" and out_dtype == torch.float32:
                # bf16 is the top half of fp32: assemble the fp32 bit pattern directly.
                return ((hi.to(torch.int32) << 24) | (lo.to(torch.int32) << 16)).view(torch.float32)
            value = ((hi.to(torch.int16) << 8) | lo.to(torch.int16)).view(self.torch_dtype)
        else:
            value = flat.view(self.torch_dtype)
        return value if out_dtype is None else value.to(out_dtype)


@dataclass(frozen=True)
class ShardRecord:
    file: str  # relative to the cache root
    rows: int
    sha256: str
    nbytes: int  # compressed size


def write_shard(root: Path, rel: str, x: Tensor, codec: Codec) -> ShardRecord:
    data = codec.encode(x)
    atomic_write_bytes(root / rel, data)
    return ShardRecord(rel, int(x.shape[0]), hashlib.sha256(data).hexdigest(), len(data))


def read_shard(root: Path, rec: ShardRecord, width: int, codec: Codec, out_dtype: torch.dtype | None = None) -> Tensor:
    """Load one shard as (rows, width), after checking its size and sha256 against the record."""
    path = root / rec.file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptShardError(f"shard {path} is missing (listed in {root / MANIFEST})") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != rec.nbytes or digest != rec.sha256:
        raise CorruptShardError(
            f"shard {path} is corrupt: {len(data)} bytes with sha256 {digest[:12]}…, "
            f"the manifest says {rec.nbytes} bytes with sha256 {rec.sha256[:12]}…"
        )
    try:
        return codec.decode(data, rec.rows * width, out_dtype).view(rec.rows, width)
    except (zstandard.ZstdError, ValueError) as e:
        raise CorruptShardError(f"shard {path} does not decode: {e}") from None


def write_manifest(root: Path, manifest: dict, name: str = MANIFEST) -> Path:
    return atomic_write_json(root / name, manifest)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise MissingInputError(f"no activation cache at {root} ({MANIFEST} missing): run the cache stage first")
    return read_json(path)


def records(entries: Sequence[dict]) -> list[ShardRecord]:
    return [ShardRecord(**e) for e in entries]


def as_dicts(recs: Sequence[ShardRecord]) -> list[dict]:
    return [asdict(r) for r in recs]
