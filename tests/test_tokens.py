import torch
from transformers import AutoTokenizer

from qscope_train.activations import TokenFilter
from qscope_train.config import DataConfig
from qscope_train.tokens import iter_texts, load_text_dataset, packed_blocks, special_token_ids, split_blocks


def test_packing_gives_fixed_blocks_with_eos_between_documents(fixtures_dir):
    tok = AutoTokenizer.from_pretrained(fixtures_dir / "tiny-qwen3")
    texts = ["alpha beta", "gamma", "delta epsilon zeta"] * 20
    blocks = list(packed_blocks(texts, tok, 16))
    assert blocks and all(b.shape == (16,) for b in blocks)
    flat = torch.cat(blocks).tolist()
    assert flat.count(tok.eos_token_id) >= len(blocks)
    assert flat == torch.cat(list(packed_blocks(texts, tok, 16))).tolist()  # deterministic


def test_eval_blocks_come_first_and_are_disjoint(fixtures_dir):
    blocks = iter([torch.full((4,), i) for i in range(10)])
    eval_blocks, train = split_blocks(blocks, 3, 5)
    assert [int(b[0]) for b in eval_blocks] == [0, 1, 2]
    assert [int(b[0]) for b in train] == [3, 4, 5, 6, 7]


def test_local_jsonl_dataset_and_bad_column(fixtures_dir):
    cfg = DataConfig(dataset=str(fixtures_dir / "corpus.jsonl"))
    first = next(iter_texts(load_text_dataset(cfg), "text"))
    assert isinstance(first, str) and len(first) > 10
    import pytest

    with pytest.raises(ValueError, match="data.text_field='body' is not a column"):
        load_text_dataset(DataConfig(dataset=str(fixtures_dir / "corpus.jsonl"), text_field="body"))


def test_filters_drop_position0_specials_and_outliers(fixtures_dir):
    tok = AutoTokenizer.from_pretrained(fixtures_dir / "tiny-qwen3")
    assert tok.eos_token_id in special_token_ids(tok)
    filt = TokenFilter(DataConfig(dataset="x", outlier_norm_factor=10.0), special_token_ids(tok))
    ids = torch.tensor([[5, 6, tok.eos_token_id, 7], [tok.eos_token_id, 8, 9, 10]])
    keep, n_pos0, n_special = filt.token_mask(ids)
    assert (n_pos0, n_special) == (2, 1)
    assert keep.tolist() == [[False, True, False, True], [False, True, True, True]]
    x = torch.ones(10, 4)
    x[3] *= 1000
    assert filt.outlier_mask(x).tolist() == [i != 3 for i in range(10)]
