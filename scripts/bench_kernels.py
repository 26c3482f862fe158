"""Benchmark the W4Ax GEMM and activation quantization against cuBLAS fp16, fp8 and int8.

Medians of CUDA-event timings of CUDA-graph replays (so host launch overhead is not counted,
for any library); each timed call uses a different copy of its weights so the
working set exceeds L2 and weights stream from HBM as they do in a real model. Prints a
markdown table and writes it (plus JSON) to --out, then each row against the H100 targets
(bench_targets.md: speedups per scheme, met or not, and how near the byte and tensor-core bounds).

    python scripts/bench_kernels.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comet_quant import ops  # noqa: E402

SHAPES = {  # name: (N, K)
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate+up": (28672, 4096), "8B down": (4096, 14336),
    "70B qkv": (10240, 8192), "70B o": (8192, 8192), "70B gate+up": (57344, 8192), "70B down": (8192, 28672),
}
MS = [1, 16, 64, 256, 1024, 4096]
L2_FLUSH_BYTES = 256 << 20
COPY_TBPS = 3.0       # measured device-to-device copy, read + write (DESIGN.md)
INT8_WGMMA_TOPS = 1979  # dense int8 wgmma, H100 SXM datasheet (DESIGN.md)


def timeit(fns, reps: int = 15, warmup: int = 3, per_graph: int = 24) -> float:
    """Median milliseconds per call of fns[i % len(fns)]().

    The calls are captured into a CUDA graph (``per_graph`` calls rotating over fns) and the
    graph is replayed: the time is what the GPU spends, not the host's launch overhead, which
    would otherwise floor every small kernel at ~20 us (METHOD.md: "capture a graph and time
    its replays"). The same method for every library in the table.
    """
    for fn in fns:  # eager first: cuBLAS handles and workspaces are created outside the capture
        fn()
    torch.cuda.synchronize()
    n = max(per_graph, len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fns[i % len(fns)]()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    del graph
    return statistics.median(times)


def weight_bytes(n: int, k: int) -> float:
    """Packed int4 weights [n, k] and their fp16 group scales, in bytes."""
    return n * k / 2 + n * (k // ops.GROUP) * 2


def copies(nbytes: int) -> int:
    return max(1, min(12, -(-L2_FLUSH_BYTES // max(nbytes, 1))))


def plan_label(m, n, k, split_k=0, int_scales=False) -> str:
    """The wgmma GEMM's plan for a shape: its token tile, then "/S" for split-K in S parts or
    "/sk" for stream-K, "/p" for a persistent grid (fewer blocks than tiles), "x" where the weights
    are expanded to int8 first (torch.ops.comet.wide_tile)."""
    tokens, split, blocks, _, expand = torch.ops.comet.wide_tile(m, n, k, split_k, int_scales)
    persistent = split == 1 and blocks < -(-m // tokens) * -(-n // 128)
    return (f"{tokens}" + ("/sk" if split == -1 else f"/{split}" if split > 1 else "/p" if persistent else "")
            + ("x" if expand else ""))


def int_scale_weights(n, g, nc, dev):
    """[nc] copies of integer-group-scale weight scales (int_group_scales): fp16 row scales and
    group scales = row scale x an integer in [1, 16]."""
    rows = [torch.rand(n, device=dev, dtype=torch.float16) * 1e-3 + 1e-4 for _ in range(nc)]
    return rows, [(r[:, None].float() * torch.randint(1, 17, (n, g), device=dev)).half() for r in rows]


def time_fp16(x, n) -> float:
    """Median ms of cuBLAS fp16 x [M, K] @ W.T, W [n, K] (weights rotating past L2)."""
    k = x.shape[1]
    w16 = [torch.randn(n, k, device=x.device, dtype=torch.float16) for _ in range(copies(n * k * 2))]
    return timeit([lambda w=w: torch.nn.functional.linear(x, w) for w in w16])


def time_fp8(m, n, k) -> float:
    """Median ms of fp8 e4m3 ``torch._scaled_mm`` with row-wise scales (Hopper wgmma), M padded to
    16 as _scaled_mm requires. Raises RuntimeError where the device or build has none."""
    mp = max(16, -(-m // 16) * 16)
    xa = torch.randn(mp, k, device="cuda").to(torch.float8_e4m3fn)
    sa = torch.ones(mp, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    w8 = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies(n * k))]
    return timeit([lambda w=w: torch._scaled_mm(xa, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                   for w in w8])


def bench_shape(name, n, k, m, results, split_k_off: bool):
    g = k // ops.GROUP
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    row = {"shape": name, "M": m, "N": n, "K": k}
    row["fp16"] = time_fp16(x, n)
    try:
        row["fp8"] = time_fp8(m, n, k)
    except RuntimeError as exc:
        row["fp8"] = None
        row["fp8_error"] = str(exc).splitlines()[0][:120]
    # int8 cuBLASLt
    mi = max(17, m)
    xi = torch.randint(-127, 127, (mi, k), device=dev, dtype=torch.int8)
    wi = [torch.randint(-127, 127, (k, n), device=dev, dtype=torch.int8) for _ in range(copies(n * k))]
    try:
        row["int8"] = timeit([lambda w=w: torch._int_mm(xi, w) for w in wi])
    except RuntimeError as exc:
        row["int8"] = None
        row["int8_error"] = str(exc).splitlines()[0][:120]
    del wi
    # ours: GEMM at 0 / 10 / 25 % 8-bit groups, and the activation quantization kernel
    nc = copies(n * k // 2)
    qws = [torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8) for _ in range(nc)]
    wss = [torch.rand(n, g, device=dev, dtype=torch.float16) * 0.01 + 1e-3 for _ in range(nc)]
    perm = torch.randperm(k, device=dev).to(torch.int32)
    wide = ops.uses_wide_gemm(x, qws[0])  # sm_90 and enough tokens: what w4ax_linear runs
    row["path"] = "wgmma" if wide else ("decode" if m <= 32 else "tiled")
    if wide:  # its token tile, and split-K ("/2"), stream-K ("/sk") or persistent ("/p"), if any
        row["path"] += " " + plan_label(m, n, k)
        row["int_path"] = plan_label(m, n, k, int_scales=True)
    for pct in (0, 10, 25):
        g8 = round(g * pct / 100)
        q8, q4, s = ops.quantize_act(x, perm, g8)
        tiled = [lambda i=i: torch.ops.comet.w4ax_gemm(q8, q4, s, qws[i], wss[i], g8, 0, False, torch.float16)
                 for i in range(nc)]
        if wide:
            qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8)
            row[f"ours{pct}"] = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(
                qa, scales_t, qws[i], wss[i], 0, torch.float16) for i in range(nc)])
            if pct == 10:
                row["tiled10"] = timeit(tiled)
                row["ours10_nosplit"] = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(
                    qa, scales_t, qws[i], wss[i], 1, torch.float16) for i in range(nc)])
                row["actq"] = timeit([lambda: torch.ops.comet.quantize_act_wide(x, perm, g8)])
                act_bytes = m * k * 2 + qa.numel() + scales_t.numel() * 4 + perm.numel() * 4
                # Integer group scales (int_group_scales): group scales = row scale x 1..16.
                rows, wsi = int_scale_weights(n, g, nc, dev)
                qai, sti = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True)
                row["int10"] = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(
                    qai, sti, qws[i], wsi[i], 0, torch.float16, rows[i], g8) for i in range(nc)])
                row["actq_int"] = timeit([lambda: torch.ops.comet.quantize_act_wide(x, perm, g8, False, True)])
                # ... with a8_span_scales: the 8-bit groups of a span share a scale, summed in int32.
                qas, sts = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True, True)
                row["int10_a8span"] = timeit([lambda i=i: torch.ops.comet.w4ax_gemm_wide(
                    qas, sts, qws[i], wsi[i], 0, torch.float16, rows[i], g8, 0, True) for i in range(nc)])
        else:
            row[f"ours{pct}"] = timeit(tiled)
            if pct == 10 and not split_k_off:
                row["ours10_nosplit"] = timeit([lambda i=i: torch.ops.comet.w4ax_gemm(
                    q8, q4, s, qws[i], wss[i], g8, 1, False, torch.float16) for i in range(nc)])
            if pct == 10:
                row["actq"] = timeit([lambda: ops.quantize_act(x, perm, g8)])
                act_bytes = m * k * 2 + q8.numel() + q4.numel() + s.numel() * 4 + perm.numel() * 4
        if pct == 10:
            row["actq_tbps"] = act_bytes / (row["actq"] * 1e-3) / 1e12
    wbytes = weight_bytes(n, k)
    row["ours10_wbw_tbps"] = wbytes / (row["ours10"] * 1e-3) / 1e12
    row["ours10_tops"] = 2 * m * n * k / (row["ours10"] * 1e-3) / 1e12
    row["roofline_ms"] = wbytes / (COPY_TBPS * 1e12) * 1e3  # weight reads at the measured copy traffic rate
    results.append(row)
    return row


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(results) -> str:
    head = ("| shape | M | fp16 ms | fp8 ms | int8 ms | path | ours 0% | ours 10% | ours 25% | 10% no split/stream-K |"
            " 10% mma.sync tiled | x fp16 | x fp8 | weight TB/s | TOPS | act-quant TB/s |"
            " int scales 10% | int path | int x fp16 | int x fp8 | int act-quant ms |"
            " int a8span 10% | a8span x fp16 | a8span x fp8 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        fp8 = r.get("fp8")
        lines.append(
            f"| {r['shape']} | {r['M']} | {fmt(r['fp16'])} | {fmt(fp8)} | {fmt(r.get('int8'))} | {r['path']} | "
            f"{fmt(r['ours0'])} | {fmt(r['ours10'])} | {fmt(r['ours25'])} | {fmt(r.get('ours10_nosplit'))} | "
            f"{fmt(r.get('tiled10'))} | "
            f"{r['fp16'] / r['ours10']:.2f} | {fmt(fp8 / r['ours10'] if fp8 else None, 2)} | "
            f"{r['ours10_wbw_tbps']:.2f} | {r['ours10_tops']:.0f} | {r['actq_tbps']:.2f} | "
            f"{fmt(r.get('int10'))} | {r.get('int_path', 'n/a')} | "
            f"{fmt(r['fp16'] / r['int10'] if r.get('int10') else None, 2)} | "
            f"{fmt(fp8 / r['int10'] if fp8 and r.get('int10') else None, 2)} | {fmt(r.get('actq_int'), 4)} | "
            f"{fmt(r.get('int10_a8span'))} | "
            f"{fmt(r['fp16'] / r['int10_a8span'] if r.get('int10_a8span') else None, 2)} | "
            f"{fmt(fp8 / r['int10_a8span'] if fp8 and r.get('int10_a8span') else None, 2)} |")
    return "\n".join(lines)


TARGETS = [  # (applies to M, what, speedup over fp16, speedup over fp8): the H100 targets
    (lambda m: m <= 16, "M <= 16", 3.0, 1.5),
    (lambda m: m == 256, "M = 256", 2.0, None),
    (lambda m: m >= 1024, "M >= 1024", 1.6, 1.0),
]


def targets_table(results) -> str:
    """Each row against its target (10% 8-bit groups), per scheme: free group scales (the
    default), integer group scales, integer + a8_span_scales (the wgmma path; the decode kernels
    take every scheme's scales as products, so M <= 16 has one column). For the fastest scheme:
    "bytes %", its packed weight + scale bytes per second over the measured 3.0 TB/s copy traffic
    rate; "int8 TC %", its TOPS over the 1,979 TOPS int8 wgmma peak. Together they say which
    bound is nearer."""
    head = ("| shape | M | target (x fp16 / x fp8) | free scales | int scales | int + a8span |"
            " best | met | bytes % | int8 TC % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        target = next((t for t in TARGETS if t[0](r["M"])), None)
        if target is None:
            continue
        _, what, t16, t8 = target
        fp8 = r.get("fp8")
        cells, best = [], None
        for key in ("ours10", "int10", "int10_a8span"):
            ms = r.get(key)
            if ms is None:
                cells.append("n/a")
                continue
            x16, x8 = r["fp16"] / ms, (fp8 / ms if fp8 else None)
            cells.append(f"{x16:.2f} / {fmt(x8, 2)}")
            if best is None or ms < best[0]:
                best = (ms, key, x16, x8)
        ms, key, x16, x8 = best
        met = x16 >= t16 and (t8 is None or (x8 is not None and x8 >= t8))
        label = {"ours10": "free", "int10": "int", "int10_a8span": "a8span"}[key]
        tops = 2 * r["M"] * r["N"] * r["K"] / (ms * 1e-3) / 1e12
        lines.append(
            f"| {r['shape']} | {r['M']} | {what}: {t16} / {t8 if t8 else '-'} | " + " | ".join(cells)
            + f" | {label} | {'yes' if met else 'no'} | {100 * r['roofline_ms'] / ms:.0f} |"
            f" {100 * tops / INT8_WGMMA_TOPS:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    if not ops.kernels_available():
        sys.exit(f"kernels unavailable: {ops._state['error']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for m in map(int, args.ms.split(",")):
            r = bench_shape(name, n, k, m, results, split_k_off=False)
            print(f"{name} M={m}: fp16 {r['fp16']:.3f} fp8 {fmt(r['fp8'])} ours10 {r['ours10']:.3f} "
                  f"int10 {fmt(r.get('int10'))} a8span {fmt(r.get('int10_a8span'))} ms", flush=True)
            torch.cuda.empty_cache()
            md = write_tables(out, props, results)  # after every row: a run cut short keeps its rows
    print(md)
    print("\n" + targets_table(results))
    print(f"tables written to {out / 'bench_kernels.md'} and {out / 'bench_targets.md'}")


def write_tables(out: Path, props, results) -> str:
    gpu = f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}\n\n"
    md = gpu + table(results)
    (out / "bench_kernels.md").write_text(md + "\n")
    (out / "bench_kernels.json").write_text(json.dumps(results, indent=1))
    (out / "bench_targets.md").write_text(gpu + targets_table(results) + "\n")
    return md


if __name__ == "__main__":
    main()
