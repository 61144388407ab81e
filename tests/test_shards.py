import pytest
import torch

from qscope_train import shards
from qscope_train.shards import Codec, CorruptShardError


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
