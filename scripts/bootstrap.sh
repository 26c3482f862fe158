#!/usr/bin/env bash
# Create .venv and install comet-quant with its test tools. CPU torch is pinned so that a
# plain install does not pull a multi-GB CUDA build; on a GPU machine install the CUDA build
# of torch first (pip install torch) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
echo "comet-quant installed in $(pwd)/.venv"
