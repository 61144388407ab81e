"""Build the offline fixtures: corpus.jsonl, a byte-level BPE tokenizer, tiny Qwen3 / Qwen3.5 models.

Usage: python scripts/make_tiny_model.py [--out fixtures] [--force]
"""

import argparse

from qscope_train.tiny import build_fixtures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fixtures", help="output directory (default: fixtures)")
    parser.add_argument("--docs", type=int, default=12000, help="documents in the generated corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the fixtures exist")
    args = parser.parse_args()
    paths = build_fixtures(args.out, n_docs=args.docs, seed=args.seed, force=args.force)
    for name, path in paths.items():
        print(f"{name:>16}: {path}")


if __name__ == "__main__":
    main()
