#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the pipeline needs.
#   bash setup.sh          the pipeline and its command `softcon`
#   bash setup.sh --test   the same plus the test tools
# torch and torchvision are pinned first to a matching pair (timm needs torchvision); the project's own
# requirements keep ranges, so an existing newer pair is kept when you install into another environment.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
.venv/bin/python -m pip install --quiet -e ".${extras}"
echo "set up: $(.venv/bin/softcon --help >/dev/null && echo 'softcon ready in .venv/bin/softcon')"
