"""Wall time of a live fit on the tiny Qwen3 (the model runs while the SAEs train), for this tree and for
other checkouts of qscope-train named with --tree, alternating, in one run; prints one JSON line.

Each run is `python -m qscope_train.cli experiment=demo stages=[fit] reader.source=live` in a fresh
run directory with the tree's package first on PYTHONPATH (model loading included, the same for all).

Usage: python scripts/bench_live_fit.py [--tree OLD_CHECKOUT ...] [--steps 120] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(tree: Path, fixtures: Path, run_dir: Path, steps: int) -> float:
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures), PYTHONPATH=str(tree))
    args = [sys.executable, "-m", "qscope_train.cli", "experiment=demo", f"run_dir={run_dir}", "stages=[fit]"]
    args += ["reader.source=live", f"trainer.max_steps={steps}", "trainer.checkpoint_every=0"]
    t0 = time.perf_counter()
    subprocess.run(args, env=env, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", type=Path, default=[], help="another checkout to time beside this one")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fixtures", type=Path, help="tiny models built already (default: build them)")
    a = p.parse_args()
    trees = [ROOT, *a.tree]
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = a.fixtures
        if fixtures is None:
            fixtures = Path(tmp) / "fixtures"
            subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(fixtures)],
                check=True,
                capture_output=True,
            )
        times: dict[str, list[float]] = {str(t): [] for t in trees}
        for r in range(a.rounds):
            for i, tree in enumerate(trees):
                times[str(tree)].append(one_run(tree, fixtures, Path(tmp) / f"run-{r}-{i}", a.steps))
    print(
        json.dumps(
            {
                "seconds": {t: [round(s, 2) for s in v] for t, v in times.items()},
                "median_seconds": {t: round(statistics.median(v), 2) for t, v in times.items()},
                "steps": a.steps,
            }
        )
    )


if __name__ == "__main__":
    main()
