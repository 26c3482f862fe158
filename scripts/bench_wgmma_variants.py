"""Time the Hopper wgmma GEMM alone under experiment builds (docs/BENCHMARKS.md, "What limits it").

Each variant is a set of nvcc flags (the kernel's switches: -DCOMET_WIDE_SKIP_MMA,
-DCOMET_WIDE_SKIP_RESCALE, -DCOMET_WIDE_SKIP_LOAD); the kernels are rebuilt per variant in a
subprocess (COMET_QUANT_NVCC_FLAGS is part of the build's identity) and timed the same way as
scripts/bench_kernels.py (CUDA-graph replays, weights rotating past L2). Skip builds compute
wrong results on purpose: they only say where the time goes.

    python scripts/bench_wgmma_variants.py --quick --variant=base --variant=-DCOMET_WIDE_SKIP_RESCALE
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(28672, 4096), (4096, 4096), (4096, 14336)]  # 8B gate+up, o, down (N, K)


def run_variant(quick: bool) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch

    from bench_kernels import copies, timeit
    from comet_quant import ops

    ops.build()
    tag = os.environ.get("COMET_QUANT_NVCC_FLAGS") or "default"
    for n, k in SHAPES[:1] if quick else SHAPES:
        for m in (4096,) if quick else (256, 1024, 4096):
            g = k // ops.GROUP
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            perm = torch.randperm(k, device="cuda").to(torch.int32)
            nc = copies(n * k // 2)
            qws = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8) for _ in range(nc)]
            ws = torch.rand(n, g, device="cuda", dtype=torch.float16) * 0.01 + 1e-3
            qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g // 10)
            t = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qws[i], ws, 0, torch.float16)
                        for i in range(nc)])
            print(f"| {tag} | N={n} K={k} | {m} | {t:.4f} | {2 * m * n * k / t / 1e9:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", metavar="FLAGS",
                    help="nvcc flags of one build, written --variant=FLAGS ('base': none); repeatable")
    ap.add_argument("--quick", action="store_true", help="8B gate+up at M = 4096 only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_variant(args.quick)
    print("| build flags | shape | M | ms | equivalent TOPS |\n|---|---|---|---|---|", flush=True)
    variants = args.variant or ["base", "-DCOMET_WIDE_SKIP_RESCALE", "-DCOMET_WIDE_SKIP_MMA", "-DCOMET_WIDE_SKIP_LOAD"]
    for flags in variants:
        env = dict(os.environ, COMET_QUANT_NVCC_FLAGS="" if flags == "base" else flags)
        cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
