"""Building blocks of the config schemas: dtype names, operational fields, configs as plain data,
and the fingerprints that decide whether a cache or checkpoint can be reused. No I/O, no torch at import.
"""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from enum import Enum
from typing import Any

MISSING = "???"  # OmegaConf's marker for a value the user must give


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    @property
    def torch(self):
        """The torch dtype of the same name (torch is imported here only when asked for)."""
        import torch

        return getattr(torch, self.value)


def operational(default: Any) -> Any:
    """A field that changes how a stage runs (speed, checks, logging), never what it computes: left out
    of fingerprint(), so changing it neither invalidates a cache nor refuses a checkpoint."""
    return field(default=default, metadata={"operational": True})


def to_plain(obj: Any) -> Any:
    """A dataclass config as JSON-ready dicts, lists and scalars (enums by value)."""
    if is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def fingerprint(obj: Any) -> Any:
    """to_plain(obj) without its operational fields: what a cache or checkpoint must agree with to be reused."""
    if is_dataclass(obj):
        return {f.name: fingerprint(getattr(obj, f.name)) for f in fields(obj) if not f.metadata.get("operational")}
    return to_plain(obj)


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The settings that differ between two fingerprints (cache, checkpoint), as `key: old -> new`, nested
    keys joined by dots."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = fingerprint_diff(a, b, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(parts)
