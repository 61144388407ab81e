"""Configs of the activation path: DataConfig decides the cached bytes (tokens, filters, storage),
ReaderConfig how the fit stage gets its batches (the cache or the model, shuffling, checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from ..errors import ConfigError
from ..schema import MISSING, DType, operational


class SequenceMode(Enum):
    """How documents become fixed-length sequences."""

    packed = "packed"  # documents joined with EOS and cut every context_len tokens
    per_sequence = "per_sequence"  # one document / conversation per sequence, right-padded


class TextFormat(Enum):
    text = "text"  # text_field holds a string
    chat = "chat"  # text_field holds a list of {role, content} messages, rendered with the chat template


class ActivationSource(Enum):
    cache = "cache"  # train from the shards written by the cache stage
    live = "live"  # run the model during training; nothing is written to disk


class OnCorrupt(Enum):
    error = "error"  # stop with an error naming the shard
    skip = "skip"  # warn, leave the shard out, and go on


class Verify(Enum):
    """How a reader checks a shard before using its rows (the size is always checked)."""

    frame = "frame"  # zstd's content checksum, checked while decoding (sha256 for shards without one)
    sha256 = "sha256"  # sha256 of the whole file against the manifest, then decode (and the frame checksum)


@dataclass
class DataConfig:
    """Where tokens come from, which activations are kept, and how they are stored: everything here
    decides the cached bytes (how they are read back is ReaderConfig)."""

    dataset: str = MISSING
    """Hub dataset id, or a local .txt / .json / .jsonl / .parquet file or a directory of them."""
    config_name: Optional[str] = None
    """Dataset configuration (subset) name on the hub, e.g. sample-10BT."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Column holding the document text (or, with format=chat, the list of messages)."""
    format: TextFormat = TextFormat.text
    """text: plain documents; chat: conversations rendered with the tokenizer's chat template."""
    mode: SequenceMode = SequenceMode.packed
    """packed: documents joined with EOS; per_sequence: one document / conversation per sequence."""
    streaming: bool = False
    """Stream the dataset instead of downloading it whole (large hub datasets)."""
    shuffle: bool = False
    """Shuffle documents with `seed` before tokenizing (streaming uses a 10k-document buffer)."""
    seed: int = 0
    """Seed of the document shuffle; the stream order is deterministic for a given seed."""
    context_len: int = 1024
    """Tokens per sequence fed to the model."""
    train_tokens: int = 10_000_000
    """Sequence tokens to run through the model for the training split (before filters)."""
    eval_tokens: int = 262_144
    """Sequence tokens for the held-out split; taken from sequences never used for training."""
    forward_batch_tokens: int = 16384
    """Tokens per language-model forward pass (a multiple of context_len is used)."""
    shard_tokens: int = 65536
    """Sequence tokens per cache shard (rounded down to whole sequences); every layer is cut alike."""
    cache_dtype: DType = DType.bfloat16
    """Dtype of cached (and live) activations."""
    byte_split: bool = True
    """Store the high and low bytes of 16-bit values apart, which compresses better."""
    zstd_level: int = 1
    """zstandard level of the shards."""
    store_tokens: bool = False
    """Also store token ids and, per layer, the position of every kept row."""
    writer_threads: int = operational(0)
    """Threads that compress, hash and write the cache's shards (one job per layer's shard); 0: one per
    CPU core, at most 8. The shards' bytes do not depend on it."""
    drop_first_position: bool = True
    """Drop position 0 of each sequence (the attention sink, norm far above the rest)."""
    drop_special_tokens: bool = True
    """Drop activations at the tokenizer's special tokens (BOS/EOS/PAD and other added specials)."""
    drop_token_ids: list[int] = field(default_factory=list)
    """Further token ids whose activations are dropped."""
    outlier_norm_factor: float = 10.0
    """Drop activations whose norm exceeds this multiple of the layer's running median norm; 0 disables."""

    def __post_init__(self) -> None:
        for name in (
            "context_len",
            "train_tokens",
            "eval_tokens",
            "forward_batch_tokens",
            "shard_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.context_len < 2:
            raise ConfigError(f"data.context_len must be at least 2, got {self.context_len}")
        if self.shard_tokens < self.context_len:
            raise ConfigError(
                f"data.shard_tokens ({self.shard_tokens}) must hold at least one sequence of {self.context_len}"
            )
        if self.outlier_norm_factor < 0:
            raise ConfigError(f"data.outlier_norm_factor must be >= 0, got {self.outlier_norm_factor}")
        if self.writer_threads < 0:
            raise ConfigError(f"data.writer_threads must be >= 0 (0: one per core), got {self.writer_threads}")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"data.zstd_level must be in 1..22, got {self.zstd_level}")

    def writer_pool(self) -> int:
        """writer_threads with 0 resolved to this machine's cores (at most 8)."""
        return self.writer_threads or max(1, min(8, len(os.sched_getaffinity(0))))

    @property
    def shard_sequences(self) -> int:
        return self.shard_tokens // self.context_len

    @property
    def forward_sequences(self) -> int:
        return max(1, self.forward_batch_tokens // self.context_len)


@dataclass
class ReaderConfig:
    """Where the fit stage gets its activation batches, and how cached shards are read and shuffled."""

    source: ActivationSource = ActivationSource.cache
    """Where the fit stage reads activations: the cache, or the model itself (live)."""
    shuffle_buffer_tokens: int = 131072
    """Activation rows per layer held in memory for shuffling while reading (sets the reader's memory)."""
    shuffle_shards: bool = True
    """Visit cache shards in a new random order each epoch (live mode keeps the stream order)."""
    threads: int = operational(2)
    """Background threads that read and decompress shards ahead of the trainer."""
    on_corrupt: OnCorrupt = operational(OnCorrupt.error)
    """What the reader does with a shard that fails its checksum: error, or skip with a warning."""
    verify_shards: Verify = operational(Verify.frame)
    """How shards are checked: frame (zstd's checksum, free while decoding) or sha256 (also hash the file)."""

    def __post_init__(self) -> None:
        for name in ("shuffle_buffer_tokens", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"reader.{name} must be positive, got {getattr(self, name)}")
