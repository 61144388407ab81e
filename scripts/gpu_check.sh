#!/usr/bin/env bash
# The prepared GPU check (see scripts/gpu_check.py for what it runs and prints). On a CUDA machine with
# no network: installs the wheels carried in .whl/ (scripts/gpu_wheels.sh fetches them) into a
# directory of its own, then runs every check and prints one JSON summary as its last line.
#
#   scripts/gpu_check.sh             on a CUDA machine (sized for 8 minutes on one H100; not yet run on one)
#   scripts/gpu_check.sh --dry-run   the same checks on the CPU at small shapes
#
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3); OUT, where set,
# receives gpu_check.json and gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
dry=0
for arg in "$@"; do [[ "$arg" == --dry-run ]] && dry=1; done
if [[ $dry == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then  # a dry run uses this machine's environment
    site="${TMPDIR:-/tmp}/qscope-gpu-check-site"
    echo "gpu_check: installing $(ls .whl/*.whl | wc -l) carried wheels into $site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
