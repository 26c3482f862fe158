"""Time one kernel alone under experiment builds (docs/BENCHMARKS.md, "What limits it").

Each variant is a set of nvcc flags (the kernels' switches, e.g. -DCOMET_WIDE_SKIP_MMA,
-DCOMET_WIDE_SKIP_RESCALE, -DCOMET_WIDE_SKIP_LOAD of the wgmma GEMM); the kernels are rebuilt per
variant in a subprocess (COMET_QUANT_NVCC_FLAGS is part of the build's identity) and timed the
same way as scripts/bench_kernels.py (CUDA-graph replays, weights rotating past L2). Skip builds
compute wrong results on purpose: they only say where the time goes.

--kernel picks what is timed: the wgmma GEMM (M = 256 / 1024 / 4096), its integer-group-scale
form ("ints": all LLaMA-3 shapes, 10% 8-bit groups, the plan in brackets; "a8span": the same
with per-group and with span-shared 8-bit scales, a8_span_scales, next to cuBLAS fp16 and fp8
_scaled_mm, --ms as ints), the decode GEMM
(M = 1 / 16 on all LLaMA-3 shapes, 24 on those that take it there), the activation
quantization (M = 4096, both layouts), or
"tiles": the wgmma GEMM at M = 128 / 256 / 512 on all LLaMA-3 shapes under every split_k (auto,
1, 2, 3, 4, 6), microseconds, to compare token tiles forced by -DCOMET_WIDE_TOKENS=128 / 96; or
"sizes": the wgmma GEMM on all LLaMA-3 shapes at M = 256 ... 4096 with the automatic split, to
fit the token-tile rule to builds forced to each tile size (ints and sizes time each split_k of
--splits: e.g. 0,-1,-2 for the automatic plan, stream-K and persistent tiles, same build); or
"streamk": the wgmma GEMM on all LLaMA-3 shapes at M = 64 ... 4096 under the automatic plan,
one block per tile and stream-K (split_k 0, 1, -1; the plan each took in brackets); or
"crossover": quantization + GEMM on
the packed (decode / tiled) and the wide (wgmma) path at M = 17 ... 80, where ops.WIDE_MIN_M
chooses between them.

    python scripts/bench_variants.py --quick --variant=base --variant=-DCOMET_WIDE_SKIP_RESCALE
    python scripts/bench_variants.py --kernel decode --variant=base --variant=-DSOME_SWITCH
    python scripts/bench_variants.py --kernel ints --ms 1024,4096 --splits 1,-2 --variant=base
    python scripts/bench_variants.py --kernel tiles --variant=-DCOMET_WIDE_TOKENS=128 \
        --variant=-DCOMET_WIDE_TOKENS=96
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(28672, 4096), (4096, 4096), (4096, 14336)]  # 8B gate+up, o, down (N, K)


def run_variant(kernel: str, quick: bool, ms: tuple[int, ...] = (), splits: tuple[int, ...] = (0,)) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch

    from bench_kernels import SHAPES as ALL_SHAPES
    from bench_kernels import copies, int_scale_weights, plan_label, time_fp8, time_fp16, timeit
    from comet_quant import ops

    ops.build()
    tag = os.environ.get("COMET_QUANT_NVCC_FLAGS") or "default"

    def weights(n, k):
        """Random packed weights ([copies] to rotate past L2), scales and a permutation of one shape."""
        g = k // ops.GROUP
        nc = copies(n * k // 2)
        qws = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8) for _ in range(nc)]
        ws = torch.rand(n, g, device="cuda", dtype=torch.float16) * 0.01 + 1e-3
        return g, nc, qws, ws, torch.randperm(k, device="cuda").to(torch.int32)

    if kernel == "decode":
        for name, (n, k) in ALL_SHAPES.items():
            g, nc, qws, ws, perm = weights(n, k)
            for m in (1, 16, 24):
                if m > 16 and n * k >= ops.WIDE_LARGE_WEIGHT:  # those take the wgmma path from 17 tokens
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                q8, q4, s = ops.quantize_act(x, perm, g // 10)
                t = timeit([lambda i=i: torch.ops.comet.w4ax_gemm(q8, q4, s, qws[i], ws, g // 10, 0, False,
                                                                  torch.float16) for i in range(nc)])
                tbps = (n * k // 2 + n * g * 2) / t / 1e9
                t16 = time_fp16(x, n)
                print(f"| {tag} | {name} | {m} | {t * 1e3:.1f} us | {tbps:.2f} TB/s, {t16 / t:.2f}x fp16 |",
                      flush=True)
        return
    if kernel == "actq":
        for k in (4096, 8192, 14336, 28672):
            m = 4096
            g = k // ops.GROUP
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            perm = torch.randperm(k, device="cuda").to(torch.int32)
            for wide in (False, True):
                op = torch.ops.comet.quantize_act_wide if wide else torch.ops.comet.quantize_act
                t = timeit([lambda: op(x, perm, g // 10)])
                out_bytes = m * k if wide else m * (k // 2 + (g // 10) * 64)
                tbps = (m * k * 2 + out_bytes + m * g * 4 + k * 4) / t / 1e9
                name = "wide" if wide else "packed"
                print(f"| {tag} | K={k} {name} | {m} | {t * 1e3:.1f} us | {tbps:.2f} TB/s |", flush=True)
        return
    if kernel == "tiles":
        splits = (0, 1, 2, 3, 4, 6)
        for name, (n, k) in ALL_SHAPES.items():
            g, nc, qws, ws, perm = weights(n, k)
            for m in (128, 256, 512):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g // 10)
                us = [timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qws[i], ws, split,
                                                                         torch.float16) for i in range(nc)]) * 1e3
                      for split in splits]
                print(f"| {tag} | {name} | {m} | " + " | ".join(f"{t:.1f}" for t in us) + " |", flush=True)
        return
    if kernel == "streamk":  # the automatic plan, one block per tile, and stream-K, per shape and M
        # + LLaMA-3-8B's own k / v projection (8 channel tiles), and a matrix of one 128-channel
        # tile per SM (stream-K then cuts no tile at M <= 128)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        extra = {"8B k/v": (1024, 4096), f"{sms} tiles": (128 * sms, 4096)}
        for name, (n, k) in dict(ALL_SHAPES, **extra).items():
            g, nc, qws, ws, perm = weights(n, k)
            for m in ms or (64, 128, 256, 512, 1024, 2048, 4096):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g // 10)
                cells = []
                for split in (0, 1, -1):
                    t = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qws[i], ws, split,
                                                                           torch.float16) for i in range(nc)])
                    cells.append(f"{t * 1e3:.1f} ({plan_label(m, n, k, split)})")
                print(f"| {tag} | {name} | {m} | " + " | ".join(cells) + " |", flush=True)
        return
    if kernel == "crossover":  # quantize + GEMM on each path, where M decides between them
        for name, (n, k) in ALL_SHAPES.items():
            g, nc, qws, ws, perm = weights(n, k)
            for m in (17, 24, 32, 40, 48, 56, 64, 80):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)

                def packed(i):
                    q8, q4, s = ops.quantize_act(x, perm, g // 10)
                    return torch.ops.comet.w4ax_gemm(q8, q4, s, qws[i], ws, g // 10, 0, False, torch.float16)

                def wide(i):
                    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g // 10)
                    return torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qws[i], ws, 0, torch.float16)
                tp = timeit([lambda i=i: packed(i) for i in range(nc)]) * 1e3
                tw = timeit([lambda i=i: wide(i) for i in range(nc)]) * 1e3
                print(f"| {tag} | {name} | {m} | {tp:.1f} us | {tw:.1f} us |", flush=True)
        return

    def int_scale_cases():
        """Per LLaMA-3 shape and M (--ms, default 256 / 1024 / 4096): integer-group-scale weights
        (int_group_scales), 10% 8-bit groups, and fp16 activations."""
        for name, (n, k) in ALL_SHAPES.items():
            g, nc, qws, _, perm = weights(n, k)
            g8 = g // 10
            rows, wsi = int_scale_weights(n, g, nc, "cuda")
            for m in ms or (256, 1024, 4096):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)

                def gemm(qa, sti, split=0, a8=False):  # median ms over the weight copies
                    return timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(
                        qa, sti, qws[i], wsi[i], split, torch.float16, rows[i], g8, 0, a8) for i in range(nc)])
                yield name, n, k, m, x, perm, g8, gemm
            torch.cuda.empty_cache()

    if kernel == "ints":  # the integer-group-scale GEMM (int_group_scales), 10% 8-bit groups
        for name, n, k, m, x, perm, g8, gemm in int_scale_cases():
            qa, sti = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True)
            cells = []
            for split in splits:
                t = gemm(qa, sti, split)
                cells.append(f"{t * 1e3:.1f} us ({plan_label(m, n, k, split, int_scales=True)}) | "
                             f"{2 * m * n * k / t / 1e9:.0f}")
            print(f"| {tag} | {name} | {m} | " + " | ".join(cells) + " |", flush=True)
        return
    if kernel == "a8span":  # integer group scales, 10% 8-bit groups: per group vs span scales (a8_span_scales)
        for name, n, k, m, x, perm, g8, gemm in int_scale_cases():
            t16, t8 = time_fp16(x, n), time_fp8(m, n, k)
            t = [gemm(*torch.ops.comet.quantize_act_wide(x, perm, g8, False, True, a8), a8=a8) for a8 in (False, True)]
            print(f"| {tag} | {name} | {m} | {t16 * 1e3:.1f} | {t8 * 1e3:.1f} | {t[0] * 1e3:.1f} "
                  f"({plan_label(m, n, k, int_scales=True)}) | {t[1] * 1e3:.1f} | {t[0] / t[1]:.3f} | "
                  f"{t16 / t[0]:.2f} / {t8 / t[0]:.2f} | {t16 / t[1]:.2f} / {t8 / t[1]:.2f} |", flush=True)
        return
    if kernel == "sizes":
        for name, (n, k) in ALL_SHAPES.items():
            g, nc, qws, ws, perm = weights(n, k)
            for m in ms or (256, 512, 1024, 2048, 4096):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g // 10)
                cells = []
                for split in splits:
                    t = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qws[i], ws, split,
                                                                           torch.float16) for i in range(nc)])
                    cells.append(f"{t * 1e3:.1f} us ({plan_label(m, n, k, split)}) | {2 * m * n * k / t / 1e9:.0f}")
                print(f"| {tag} | {name} | {m} | " + " | ".join(cells) + " |", flush=True)
        return
    for n, k in SHAPES[:1] if quick else SHAPES:
        for m in (4096,) if quick else (256, 1024, 4096):
            g, nc, qws, ws, perm = weights(n, k)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g // 10)
            t = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qws[i], ws, 0, torch.float16)
                        for i in range(nc)])
            print(f"| {tag} | N={n} K={k} | {m} | {t:.4f} ms | {2 * m * n * k / t / 1e9:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", metavar="FLAGS",
                    help="nvcc flags of one build, written --variant=FLAGS ('base': none); repeatable")
    ap.add_argument("--kernel", choices=["wgmma", "decode", "actq", "tiles", "sizes", "crossover", "streamk", "ints",
                                         "a8span"],
                    default="wgmma")
    ap.add_argument("--quick", action="store_true", help="wgmma: 8B gate+up at M = 4096 only")
    ap.add_argument("--ms", default="", help="streamk / sizes / ints: the token counts, comma-separated (default 64 / 256 ... 4096)")
    ap.add_argument("--splits", default="0",
                    help="ints / sizes: the split_k values timed per shape, comma-separated (0: the automatic "
                         "plan, -1: stream-K, -2: persistent tiles, S >= 1: tiled, K in S parts)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_variant(args.kernel, args.quick, tuple(int(m) for m in args.ms.split(",") if m),
                           tuple(int(s) for s in args.splits.split(",")))
    if args.kernel == "crossover":
        print("| build flags | shape | M | packed: quantize + decode / tiled GEMM | wide: quantize + wgmma GEMM |\n"
              "|---|---|---|---|---|", flush=True)
    elif args.kernel == "streamk":
        print("| build flags | shape | M | us (plan), automatic | one block per tile | stream-K |\n|---|---|---|---|---|---|",
              flush=True)
    elif args.kernel == "a8span":
        print("| build flags | shape | M | fp16 us | fp8 us | int scales us (plan) | + a8_span_scales us | speedup |"
              " int x fp16 / x fp8 | a8span x fp16 / x fp8 |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    elif args.kernel in ("ints", "sizes"):
        names = {"0": "automatic plan", "-1": "stream-K", "-2": "persistent tiles"}
        cols = [names.get(s, f"split {s}") for s in args.splits.split(",")]
        print("| build flags | shape | M | " + " | ".join(f"{c} | TOPS" for c in cols) + " |\n|---|---|---|"
              + "---|---|" * len(cols), flush=True)
    elif args.kernel == "tiles":
        print("| build flags | shape | M | us, split auto | 1 | 2 | 3 | 4 | 6 |\n|---|---|---|---|---|---|---|---|---|",
              flush=True)
    else:
        unit = "equivalent TOPS" if args.kernel == "wgmma" else "bytes / time"
        print(f"| build flags | shape | M | time | {unit} |\n|---|---|---|---|---|", flush=True)
    variants = args.variant or ["base", "-DCOMET_WIDE_SKIP_RESCALE", "-DCOMET_WIDE_SKIP_MMA", "-DCOMET_WIDE_SKIP_LOAD"]
    for flags in variants:
        env = dict(os.environ, COMET_QUANT_NVCC_FLAGS="" if flags == "base" else flags)
        cmd = [sys.executable, __file__, "--child", "--kernel", args.kernel, "--ms", args.ms] + (
            ["--quick"] if args.quick else []) + ["--splits", args.splits]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
