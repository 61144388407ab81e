"""The delphi latent cache writer on planted codes: split names and bounds, dtypes, the order delphi's
constructor needs, and every value back through a reader restated from delphi's loader."""

import json

import torch

from qscope_train.delphi import LatentCache, read_split, split_bounds


def test_split_bounds_are_delphis_inclusive_linspace_ranges():
    assert split_bounds(40, 3) == [(0, 12), (13, 25), (26, 39)]
    assert split_bounds(131072, 5)[:2] == [(0, 26213), (26214, 52427)]


def _planted(width, seqs, T, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (seqs, T), generator=g)
    positions = torch.randperm(seqs * T, generator=g)[: seqs * T // 2].sort().values  # the kept rows
    idx = torch.stack([torch.randperm(width, generator=g)[:k] for _ in range(positions.numel())])
    val = torch.randn(positions.numel(), k, generator=g)
    val[:, 0] = 0.0  # a selected latent at 0 is not an activation
    return ids, positions, idx, val


def test_every_kept_value_reads_back_at_its_sequence_position_and_latent(tmp_path):
    width, T, k = 200_000, 8, 4  # latents past 2^16 need uint32 locations
    cache = LatentCache({3: width})
    want, all_ids = {}, []
    for seed in (0, 1):  # two chunks: the second's sequences continue the first's
        ids, positions, idx, val = _planted(width, 5, T, k, seed)
        seq0 = cache.add_tokens(ids)
        cache.add_codes(3, seq0, T, positions, idx, val)
        all_ids.append(ids)
        for p, fi, vi in zip(positions.tolist(), idx.tolist(), val.tolist(), strict=True):
            want.update({(seq0 + p // T, p % T, f): v for f, v in zip(fi, vi, strict=True) if v != 0})
    written = cache.write(tmp_path, 2, {"model_name": "tiny"})
    assert written == {3: len(want)}
    where = tmp_path / "latents" / "layers.3"
    assert json.loads((where / "config.json").read_text())["n_splits"] == 2
    got = {}
    for start, end in split_bounds(width, 2):
        loc, act, tok = read_split(where / f"{start}_{end}.safetensors")
        assert torch.equal(tok, torch.cat(all_ids))
        assert act.dtype == torch.float16
        assert ((loc[:, 2] >= start) & (loc[:, 2] <= end)).all()
        key = loc[:, 2] * 2**40 + loc[:, 0] * 2**20 + loc[:, 1]
        assert bool((key[1:] > key[:-1]).all())  # (sequence, position) ascending within each latent
        got.update({tuple(r): v for r, v in zip(loc.tolist(), act.float().tolist(), strict=True)})
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert abs(got[key] - v) <= 1e-3 * max(1.0, abs(v))


def test_small_caches_use_uint16_locations(tmp_path):
    from safetensors.numpy import load_file

    cache = LatentCache({1: 64})
    ids, positions, idx, val = _planted(64, 3, 4, 2, 5)
    cache.add_codes(1, cache.add_tokens(ids), 4, positions, idx, val)
    cache.write(tmp_path, 1, {})
    assert str(load_file(str(tmp_path / "latents" / "layers.1" / "0_63.safetensors"))["locations"].dtype) == "uint16"
