#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the pipeline needs.
#   bash setup.sh          the pipeline and its command `softcon`
#   bash setup.sh --test   the same plus the test tools
#   bash setup.sh --lock   write requirements.lock from what .venv holds now (after a passing test run)
# torch and torchvision are pinned first to a matching pair (timm needs torchvision); every other package is
# installed at the version in requirements.lock (SOFTCON_UNLOCKED=1 takes the newest the project allows, to refresh
# the lock). The project's own requirements keep ranges, so installing it into another environment keeps what is there.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
LOCK_EXCLUDE='^(torch|torchvision|triton|nvidia-|cuda-)'  # pinned here by TORCH_VERSION / TORCHVISION_VERSION
if [[ "${1:-}" == "--lock" ]]; then
    {
        echo "# Every package \`bash setup.sh --test\` installs besides the project and torch/torchvision (pinned by"
        echo "# setup.sh itself), at the versions the tests last passed with (Python 3.11, x86_64). setup.sh installs"
        echo "# with these as constraints. Refresh: SOFTCON_UNLOCKED=1 bash setup.sh --test, run the tests, then"
        echo "# bash setup.sh --lock."
        .venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E "$LOCK_EXCLUDE" | grep -v " @ "
    } > requirements.lock
    echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
    exit 0
fi
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
constraints=()
[[ -z "${SOFTCON_UNLOCKED:-}" && -f requirements.lock ]] && constraints=(--constraint requirements.lock)
.venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".${extras}"
echo "set up: $(.venv/bin/softcon --help >/dev/null && echo 'softcon ready in .venv/bin/softcon')"
