"""qscope-train: train, adapt and export Qwen-Scope-compatible TopK SAEs on Qwen3 / Qwen3.5."""

__version__ = "0.1.0"
