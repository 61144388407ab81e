"""Time and peak memory of the browse stage at d_sae 32768 on the tiny Qwen3 (d_model 64), at two numbers
of held-out tokens, each in its own process; prints one JSON line. Memory should not grow with tokens.

The SAE is random (its statistics are beside the point here): layer 2, k 16. The held-out split is
made as large as the largest run needs (data.eval_tokens) from the fixtures' corpus.

Usage: python scripts/bench_browse.py [--tokens 262144 1048576] [--d-sae 32768] [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb(pid_status: str) -> float:
    for line in pid_status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(fixtures: Path, run_dir: Path, tokens: int, eval_tokens: int) -> dict:
    env = dict(os.environ, QSCOPE_FIXTURES=str(fixtures))
    code = (
        "import sys, resource; from qscope_train.cli import main; sys.argv = sys.argv[:1] + sys.argv[2:];\n"
        "try:\n    main()\nfinally:\n    print('VMHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    args = [sys.executable, "-c", code, "-", "experiment=demo", f"run_dir={run_dir}", "stages=[browse]", "layers=[2]"]
    args += [f"data.eval_tokens={eval_tokens}", f"browse.tokens={tokens}", "sae.d_sae=32768"]
    t0 = time.perf_counter()
    res = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    kb = int(res.stdout.split("VMHWM")[1].split()[0])
    meta = (run_dir / "browse" / "data" / "meta.js").read_text()
    seen = json.loads(meta[meta.index("(") + 1 : meta.rindex(")")])["tokens"]
    return {
        "tokens_asked": tokens,
        "rows_scanned": seen,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(kb / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[262144, 1048576])
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--fixtures", type=Path)
    a = p.parse_args()
    from qscope_train import release
    from qscope_train.sae import TopKSAE

    with tempfile.TemporaryDirectory() as tmp:
        fixtures = a.fixtures
        if fixtures is None:
            fixtures = Path(tmp) / "fixtures"
            subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(fixtures)], check=True
            )
        sae = TopKSAE(64, a.d_sae, 16)
        sae.init_weights_(generator=torch.Generator().manual_seed(0))
        runs = []
        for i, tokens in enumerate(a.tokens):
            run_dir = Path(tmp) / f"run{i}"
            release.save_tensors(run_dir / "fit" / "layer2.sae.pt", sae.to_release())
            release.write_sidecar(run_dir / "fit" / "layer2.json", {"k": 16, "layer": 2})
            runs.append(one(fixtures, run_dir, tokens, max(a.tokens)))
    print(json.dumps({"runs": runs, "d_sae": a.d_sae, "d_model": 64, "top_n": 20, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
