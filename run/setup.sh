#!/usr/bin/env bash
# Install the Python packages in requirements.txt and make the working folders.
# Idempotent: when everything is already importable it only checks and returns.
# --onnx: also requirements-onnx.txt (python -m lib.export --format onnx and its tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
REQUIREMENTS=(requirements.txt)
for arg in "$@"; do
    case "$arg" in
        --onnx) REQUIREMENTS+=(requirements-onnx.txt) ;;
        *) echo "setup: unknown option '$arg'; expected --onnx or nothing" >&2; exit 2 ;;
    esac
done

mkdir -p data checkpoints/pretrained lib/simulator/lookup_tables

if "$PY" - "${REQUIREMENTS[@]}" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
for line in (line for path in sys.argv[1:] for line in open(path)):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(re.sub(r"\+.*$", "", version), prereleases=True):
        sys.exit(1)
import torch, torchvision  # noqa: F401  (a torchvision that does not fit torch fails here)
PYEOF
then
    echo "setup: requirements already satisfied"
    exit 0
fi

echo "setup: installing requirements"
# torch/torchvision first as a matching pair; a plain range may otherwise pair a
# torchvision wheel with an incompatible torch.
"$PY" -m pip install --quiet "torch>=2.1,<3" "torchvision>=0.16,<1"
"$PY" -m pip install --quiet -r requirements.txt
"$PY" -c "import torch, torchvision, sklearn, mlxtend, tensorboardX, matplotlib, progress, easydict"
if [ ${#REQUIREMENTS[@]} -gt 1 ]; then
    "$PY" -m pip install --quiet -r requirements-onnx.txt
    "$PY" -c "import onnx, onnxruntime, onnxscript"
fi
echo "setup: done"
