"""Activation shards on disk: zstd-compressed row-major tensors with a sha256 each, and JSON manifests.

This module knows nothing about models. 16-bit values can be stored byte-split (all low bytes,
then all high bytes), which zstd compresses better because the high bytes (sign, exponent) repeat.
Each shard is one zstd frame that carries its content size and zstd's own content checksum, so a
reader can verify a shard while decoding it (Verify.frame) instead of hashing the file first.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from torch import Tensor

from ..errors import MissingInputError, QScopeError
from ..fsutil import atomic_write_bytes, atomic_write_json, read_json
from .config import Verify

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32}
MANIFEST = "manifest.json"


class CorruptShardError(QScopeError, RuntimeError):
    """A shard whose bytes do not match the manifest (checksum, size or decompression)."""


@dataclass(frozen=True)
class Codec:
    dtype: str = "bfloat16"
    byte_split: bool = True
    level: int = 1
    frame_checksum: bool = False  # the frame carries zstd's content checksum (caches of format 3 on)

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
        zc = zstandard.ZstdCompressor(level=self.level, write_checksum=self.frame_checksum, write_content_size=True)
        return zc.compress(np.ascontiguousarray(raw))  # compress reads the array's buffer: no bytes copy

    @property
    def planes(self) -> int:
        """Byte planes a decoded shard keeps apart: 2 for byte-split 16-bit values, else 1."""
        return 2 if self.byte_split and self.itemsize == 2 else 1

    def decode_planes(self, data, rows: int, width: int) -> Tensor:
        """Decompress into (planes, rows, width): uint8 low/high byte planes when byte-split, else the stored dtype.

        Rows can be gathered from the planes without ever interleaving the whole shard; to_values()
        assembles only the rows that are used.
        """
        nbytes = rows * width * self.itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            got = 0
            while got < nbytes and (n := reader.readinto(view[got:])):
                got += n
            if got != nbytes or reader.read(1):
                raise ValueError(
                    f"decompressed to {'more than ' if got == nbytes else ''}{got} bytes, expected {nbytes}"
                )
        if self.planes == 2:
            return buf.view(2, rows, width)
        return buf.view(self.torch_dtype).view(1, rows, width)

    def to_values(self, planes_PND: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """(planes, N, width) from decode_planes (or a subset of its rows) -> (N, width) values."""
        if planes_PND.shape[0] == 1:
            value = planes_PND[0]
            return value if out_dtype is None else value.to(out_dtype)
        lo, hi = planes_PND[0], planes_PND[1]
        if self.dtype == "bfloat16" and out_dtype == torch.float32:
            # bf16 is the top half of fp32: place its two bytes into zeroed fp32 words directly.
            words = torch.zeros(*lo.shape, 4, dtype=torch.uint8, device=lo.device)
            words[..., 2] = lo
            words[..., 3] = hi
            return words.view(torch.float32).view(lo.shape)
        pairs = torch.stack([lo, hi], dim=-1)
        value = pairs.view(self.torch_dtype).view(lo.shape)
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


def read_shard_planes(root: Path, rec: ShardRecord, width: int, codec: Codec, verify: Verify = Verify.sha256) -> Tensor:
    """Load one shard as (planes, rows, width) (see Codec.decode_planes) after checking it as `verify` says.

    Verify.frame costs nothing beyond the decode: zstd hashes the decoded bytes (XXH64) and compares them
    with the checksum stored at the end of the frame, and the frame header must announce that checksum
    and the exact content size, so a damaged header cannot switch the check off. It is a 32-bit check,
    as strong against accidental damage as a CRC32; Verify.sha256 adds the manifest's sha256 of the file
    (about 1 µs per 1024-wide row on a 2-core VM).
    """
    with _mapped(root, rec) as (path, data):
        if verify is Verify.sha256 or not codec.frame_checksum:
            _check_sha256(path, data, rec)
        else:
            _check_frame_header(path, data, rec.rows * width * codec.itemsize)
        try:
            return codec.decode_planes(data, rec.rows, width)
        except (zstandard.ZstdError, ValueError) as e:
            raise CorruptShardError(f"shard {path} is corrupt: it does not decode ({e})") from None


@contextmanager
def _mapped(root: Path, rec: ShardRecord) -> Iterator[tuple[Path, bytes | mmap.mmap]]:
    """(path, the file's bytes memory-mapped) once the file exists and has the recorded size."""
    path = root / rec.file
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except FileNotFoundError:
        raise CorruptShardError(f"shard {path} is missing (listed in {root / MANIFEST})") from None
    try:
        if size != rec.nbytes:
            raise CorruptShardError(f"shard {path} is corrupt: {size} bytes, the manifest says {rec.nbytes}")
        yield path, data
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _check_sha256(path: Path, data, rec: ShardRecord) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec.sha256:
        raise CorruptShardError(
            f"shard {path} is corrupt: its sha256 is {digest[:12]}…, the manifest says {rec.sha256[:12]}…"
        )


def _check_frame_header(path: Path, data, nbytes: int) -> None:
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as e:
        raise CorruptShardError(f"shard {path} is corrupt: its zstd frame header does not parse ({e})") from None
    if not params.has_checksum or params.content_size != nbytes:
        raise CorruptShardError(
            f"shard {path} is corrupt: its zstd frame header announces {params.content_size} bytes "
            f"{'with' if params.has_checksum else 'without'} a checksum, expected {nbytes} bytes with one"
        )


def read_shard(
    root: Path,
    rec: ShardRecord,
    width: int,
    codec: Codec,
    out_dtype: torch.dtype | None = None,
    verify: Verify = Verify.sha256,
) -> Tensor:
    """Load one shard as (rows, width) values, after checking it against the record (see read_shard_planes)."""
    return codec.to_values(read_shard_planes(root, rec, width, codec, verify), out_dtype)


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


def listed_records(manifest: dict) -> Iterator[ShardRecord]:
    """Every file a manifest lists: activation shards, and token ids and positions where stored."""
    for split in manifest["splits"].values():
        yield from records(split.get("token_ids", []))
        for layer in split["layers"].values():
            yield from records(layer["shards"])
            yield from records(layer.get("positions", []))


def verify_cache(root: Path, progress=None) -> tuple[int, list[str]]:
    """Check every listed file's size and sha256 against the manifest: (files checked, one message per bad file)."""
    recs = list(listed_records(read_manifest(root)))
    bad = []
    for rec in recs if progress is None else progress(recs):
        try:
            with _mapped(root, rec) as (path, data):
                _check_sha256(path, data, rec)
        except CorruptShardError as e:
            bad.append(str(e))
    return len(recs), bad


def main(argv: Sequence[str] | None = None) -> int:
    """python -m qscope_train.data.shards verify CACHE_DIR: the full sha256 check, e.g. after copying a cache."""
    parser = argparse.ArgumentParser(prog="python -m qscope_train.data.shards", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every file of a cache against its manifest").add_argument("cache")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    try:
        total, bad = verify_cache(
            Path(args.cache), lambda recs: tqdm(recs, desc="verify", unit="file", file=sys.stderr)
        )
    except QScopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in bad:
        print(f"corrupt: {line}")
    print(f"{total - len(bad)} of {total} files match the manifest under {args.cache}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
