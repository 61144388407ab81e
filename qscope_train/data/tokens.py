"""Datasets to fixed-length token sequences, in a deterministic order that can resume exactly, and the
chunk plan that says which chunks of that stream are held out.

Two modes: `packed` joins documents with EOS and cuts every context_len tokens; `per_sequence`
gives each document (or chat conversation, rendered with the tokenizer's chat template) its own
right-padded sequence. The stream position after every sequence is a small StreamState.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import InputError
from .config import DataConfig, SequenceMode, TextFormat

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TOKENIZE_CHUNK = 256


class StreamState(NamedTuple):
    """The next token to read is token `offset` of document `doc` (counting from the stream start)."""

    doc: int = 0
    offset: int = 0


class Sequence(NamedTuple):
    input_ids: Tensor  # (context_len,) long
    attention_mask: Tensor  # (context_len,) bool; False on right padding
    state: StreamState  # the stream position after this sequence


def load_text_dataset(cfg: DataConfig):
    """A datasets.Dataset (or IterableDataset when streaming) from a local file/dir or a hub id."""
    import datasets

    path = Path(cfg.dataset).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
        kinds = {_BUILDERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise InputError(
                f"data.dataset={cfg.dataset!r}: expected one kind of .txt / .json / .jsonl / .parquet files, "
                f"found {[p.name for p in files][:10] or 'none'}"
            )
        ds = datasets.load_dataset(
            kinds.pop(), data_files=[str(p) for p in files], split="train", streaming=cfg.streaming
        )
    else:
        ds = datasets.load_dataset(cfg.dataset, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
    field = cfg.text_field
    columns = ds.column_names
    if columns is not None and field not in columns:
        raise InputError(f"data.text_field={field!r} is not a column of {cfg.dataset!r}; columns: {columns}")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed, buffer_size=10_000) if cfg.streaming else ds.shuffle(seed=cfg.seed)
    return ds


def _documents(ds, cfg: DataConfig, tokenizer, start_doc: int) -> Iterator[list[int]]:
    """Token ids of each document from index start_doc on (chat rendered with the template)."""
    rows = ds.skip(start_doc) if start_doc else ds
    field = cfg.text_field
    it = iter(rows)
    while chunk := list(islice(it, TOKENIZE_CHUNK)):
        if cfg.format is TextFormat.chat:
            texts = [tokenizer.apply_chat_template(row[field], tokenize=False) for row in chunk]
        else:
            texts = [row[field] or "" for row in chunk]
        yield from tokenizer(texts, add_special_tokens=False)["input_ids"]


def token_stream(ds, tokenizer, cfg: DataConfig, state: StreamState = StreamState()) -> Iterator[Sequence]:
    """Sequences of exactly cfg.context_len tokens, starting at `state`."""
    if cfg.mode is SequenceMode.packed:
        return _packed(ds, tokenizer, cfg, state)
    return _per_sequence(ds, tokenizer, cfg, state)


def _packed(ds, tokenizer, cfg: DataConfig, state: StreamState) -> Iterator[Sequence]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos_token_id, which packing needs as the document separator")
    T = cfg.context_len
    segments: deque[list] = deque()  # [doc index, tokens, offset of the first unread token]
    buffered = 0
    ones = torch.ones(T, dtype=torch.bool)
    for i, ids in enumerate(_documents(ds, cfg, tokenizer, state.doc)):
        doc = state.doc + i
        tokens = [*ids, eos]
        start = state.offset if doc == state.doc else 0
        if start >= len(tokens):
            continue
        segments.append([doc, tokens, start])
        buffered += len(tokens) - start
        while buffered >= T:
            out: list[int] = []
            while len(out) < T:
                seg = segments[0]
                take = min(T - len(out), len(seg[1]) - seg[2])
                out.extend(seg[1][seg[2] : seg[2] + take])
                seg[2] += take
                if seg[2] == len(seg[1]):
                    segments.popleft()
            buffered -= T
            after = StreamState(segments[0][0], segments[0][2]) if segments else StreamState(doc + 1, 0)
            yield Sequence(torch.tensor(out, dtype=torch.long), ones, after)


def _per_sequence(ds, tokenizer, cfg: DataConfig, state: StreamState) -> Iterator[Sequence]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("per_sequence mode pads sequences and needs a pad or eos token id")
    T = cfg.context_len
    for i, ids in enumerate(_documents(ds, cfg, tokenizer, state.doc)):
        if len(ids) < 2:
            continue
        ids = ids[:T]
        n = len(ids)
        input_ids = torch.full((T,), pad, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids, dtype=torch.long)
        mask = torch.zeros(T, dtype=torch.bool)
        mask[:n] = True
        yield Sequence(input_ids, mask, StreamState(state.doc + i + 1, 0))


def batched(seqs: Iterable[Sequence], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Stack sequences into (ids (B, T), mask (B, T)); the last batch may be smaller."""
    it = iter(seqs)
    while batch := list(islice(it, batch_size)):
        yield torch.stack([s.input_ids for s in batch]), torch.stack([s.attention_mask for s in batch])


def special_token_ids(tokenizer, extra: Iterable[int] = ()) -> list[int]:
    """Ids of every special token the tokenizer knows (BOS, EOS, PAD, chat markers, ...) plus `extra`."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(value)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    ids.update(extra)
    return sorted(ids)


def plan(cfg: DataConfig) -> dict[str, range]:
    """Global chunk indices of each split (a chunk is shard_tokens of sequences): the held-out chunks
    come first in the stream, so no training chunk ever precedes a held-out one."""
    per_chunk = cfg.shard_sequences * cfg.context_len
    n_eval, n_train = math.ceil(cfg.eval_tokens / per_chunk), math.ceil(cfg.train_tokens / per_chunk)
    return {"eval": range(0, n_eval), "train": range(n_eval, n_eval + n_train)}


def split_of(chunk: int, chunks: dict[str, range]) -> str:
    return next(s for s, r in chunks.items() if chunk in r)


def heldout_sequences(tokenizer, cfg: DataConfig, n_tokens: int) -> list[Sequence]:
    """The first sequences of the held-out split (the stream's first chunks), up to n_tokens tokens."""
    n_eval = len(plan(cfg)["eval"]) * cfg.shard_sequences
    n_seq = min(max(1, n_tokens // cfg.context_len), n_eval)
    seqs = list(islice(token_stream(load_text_dataset(cfg), tokenizer, cfg), n_seq))
    if not seqs:
        raise InputError(f"the dataset {cfg.dataset!r} gave no sequences for the spliced-loss evaluation")
    return seqs
