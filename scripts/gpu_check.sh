#!/usr/bin/env bash
# One GPU session: build the kernels, record their resource usage, run the GPU tests, benchmark.
# Usage (on a CUDA machine, from the repo root): OUT=results_dir bash scripts/gpu_check.sh
source "$(dirname "$0")/gpu_env.sh" gpu_out
python3 - <<'PY' 2>&1 | tee "$OUT/build.txt"
import time
from comet_quant import ops
t = time.time()
print("built in", ops.build(), f"{time.time() - t:.0f} s")
PY
so=$(ls -t "$COMET_QUANT_CACHE"/kernels/*/*.so | head -1)  # newest: this build
cuobjdump -res-usage "$so" 2>&1 | grep -E "Function|REG|STACK" > "$OUT/resource_usage.txt" || true
cuobjdump -sass "$so" 2>/dev/null | gzip > "$OUT/sass.txt.gz" || true
# PYTEST_K narrows the tests (a -k expression, e.g. "wide or int_scales"), PYTEST_ARGS adds
# options; BENCH_ARGS the benchmark (--shapes, --ms).
python3 -m pytest -q -x tests/test_kernels.py ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
python3 scripts/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -70
