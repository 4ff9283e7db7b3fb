#!/usr/bin/env bash
# Install what the tests need, then run the default (fast, CPU-only) test suite.
# Extra arguments go to pytest, e.g. `bash run/test.sh -m slow` for the long tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ $# -eq 0 ]; then
    set -- -m "not slow"
fi
exec "${PYTHON:-python}" -m pytest -q "$@" tests
