"""Calibration speed on one GPU vs all visible GPUs (torch.distributed data parallel).

Builds a random LLaMA-3-8B-shaped model (see memory_profile.py) and calibrates it with GPTQ
Hessians, first with one worker, then with one worker per GPU; prints wall times, the speedup
and the largest difference between the two sets of statistics.

    python scripts/multi_gpu_calibration.py --work /tmp/mgpu --layers 8 --nsamples 256
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from memory_profile import build  # noqa: E402

from comet_quant.calibrate import CalibrationConfig, calibrate  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/comet-mgpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    if gpus < 2:
        sys.exit(f"needs at least 2 GPUs, found {gpus}")
    work = Path(args.work)
    model = work / f"llama3-8b-shape-{args.layers}l"
    build(model, args.layers)
    times, outs = {}, {}
    for workers in (1, gpus):
        out = work / f"calib-{workers}"
        cfg = CalibrationConfig(dataset="calib", nsamples=args.nsamples, seqlen=args.seqlen, hessians=True,
                                batch_size=8, device="cuda", workers=workers)
        t0 = time.time()
        calibrate(str(model), out, cfg, overwrite=True)
        times[workers], outs[workers] = time.time() - t0, out
    worst = 0.0
    for i in range(args.layers):
        a = load_file(outs[1] / f"layer_{i:03d}.safetensors")
        b = load_file(outs[gpus] / f"layer_{i:03d}.safetensors")
        worst = max(worst, max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a))
    name = torch.cuda.get_device_name(0)
    table = (f"GPU: {gpus} x {name}; LLaMA-3-8B-shaped, {args.layers} layers, {args.nsamples} x {args.seqlen} "
             f"tokens, GPTQ Hessians\n\n| workers | wall time (s) | speedup |\n|---|---|---|\n"
             f"| 1 | {times[1]:.1f} | 1.00 |\n| {gpus} | {times[gpus]:.1f} | {times[1] / times[gpus]:.2f} |\n\n"
             f"largest relative difference of any statistic (1 vs {gpus} workers): {worst:.2e}\n")
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
