"""Datasets to fixed-length token blocks: documents tokenized, joined with EOS, and packed.

The first blocks of the stream form the held-out split and the rest the training split, so no
evaluation sequence is ever trained on. The order is deterministic for a given dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from .config import DataConfig

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_text_dataset(cfg: DataConfig):
    """A datasets.Dataset (or IterableDataset when streaming) from a local file/dir or a hub id."""
    import datasets

    path = Path(cfg.dataset).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
        kinds = {_BUILDERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise ValueError(
                f"data.dataset={cfg.dataset!r}: expected one kind of .txt / .json / .jsonl / .parquet files, "
                f"found {[p.name for p in files][:10] or 'none'}"
            )
        ds = datasets.load_dataset(
            kinds.pop(), data_files=[str(p) for p in files], split="train", streaming=cfg.streaming
        )
    else:
        ds = datasets.load_dataset(cfg.dataset, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.dataset!r}; columns: {columns}")
    return ds


def iter_texts(ds, text_field: str) -> Iterator[str]:
    for row in ds:
        text = row[text_field]
        if text:
            yield text


def packed_blocks(texts: Iterable[str], tokenizer, context_len: int, chunk: int = 256) -> Iterator[Tensor]:
    """Yield LongTensor blocks of exactly context_len tokens; documents are separated by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, which packing needs as the document separator")
    buf: list[int] = []
    it = iter(texts)
    while batch := list(islice(it, chunk)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(eos)
        while len(buf) >= context_len:
            yield torch.tensor(buf[:context_len], dtype=torch.long)
            del buf[:context_len]


def split_blocks(blocks: Iterator[Tensor], n_eval: int, n_train: int) -> tuple[list[Tensor], Iterator[Tensor]]:
    """The first n_eval blocks (held out) and an iterator over the next n_train blocks."""
    eval_blocks = list(islice(blocks, n_eval))
    if len(eval_blocks) < n_eval:
        raise ValueError(f"the dataset ran out after {len(eval_blocks)} sequences; the held-out split needs {n_eval}")
    return eval_blocks, islice(blocks, n_train)


def batched(blocks: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stack blocks into (batch_size, context_len) LongTensors; the last batch may be smaller."""
    it = iter(blocks)
    while batch := list(islice(it, batch_size)):
        yield torch.stack(batch)


def special_token_ids(tokenizer) -> list[int]:
    """Ids of every special token the tokenizer knows (BOS, EOS, PAD, chat markers, ...)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(value)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    return sorted(ids)
