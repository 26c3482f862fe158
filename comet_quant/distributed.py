"""Calibration spread over several GPUs (or CPU processes) with torch.distributed.

Data parallel, layer by layer: every rank loads the model lazily, takes every world-th
calibration sample, runs each decoder layer over its share, and the per-channel statistics
and Hessians are all-reduced (max for absmax, sums for moments and E[x x^T]) before rank 0
writes the layer's file. NCCL on GPUs (rank r uses cuda:r), gloo on the CPU.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

from .errors import CometError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, ref, samples, cfg, device: str, out: str) -> None:
    import torch.distributed as dist

    from .calibrate import calibrate_layers
    from .lazy import LayerwiseModel

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calibrate_layers(LayerwiseModel(ref), samples, cfg, device, Path(out), rank, world,
                         progress=rank == 0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization. CI once saw a rank abort there ("terminate called
    # without an active exception") after all of its work was done; the likely cause (inferred,
    # never reproduced here) is a C++ thread (gloo's, or torch's thread pools) that reaches for the
    # GIL while Python finalizes and is unwound through a noexcept frame. Every file this rank
    # wrote is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def calibrate_distributed(ref, samples: torch.Tensor, cfg, device: str, out: Path, world: int) -> None:
    """Run :func:`comet_quant.calibrate.calibrate_layers` on ``world`` ranks (see module doc)."""
    import torch.multiprocessing as mp

    if device == "cuda" and world > torch.cuda.device_count():
        raise CometError(f"{world} workers requested but only {torch.cuda.device_count()} GPUs are "
                         "visible; lower --workers")
    try:
        mp.spawn(_worker, args=(world, _free_port(), ref, samples, cfg, device, str(out)),
                 nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:
        raise CometError(f"a calibration worker failed: {str(exc).strip().splitlines()[-1]}") from None
    except mp.ProcessExitedException as exc:
        raise CometError(f"calibration worker {exc.error_index} died ({str(exc).strip()}); rerun with "
                         "--resume to keep the finished layers, or with --workers 1") from None
