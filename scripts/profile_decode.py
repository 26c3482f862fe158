"""Launch one W4Ax GEMM a few times, for a profiler (Nsight Compute) to look at.

    ncu --kernel-name regex:gemv --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        python3 scripts/profile_decode.py --shape "70B down" -m 16

Random packed weights of a LLaMA-3 linear shape (scripts/bench_kernels.py SHAPES), 10% 8-bit
groups, the GEMM the op picks for M (--split-k forces one: 0 = decode kernel, -1 = the ring
kernel). --wide runs the Hopper wgmma GEMM on the wide activation layout instead (M of any
size), --int-scales its integer-group-scale form:

    ncu --kernel-name regex:wide_kernel --launch-skip 3 --launch-count 1 --section WarpStateStats \
        --section SourceCounters python3 scripts/profile_decode.py --shape "8B gate+up" -m 4096 --wide --int-scales

--fp8 launches cuBLAS `torch._scaled_mm` (fp8 e4m3, row-wise scales, M padded to 16) on the same
shape instead, to profile the baseline (its kernels are named nvjet_*):

    ncu --kernel-name regex:nvjet --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        python3 scripts/profile_decode.py --shape "8B down" -m 1024 --fp8

No timing here: Nsight Compute measures the launch it is told to.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="70B qkv", help="a name of bench_kernels.SHAPES")
    ap.add_argument("-m", type=int, default=1, help="tokens")
    ap.add_argument("--split-k", type=int, default=0,
                    help="0: automatic; packed: -1 the decode ring kernel, -2 the 32-channel decode kernel; "
                         "--wide: -1 stream-K, -2 persistent tiles, S >= 1 tiled in S parts of K")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--wide", action="store_true", help="the wgmma GEMM (sm_90a) on wide activations")
    ap.add_argument("--int-scales", action="store_true", help="with --wide: integer group scales")
    ap.add_argument("--fp8", action="store_true", help="cuBLAS _scaled_mm fp8 on the shape instead (the baseline)")
    args = ap.parse_args()
    if args.int_scales and not args.wide:
        sys.exit("error: --int-scales is a form of the wgmma GEMM; add --wide")
    if args.fp8 and args.wide:
        sys.exit("error: --fp8 profiles cuBLAS instead of our GEMM; drop --wide")

    import torch

    from bench_kernels import SHAPES, int_scale_weights
    from comet_quant import ops

    if args.shape not in SHAPES:
        sys.exit(f"error: unknown shape {args.shape!r}; one of: {', '.join(SHAPES)}")
    n, k = SHAPES[args.shape]
    g = k // ops.GROUP
    torch.manual_seed(0)
    if args.fp8:  # as bench_kernels times it: e4m3 operands, row-wise float32 scales
        mp = -(-args.m // 16) * 16
        a = torch.randn(mp, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        sa, sb = torch.rand(mp, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
        for _ in range(args.launches):
            torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float16)
        torch.cuda.synchronize()
        print(f"{args.launches} launches of cuBLAS fp8 _scaled_mm, {args.shape} (N={n}, K={k}) at M={args.m}")
        return
    qw = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
    ws = torch.rand(n, g, device="cuda", dtype=torch.float16) * 0.01 + 1e-3
    perm = torch.randperm(k, device="cuda").to(torch.int32)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    g8 = g // 10
    ops.build()  # the custom ops are registered by loading the built extension
    if args.wide:
        extra = ()  # integer group scales: the row scales and the 8-bit group count
        if args.int_scales:  # group scales = row scale x an integer in [1, 16]
            rows, group_scales = int_scale_weights(n, g, 1, "cuda")
            ws, extra = group_scales[0], (rows[0], g8)
        qa, st = torch.ops.comet.quantize_act_wide(x, perm, g8, False, args.int_scales)
        for _ in range(args.launches):
            torch.ops.comet.w4ax_gemm_wide(qa, st, qw, ws, args.split_k, torch.float16, *extra)
    else:
        q8, q4, s = ops.quantize_act(x, perm, g8)
        for _ in range(args.launches):
            torch.ops.comet.w4ax_gemm(q8, q4, s, qw, ws, g8, args.split_k, False, torch.float16)
    torch.cuda.synchronize()
    kind = "wgmma (integer scales)" if args.int_scales else "wgmma" if args.wide else "packed"
    print(f"{args.launches} launches of {args.shape} (N={n}, K={k}) at M={args.m}, split_k={args.split_k}, {kind}")


if __name__ == "__main__":
    main()
