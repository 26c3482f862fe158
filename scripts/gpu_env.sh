# Sourced by the GPU scripts (gpu_check.sh, gpu_ab.sh): results folder, import path, kernel build
# cache, and pytest from the carried wheels (.whl/) where the machine has none.
set -uo pipefail
OUT=${OUT:-$1}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export COMET_QUANT_CACHE=${COMET_QUANT_CACHE:-/tmp/comet-quant-cache}
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
