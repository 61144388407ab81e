#!/usr/bin/env bash
# Fetch into .whl/ the wheels that scripts/gpu_check.sh installs on a CUDA machine with no network: the
# packages our checks need that such a machine lacks (see the device README's package list), at the
# versions this checkout's .venv has (and eai-sparsify's from the peer's environment, for the side-by-side
# timing). Run here, where the package registry is reachable; .whl/ is git-ignored.
#
#   scripts/gpu_wheels.sh            (python 3.12, manylinux x86-64: the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SPARSIFY_PY=${QSCOPE_SPARSIFY_PYTHON:-$HOME/.cache/qscope-anchors/sparsify/bin/python}
ours=(hydra-core omegaconf antlr4-python3-runtime zstandard datasets dill multiprocess schedulefree)
peer=(eai-sparsify natsort simple-parsing docstring-parser)
version() { "$1" -m pip show "$2" 2>/dev/null | sed -n 's/^Version: //p'; }
specs=()
for p in "${ours[@]}"; do specs+=("$p==$(version "$PY" "$p")"); done
if [[ -x "$SPARSIFY_PY" ]]; then
    for p in "${peer[@]}"; do specs+=("$p==$(version "$SPARSIFY_PY" "$p")"); done
else
    echo "gpu_wheels: no sparsify environment at $SPARSIFY_PY (../shared/anchors/setup.sh): no peer wheels" >&2
fi
mkdir -p .whl
for spec in "${specs[@]}"; do
    [[ "$spec" == *== ]] && { echo "gpu_wheels: ${spec%==} is not installed here" >&2; exit 1; }
    # a pure-Python package published only as a source archive (antlr4-python3-runtime 4.9.3) is built here
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$spec" 2>/dev/null ||
        "$PY" -m pip wheel -q --no-deps -w .whl "$spec"
done
ls -la .whl
du -sh .whl
