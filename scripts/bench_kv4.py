"""Benchmark the 4-bit KV-cache decode attention against FP16 SDPA over an FP16 cache.

LLaMA-3-8B attention shape (8 KV heads, 32 query heads, head_dim 128), one query token per
sequence. Medians of CUDA-event timings; reports the bytes each side reads from its cache and
the achieved bandwidth against the measured ~3.0 TB/s copy rate.

    python scripts/bench_kv4.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import timeit  # noqa: E402

from comet_quant import ops  # noqa: E402
from comet_quant.kvcache import quantize_kv4  # noqa: E402

H, REP, D = 8, 4, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--lengths", default="1024,4096")
    args = ap.parse_args()
    ops.build()
    rows = []
    for b in map(int, args.batches.split(",")):
        for t in map(int, args.lengths.split(",")):
            k = torch.randn(b, H, t, D, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            q = torch.randn(b, H * REP, D, device="cuda", dtype=torch.float16)
            kc, vc = quantize_kv4(k), quantize_kv4(v)
            ours = timeit([lambda q=q, kc=kc, vc=vc, t=t: torch.ops.comet.kv4_decode_attention(
                q, *kc, *vc, t, D ** -0.5)])
            fp = timeit([lambda q4=q[:, :, None], k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                q4, k, v, enable_gqa=True)])
            bytes4 = sum(x.numel() * x.element_size() for x in (*kc, *vc))
            bytes16 = 2 * k.numel() * 2
            rows.append({"batch": b, "length": t, "kv4_ms": ours, "fp16_sdpa_ms": fp,
                         "speedup": fp / ours, "kv4_TBps": bytes4 / ours / 1e9,
                         "fp16_TBps": bytes16 / fp / 1e9})
            del k, v, kc, vc
    lines = [f"{torch.cuda.get_device_name()}: decode attention, 8 KV heads x 4, head_dim 128",
             "| batch | context | KV4 kernel ms | FP16 SDPA ms | speedup | KV4 TB/s | FP16 TB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['length']} | {r['kv4_ms']:.4f} | {r['fp16_sdpa_ms']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['kv4_TBps']:.2f} | {r['fp16_TBps']:.2f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv4_bench.md").write_text(text + "\n")
    (out / "kv4_bench.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
