import pytest
import torch

from qscope_train import shards
from qscope_train.shards import CorruptShardError, ShardWriter


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_written_equals_read_bitwise(tmp_path, dtype):
    x = torch.randn(1000, 24) * 5
    w = ShardWriter(tmp_path, "train/layer0", 24, dtype, shard_rows=300)
    w.add(x[:450])
    w.add(x[450:])
    recs = w.finish()
    assert [r.rows for r in recs] == [300, 300, 300, 100]
    back = torch.cat([shards.read_shard(tmp_path, r, 24, dtype) for r in recs])
    want = x.to(shards.STORE_DTYPES[dtype])
    assert back.dtype == want.dtype and torch.equal(back.view(torch.uint8), want.view(torch.uint8))


def _one_shard(tmp_path):
    return shards.write_shard(tmp_path, "eval/layer1/shard-00000.zst", torch.randn(64, 8), "bfloat16")


def test_corrupt_byte_names_the_shard(tmp_path):
    rec = _one_shard(tmp_path)
    path = tmp_path / rec.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard .*eval/layer1/shard-00000.zst is corrupt"):
        shards.read_shard(tmp_path, rec, 8, "bfloat16")


def test_truncated_shard_names_the_shard(tmp_path):
    rec = _one_shard(tmp_path)
    path = tmp_path / rec.file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match="shard-00000.zst is corrupt"):
        shards.read_shard(tmp_path, rec, 8, "bfloat16")


def test_missing_shard_is_named(tmp_path):
    rec = _one_shard(tmp_path)
    (tmp_path / rec.file).unlink()
    with pytest.raises(CorruptShardError, match="shard-00000.zst is missing"):
        shards.read_shard(tmp_path, rec, 8, "bfloat16")


def test_shuffled_epoch_visits_every_row_once(tmp_path):
    x = torch.arange(600, dtype=torch.float32).repeat_interleave(4).view(600, 4)
    w = ShardWriter(tmp_path, "t", 4, "float32", shard_rows=100)
    w.add(x)
    recs = w.finish()
    it = shards.iter_shuffled(tmp_path, recs, 4, "float32", batch_size=50, buffer_shards=2, seed=0)
    rows = torch.cat([next(it) for _ in range(12)])
    assert sorted(rows[:, 0].tolist()) == list(range(600))
    assert rows[:, 0].tolist() != list(range(600))  # shuffled


def test_ranks_read_disjoint_shards(tmp_path):
    w = ShardWriter(tmp_path, "t", 2, "float32", shard_rows=10)
    w.add(torch.arange(40, dtype=torch.float32).repeat_interleave(2).view(40, 2))
    recs = w.finish()
    seen = []
    for rank in range(2):
        it = shards.iter_shuffled(
            tmp_path, recs, 2, "float32", batch_size=10, buffer_shards=1, seed=0, rank=rank, world=2
        )
        seen.append(set(torch.cat([next(it) for _ in range(2)])[:, 0].tolist()))
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 40
