import json

import pytest
import torch
from transformers import AutoTokenizer

from qscope_train.config import DataConfig, SequenceMode, TextFormat
from qscope_train.data.activations import ActivationFilter, RunningMedian
from qscope_train.data.tokens import StreamState, load_text_dataset, special_token_ids, token_stream


@pytest.fixture(scope="module")
def tok(fixtures_dir):
    return AutoTokenizer.from_pretrained(fixtures_dir / "tiny-qwen3")


def _cfg(fixtures_dir, **kw):
    return DataConfig(dataset=str(fixtures_dir / "corpus.jsonl"), context_len=32, **kw)


def test_packed_sequences_are_full_and_separated_by_eos(fixtures_dir, tok):
    cfg = _cfg(fixtures_dir)
    seqs = [s for _, s in zip(range(50), token_stream(load_text_dataset(cfg), tok, cfg), strict=False)]
    assert all(s.input_ids.shape == (32,) and s.attention_mask.all() for s in seqs)
    flat = torch.cat([s.input_ids for s in seqs]).tolist()
    assert flat.count(tok.eos_token_id) >= 5
    first_doc = json.loads((fixtures_dir / "corpus.jsonl").read_text().splitlines()[0])["text"]
    assert flat[: len(tok(first_doc)["input_ids"])] == tok(first_doc)["input_ids"]


def test_stream_resumes_exactly_from_any_state(fixtures_dir, tok):
    cfg = _cfg(fixtures_dir)
    ds = load_text_dataset(cfg)
    full = [s for _, s in zip(range(40), token_stream(ds, tok, cfg), strict=False)]
    for cut in (1, 7, 23):
        resumed = [s for _, s in zip(range(40 - cut), token_stream(ds, tok, cfg, full[cut - 1].state), strict=False)]
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(full[cut:], resumed, strict=True))


def test_shuffle_is_deterministic_for_a_seed(fixtures_dir, tok):
    def first(seed):
        cfg = _cfg(fixtures_dir, shuffle=True, seed=seed)
        return next(iter(token_stream(load_text_dataset(cfg), tok, cfg))).input_ids

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))


def test_chat_conversations_get_one_padded_sequence_each(fixtures_dir, tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    convs = [
        [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
        for i in range(5)
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = DataConfig(
        dataset=str(path), text_field="messages", format=TextFormat.chat, mode=SequenceMode.per_sequence, context_len=64
    )
    seqs = list(token_stream(load_text_dataset(cfg), tok, cfg))
    assert len(seqs) == 5 and [s.state for s in seqs] == [StreamState(i + 1, 0) for i in range(5)]
    rendered = tok.apply_chat_template(convs[2], tokenize=False)
    n = int(seqs[2].attention_mask.sum())
    assert seqs[2].input_ids[:n].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assert (seqs[2].input_ids[n:] == tok.pad_token_id).all() and n < 64


def test_bad_column_is_named(fixtures_dir):
    with pytest.raises(ValueError, match="data.text_field='body' is not a column"):
        load_text_dataset(_cfg(fixtures_dir, text_field="body"))


def test_filters_drop_position0_padding_specials_and_outliers(tok):
    filt = ActivationFilter(DataConfig(dataset="x", drop_token_ids=[9]), special_token_ids(tok))
    ids = torch.tensor([[5, 6, tok.eos_token_id, 7], [tok.eos_token_id, 8, 9, 10]])
    attn = torch.tensor([[True, True, True, True], [True, True, True, False]])
    keep, c = filt.token_mask(ids, attn)
    assert (c.dropped_position0, c.dropped_padding, c.dropped_special) == (2, 1, 2)
    assert keep.tolist() == [[False, True, False, True], [False, True, False, False]]
    x = torch.ones(10, 4)
    x[3] *= 1000
    assert filt.norm_mask(0, x).tolist() == [i != 3 for i in range(10)]


def test_running_median_is_close_and_restores_exactly():
    m = RunningMedian()
    values = torch.rand(10001) * 100 + 1
    m.update(values[:5000])
    restored = RunningMedian(m.state())
    m.update(values[5000:])
    restored.update(values[5000:])
    assert m.median() == restored.median()
    assert abs(m.median() / values.median().item() - 1) < 0.01
