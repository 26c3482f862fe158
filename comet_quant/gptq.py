"""GPTQ (Frantar et al. 2022) for int4 weights with static groups along K.

Pure function of a weight and its input Hessian; both already in the permuted channel order,
so each quantization group is a contiguous run of ``group_size`` permuted channels, matching
the activation groups the kernel sees.
"""
from __future__ import annotations

import torch

from .errors import CometError
from .primitives import quantize_weight_with, weight_qparams

MAX_DAMP_RETRIES = 8


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising dampening until H is positive definite."""
    diag = torch.arange(h.shape[0], device=h.device)
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    for attempt in range(MAX_DAMP_RETRIES):
        hd = h.clone()
        hd[diag, diag] += damp * (10 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise CometError("GPTQ: the Hessian is not positive definite even with strong dampening; "
                     "calibrate on more samples or use w_method='rtn'")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int, symmetric: bool,
                  damp: float = 0.01, block: int = 128, act_order: bool = False, clip: bool = False,
                  row_scale: torch.Tensor | None = None):
    """Quantize ``w`` with GPTQ error compensation.

    Args:
        w: float [N, K] weight (permuted columns, K a multiple of ``group_size``).
        hessian: float [K, K], ``E[x x^T]`` of the layer input in the same order.
        block: columns per lazy batch update; rounded to a multiple of ``group_size``.
        act_order: visit columns in order of decreasing Hessian diagonal (largest input
            energy first) so the most important columns are rounded before they absorb error
            from others. Groups stay the static runs of ``group_size`` columns the kernel
            uses, so their scales are fixed from the unmodified weight before the sweep.
        clip: choose each group's scale with the clipping search of
            :func:`~comet_quant.primitives.weight_qparams`, weighting columns by the Hessian
            diagonal.
        row_scale: float [N]: group scales on its integer grid (``int_group_scales``,
            :func:`~comet_quant.primitives.int_row_scales` of the unmodified weight).
    Returns:
        q: int8 [N, K] int4 codes (signed, or unsigned with ``zero``);
        scale: float32 [N, K / group_size]; zero: uint8 [N, K / group_size] or None.
    """
    n, k = w.shape
    if hessian.shape != (k, k):
        raise CometError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight K={k}")
    W = w.float().clone()
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ng = k // group_size
    diag = H.diagonal().clone()
    scale = torch.zeros(n, ng, device=W.device)
    zero = None if symmetric else torch.zeros(n, ng, dtype=torch.uint8, device=W.device)
    order = None
    if act_order:
        # Static groups: scales from the whole weight up front; then sweep the columns by
        # decreasing input energy, each quantized with its own group's scale.
        scale, zero = weight_qparams(W, group_size, symmetric, clip, diag, row_scale)
        order = torch.argsort(diag, descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
        group_of = (order // group_size).to(W.device)
    Hinv = _inverse_cholesky(H, damp)
    block = max(group_size, (block // group_size) * group_size)
    Q = torch.zeros(n, k, dtype=torch.int8, device=W.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if order is None:
                gi = col // group_size
                if col % group_size == 0:
                    s, z = weight_qparams(W1[:, i:i + group_size], group_size, symmetric, clip,
                                          diag[col:col + group_size], row_scale)
                    scale[:, gi] = s[:, 0]
                    if zero is not None:
                        zero[:, gi] = z[:, 0]
            else:
                gi = int(group_of[col])
            s = scale[:, gi:gi + 1]
            z = None if zero is None else zero[:, gi:gi + 1]
            q = quantize_weight_with(W1[:, i:i + 1], s, z, 1)
            Q[:, col] = q[:, 0]
            dq = (q.float() - (0.0 if z is None else z.float())) * s
            err = (W1[:, i] - dq[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if order is not None:
        Q = Q[:, torch.argsort(order)]
    return Q, scale, zero
