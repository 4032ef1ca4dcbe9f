#!/usr/bin/env bash
# The README's test command: set up (venv, pinned deps, compiled op) and run the whole test suite,
# including the nvcc compile check of the CUDA kernel and the tests that start a real TorchServe.
# Extra arguments go to pytest (e.g. scripts/test.sh -k exactness).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
bash scripts/check_cuda_compile.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
