#!/usr/bin/env bash
# One GPU call for an experiment switch: build the default kernels and every variant at once,
# check each variant's results against the references, then time them side by side.
#
#   VARIANTS="-DCOMET_WIDE_PIPELINE=0;-DCOMET_WIDE_PIPELINE=2" OUT=ab_out bash scripts/gpu_ab.sh
#
# VARIANTS: nvcc flag sets separated by ';'. PYTEST_K: the tests run under each variant (default:
# the wgmma GEMM's). BENCH: bench_variants.py runs, separated by ';', each its arguments without
# --variant (default: integer scales at M = 256 / 1024 / 4096, then free scales at 1024 / 4096).
# TEST_BASE=0 skips the tests of the default build, TESTS=0 all tests. TEST_S / BENCH_S: time limits of each test
# run and each benchmark run, seconds. Everything
# goes to $OUT: gpu.txt, build_*.txt, tests_*.txt, bench_*.txt.
IFS=';' read -r -a variants <<< "${VARIANTS:?set VARIANTS to the nvcc flag sets to compare, ';'-separated}"
IFS=';' read -r -a benches <<< "${BENCH:---kernel ints --ms 256,1024,4096;--kernel sizes --ms 1024,4096}"
PYTEST_K=${PYTEST_K:-gemm_wide or int_scales}
source "$(dirname "$0")/gpu_env.sh" ab_out

tag() { [ -z "$1" ] && echo base || echo "$1" | tr -c 'A-Za-z0-9_\n' '_'; }  # file names: plain characters
build='import time; from comet_quant import ops; t = time.time(); print("built", ops.build(), f"{time.time() - t:.0f} s")'
python3 -c "$build" > "$OUT/build_base.txt" 2>&1 &
for v in "${variants[@]}"; do
  COMET_QUANT_NVCC_FLAGS="$v" python3 -c "$build" > "$OUT/build_$(tag "$v").txt" 2>&1 &
done
wait
tail -n 2 "$OUT"/build_*.txt

tested=("${variants[@]}")
[ "${TEST_BASE:-1}" = 1 ] && tested=("" "${variants[@]}")
[ "${TESTS:-1}" = 0 ] && tested=()
for v in "${tested[@]}"; do
  COMET_QUANT_NVCC_FLAGS="$v" timeout "${TEST_S:-150}" python3 -m pytest -q -x tests/test_kernels.py -k "$PYTEST_K" \
    > "$OUT/tests_$(tag "$v").txt" 2>&1
  echo "tests under ${v:-the default build}: exit $?, $(tail -n 1 "$OUT/tests_$(tag "$v").txt")"
done

args=(--variant=base)
for v in "${variants[@]}"; do args+=("--variant=$v"); done
n=0
for b in "${benches[@]}"; do
  n=$((n + 1))
  # shellcheck disable=SC2086  # each BENCH entry is a list of arguments
  timeout "${BENCH_S:-170}" python3 scripts/bench_variants.py $b "${args[@]}" > "$OUT/bench_$n.txt" 2>&1
  echo "bench $n ($b): exit $?"
  cat "$OUT/bench_$n.txt"
done
