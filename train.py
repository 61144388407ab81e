"""Thin entry point: `python train.py experiment=demo` is the same as `qscope-train experiment=demo`."""

from qscope_train.cli import main

if __name__ == "__main__":
    main()
