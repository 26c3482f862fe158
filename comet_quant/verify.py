"""Verify an exported checkpoint on the GPU: every quantized linear through the kernels and the
reference, on calibration-like activations; report the worst relative error per layer type."""
from __future__ import annotations

import math

import torch

from .checkpoint import open_checkpoint
from .errors import CometError
from .models import LINEAR_SITE

DEFAULT_TOLERANCE = 1e-2
#: Activations with a few large channels, like real LLM inputs: channel perm[j] gets scale
#: 1 + OUTLIER_GAIN * exp(-j / OUTLIER_SPREAD), so FMPQ's leading groups hold the outliers.
OUTLIER_GAIN, OUTLIER_SPREAD = 30.0, 16.0


def _activations(perm: torch.Tensor, k: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    j = torch.arange(perm.numel(), dtype=torch.float32)
    scale = torch.ones(k)
    real = perm.long() < k
    scale[perm.long()[real]] = (1 + OUTLIER_GAIN * torch.exp(-j / OUTLIER_SPREAD))[real]
    return (torch.randn(tokens, k, generator=gen) * scale).to(torch.float16)


def verify_checkpoint(path, tolerance: float = DEFAULT_TOLERANCE, tokens: int = 64, seed: int = 0) -> dict:
    """Check the checkpoint's integrity, then run the kernels against the reference on every
    linear; returns {layer type: worst error}. Integrity problems (missing, truncated or edited
    files, tensors that do not match the config) raise CometError on any machine."""
    ckpt = open_checkpoint(path)
    print(f"integrity: OK ({len(ckpt.manifest_files)} files match their sha256; tensor shapes "
          f"match the config of scheme '{ckpt.scheme.name}')")
    if not torch.cuda.is_available():
        raise CometError("the kernel check of comet-quant verify needs an NVIDIA GPU; on this "
                         "machine use `comet-quant eval perplexity` (simulated quantization)")
    from . import ops

    s = ckpt.scheme
    if s.kernel_gap():
        raise CometError(s.kernel_gap())
    ops.build()
    tensors = ckpt.tensors()
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, float] = {}
    for i in range(ckpt.num_layers):
        for lin, site in LINEAR_SITE.items():
            p = f"model.layers.{i}.{lin}"
            perm = tensors[f"{p}.act_perm"]
            qw, ws = tensors[f"{p}.qweight"].cuda(), tensors[f"{p}.wscale"].cuda()
            groups = perm.numel() // ops.GROUP
            g8 = groups if s.a_bits == 8 else int(tensors[f"{p}.act_groups8"][0])
            k = int(ckpt.qconfig["layers"][str(i)][site]["k"])
            x = _activations(perm, k, tokens, gen).cuda()
            perm = perm.cuda()
            rows = tensors[f"{p}.wscale_row"].cuda() if s.int_group_scales else None
            y = ops.w4ax_linear(x, perm, g8, qw, ws, torch.float32, s.rotate, rows, s.a8_span_scales)
            ref = ops.w4ax_gemm_reference(*ops.quantize_act_reference(x, perm, g8, s.rotate, s.int_group_scales,
                                                                      s.a8_span_scales),
                                          qw, ws, g8, torch.float32)
            err = float((y - ref).norm() / ref.norm().clamp_min(1e-12))
            if not math.isfinite(err):
                err = math.inf
            kind = lin.split(".")[-1]
            worst[kind] = max(worst.get(kind, 0.0), err)
    return {"tolerance": tolerance, "worst": worst, "ok": all(e <= tolerance for e in worst.values())}
