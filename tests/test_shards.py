import pytest
import torch

from qscope_train.config import Verify
from qscope_train.data import shards
from qscope_train.data.shards import Codec, CorruptShardError


@pytest.mark.parametrize(
    "codec",
    [
        Codec("bfloat16", True),
        Codec("bfloat16", False),
        Codec("float16", True),
        Codec("float32", False),
        Codec("float32", True),
    ],
)
def test_written_equals_read_bitwise(tmp_path, codec):
    x = torch.randn(1000, 24) * 5
    rec = shards.write_shard(tmp_path, "train/layer0/shard-000000.zst", x, codec)
    back = shards.read_shard(tmp_path, rec, 24, codec)
    want = x.to(codec.torch_dtype)
    assert back.dtype == want.dtype and back.shape == (1000, 24)
    assert torch.equal(back.view(torch.uint8), want.view(torch.uint8))
    if codec.dtype == "bfloat16":  # the direct bf16 -> fp32 path gives the same values
        assert torch.equal(shards.read_shard(tmp_path, rec, 24, codec, torch.float32), want.float())


def test_byte_split_compresses_activation_like_bf16_better():
    x = torch.randn(4096, 256) * torch.rand(256) * 3
    plain, split = len(Codec("bfloat16", False).encode(x)), len(Codec("bfloat16", True).encode(x))
    assert split < plain


def _one_shard(tmp_path):
    return shards.write_shard(tmp_path, "eval/layer1/shard-000000.zst", torch.randn(64, 8), Codec())


def test_corrupt_byte_names_the_shard(tmp_path):
    rec = _one_shard(tmp_path)
    path = tmp_path / rec.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard .*eval/layer1/shard-000000.zst is corrupt"):
        shards.read_shard(tmp_path, rec, 8, Codec())


def test_truncated_shard_names_the_shard(tmp_path):
    rec = _one_shard(tmp_path)
    path = tmp_path / rec.file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match="shard-000000.zst is corrupt"):
        shards.read_shard(tmp_path, rec, 8, Codec())


def test_missing_shard_is_named(tmp_path):
    rec = _one_shard(tmp_path)
    (tmp_path / rec.file).unlink()
    with pytest.raises(CorruptShardError, match="shard-000000.zst is missing"):
        shards.read_shard(tmp_path, rec, 8, Codec())


@pytest.mark.parametrize("verify", list(Verify))
def test_no_damaged_bit_gives_wrong_rows(tmp_path, verify):
    """Flip every bit of a shard in turn (frame header, blocks, stored checksum). sha256 mode refuses every
    flip; frame mode refuses every flip that changes a decoded byte (a few bits zstd ignores, such as the
    header's unused bit, leave the content intact and are let through)."""
    codec = Codec(frame_checksum=True)
    x = torch.randn(64, 8) * torch.rand(8) * 3
    rec = shards.write_shard(tmp_path, "train/layer1/shard-000000.zst", x, codec)
    path = tmp_path / rec.file
    good, want = path.read_bytes(), x.to(torch.bfloat16)
    assert torch.equal(shards.read_shard(tmp_path, rec, 8, codec, verify=verify), want)
    refused = 0
    for i in range(len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            path.write_bytes(bytes(bad))
            try:
                got = shards.read_shard(tmp_path, rec, 8, codec, verify=verify)
            except CorruptShardError as e:
                assert "shard-000000.zst is corrupt" in str(e)
                refused += 1
            else:
                assert verify is Verify.frame and torch.equal(got, want), f"byte {i} bit {bit}"
    assert refused >= (8 * len(good) if verify is Verify.sha256 else 8 * len(good) - 8)


def test_frame_mode_uses_sha256_for_shards_without_a_frame_checksum(tmp_path):
    """An old shard (no checksum in its frame) is still checked in frame mode: by its sha256."""
    codec = Codec(frame_checksum=False)
    rec = shards.write_shard(tmp_path, "train/layer1/shard-000000.zst", torch.randn(64, 8), codec)
    path = tmp_path / rec.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last literal: without a frame checksum only the sha256 can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="its sha256 is"):
        shards.read_shard(tmp_path, rec, 8, codec, verify=Verify.frame)


def test_frame_header_must_announce_a_checksum(tmp_path):
    """A frame written without a checksum where the codec says there is one is refused, not read unchecked."""
    rec = shards.write_shard(tmp_path, "train/layer1/shard-000000.zst", torch.randn(64, 8), Codec())
    with pytest.raises(CorruptShardError, match="without a checksum"):
        shards.read_shard(tmp_path, rec, 8, Codec(frame_checksum=True), verify=Verify.frame)
