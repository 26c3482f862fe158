"""Reference quantization primitives in pure PyTorch.

These functions define the numerics of the checkpoint format. They are the CPU path, the
fallback where no kernel is built, and the oracle the CUDA kernels are tested against.
Integers are returned as int8/uint8 tensors holding the quantized values; "packed" int4 means
two values per uint8, the even index in the low nibble.
"""
from __future__ import annotations

import torch

from .errors import CometError

INT4_MIN, INT4_MAX = -8, 7
UINT4_MAX = 15
INT8_MAX = 127
#: Smallest scale used for an all-zero group, so that dequantization stays finite and exact.
MIN_SCALE = 1e-8
#: Largest integer multiplier of a group scale under ``int_group_scales``: a 4-bit code times it
#: stays an int8 ([-8, 7] x 16 = [-128, 112]), so the Hopper kernel can sum whole rows of
#: groups in integer.
SCALE_MULT_MAX = 16
#: Activation groups that share one token scale under ``int_group_scales``: the 4-bit groups of
#: each span of 16 groups (2,048 channels, counted from the row start) of a token.
SCALE_SPAN = 16


def qmax_for_bits(bits: int) -> int:
    """Largest magnitude of a symmetric signed integer code of ``bits`` bits (7 or 127)."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit codes are supported, got {bits}")
    return (1 << (bits - 1)) - 1


def _check_groups(k: int, group_size: int) -> int:
    if group_size <= 0 or k % group_size != 0:
        raise CometError(
            f"dimension {k} is not a multiple of the group size {group_size}; "
            "pad to the group boundary (k_policy='pad') or choose a group size that divides it"
        )
    return k // group_size


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise CometError(f"{what} contain NaN or inf values; check the model weights / inputs")


# ---------------------------------------------------------------------------------------------
# Symmetric per-group quantization (activations, symmetric weights)
# ---------------------------------------------------------------------------------------------

def round_up_significant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Positive float32 ``x`` rounded up to ``bits`` significant bits (exact integer ops)."""
    drop = 24 - bits
    v = x.float().contiguous().view(torch.int32)
    return ((v + ((1 << drop) - 1)) & ~((1 << drop) - 1)).view(torch.float32)


def span_max(amax: torch.Tensor, first_group: int = 0) -> torch.Tensor:
    """float32 [R, G]: for each group of ``amax`` [R, G] (groups ``first_group ..`` of the row),
    the largest ``amax`` among the groups here of its span (:data:`SCALE_SPAN` groups, counted
    from group 0 of the row)."""
    r, g = amax.shape
    total = -(-(first_group + g) // SCALE_SPAN) * SCALE_SPAN
    padded = torch.nn.functional.pad(amax, (first_group, total - first_group - g))
    smax = padded.reshape(r, -1, SCALE_SPAN).amax(-1, keepdim=True).expand(-1, -1, SCALE_SPAN)
    return smax.reshape(r, total)[:, first_group:first_group + g]


def int_token_scales(amax: torch.Tensor, qmax: int, first_group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales of activations as span scales times integer multipliers (``int_group_scales``).

    Args:
        amax: float32 [R, G] group absmax; the groups are groups ``first_group ..`` of the row
            (spans of :data:`SCALE_SPAN` groups are counted from group 0 of the row).
    Returns:
        span: float32 [R, G], the scale of each group's span: ``max(amax over the span's groups
            here) / (qmax * 16)`` rounded up to 20 significant bits (so ``span * m`` is exact in
            float32); mult: float32 [R, G] integers in [1, 16], ``ceil(amax / (qmax * span))``:
            the smallest multiplier whose range holds the group.
    """
    smax = span_max(amax, first_group)
    span = round_up_significant((smax / torch.full_like(smax, qmax * SCALE_MULT_MAX)).clamp_min(MIN_SCALE), 20)
    mult = torch.ceil(amax / (span * qmax)).clamp_(1, SCALE_MULT_MAX)
    return span, mult


def shared_span_scales(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """One scale for all groups of each span (``a8_span_scales``): float32 [R, G], every group
    of span s (groups 16s .. 16s + 15 of ``amax``, counted from its first column) gets
    ``max(amax over those groups) / qmax`` (floored at MIN_SCALE), with IEEE division as the
    kernels compute it."""
    smax = span_max(amax)
    return (smax / torch.full_like(smax, qmax)).clamp_min(MIN_SCALE)


def quantize_symmetric(x: torch.Tensor, bits: int, group_size: int, int_scales: bool = False,
                       first_group: int = 0, span_shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization with one scale per row and group.

    Args:
        x: float [R, K], K a multiple of ``group_size``.
        int_scales: every group scale is its span's scale times an integer in [1, 16]
            (:func:`int_token_scales`; ``x`` holds groups ``first_group ..`` of the row)
            instead of the group's own absmax / qmax.
        span_shared: the groups of each span of 16 (counted from ``x``'s first group) share
            one scale, their largest absmax / qmax (:func:`shared_span_scales`).
    Returns:
        q: int8 [R, K], values in [-qmax, qmax] (qmax = 7 for 4 bits, 127 for 8 bits).
        scale: float32 [R, K // group_size], ``x ~= q * scale`` group-wise.
    """
    r, k = x.shape
    g = _check_groups(k, group_size)
    _check_finite(x, "activations")
    qmax = qmax_for_bits(bits)
    xg = x.float().reshape(r, g, group_size)
    amax = xg.abs().amax(dim=-1)
    if int_scales and g:
        span, mult = int_token_scales(amax, qmax, first_group)
        scale = span * mult
    elif span_shared:
        scale = shared_span_scales(amax, qmax)
    else:
        # A tensor divisor keeps true IEEE division on every device (CUDA turns a scalar
        # divisor into a reciprocal multiply), so the reference and the kernels agree bitwise.
        scale = (amax / torch.full_like(amax, qmax)).clamp_min(MIN_SCALE)
    # Codes are round(x * (1 / s)): one IEEE division per group, which is what the kernel does.
    inv = torch.ones_like(scale) / scale
    q = torch.round(xg * inv[..., None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(r, k), scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric`: int8 [R, K] x float [R, K/g] -> float32 [R, K]."""
    r, k = q.shape
    g = _check_groups(k, group_size)
    return (q.float().reshape(r, g, group_size) * scale.float()[..., None]).reshape(r, k)


# ---------------------------------------------------------------------------------------------
# Weights: int4 per output channel and K group, symmetric or asymmetric
# ---------------------------------------------------------------------------------------------

def weight_qparams(w: torch.Tensor, group_size: int, symmetric: bool, clip: bool = False,
                   col_weight: torch.Tensor | None = None,
                   row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) of int4 weight quantization.

    Args:
        w: float [N, K].
        clip: search, per row and group, the range shrink factor in :data:`CLIP_GRID` that
            minimizes the (``col_weight``-weighted) squared rounding error, instead of using
            the full min/max range.
        col_weight: float [K] importance of each input column for the clipping search (the
            layer input's mean square, so the error measured is the output error's diagonal
            term); uniform when None.
        row_scale: float32 [N] (``int_group_scales``, symmetric only; see
            :func:`int_row_scales`): every group scale is ``row_scale * m`` with an integer
            ``m`` in [1, 16], the smallest that holds the group's range, or with ``clip`` the
            one of the 16 with the least weighted rounding error.
    Returns:
        scale: float32 [N, K/g]; zero: uint8 [N, K/g] in [0, 15] for asymmetric, else None.
    """
    n, k = w.shape
    g = _check_groups(k, group_size)
    wg = w.float().reshape(n, g, group_size)
    if row_scale is not None and not symmetric:
        raise CometError("integer group scales (int_group_scales) need symmetric weights; "
                         "set w_symmetric=true")
    rs = None if row_scale is None else row_scale.float().to(w.device)[:, None].expand(n, g)
    if not clip:
        if rs is not None:
            return rs * torch.ceil(wg.abs().amax(-1) / (rs * INT4_MAX)).clamp_(1, SCALE_MULT_MAX), None
        return _range_qparams(wg.amin(-1), wg.amax(-1), symmetric)
    cw = (torch.ones(k, device=w.device) if col_weight is None else col_weight.float().to(w.device))
    cw = cw.reshape(1, g, group_size)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    best_err = best_scale = best_zero = None
    if rs is not None:
        candidates = [(rs * m, None) for m in range(1, SCALE_MULT_MAX + 1)]
    else:
        candidates = (_range_qparams(wmin * alpha, wmax * alpha, symmetric) for alpha in CLIP_GRID)
    for scale, zero in candidates:
        q = quantize_weight_with(wg.reshape(n, k), scale, zero, group_size).reshape(n, g, group_size)
        deq = (q.float() - (0.0 if zero is None else zero.float()[..., None])) * scale[..., None]
        err = ((deq - wg).square() * cw).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


#: Range shrink factors tried by the weight clipping search (1.0 = no clipping).
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))


def int_row_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row scales of ``int_group_scales`` weights: float32 [N] holding fp16 values.

    ``max(group absmax) / (7 * 16)``, rounded up to an fp16 value of at most 7 significant bits,
    so that every group scale ``row * m`` (m in [1, 16]) is exact in the checkpoint's fp16.
    """
    n, k = w.shape
    g = _check_groups(k, group_size)
    amax = w.float().reshape(n, g, group_size).abs().amax(-1).amax(-1)
    s = _half_round_up((amax / (INT4_MAX * SCALE_MULT_MAX)).clamp_min(MIN_SCALE))
    h = s.half().view(torch.int16)
    return ((h + 15) & ~15).view(torch.float16).float()


def _range_qparams(wmin: torch.Tensor, wmax: torch.Tensor, symmetric: bool):
    if symmetric:
        return (torch.maximum(wmin.abs(), wmax.abs()) / INT4_MAX).clamp_min(MIN_SCALE), None
    wmin, wmax = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
    scale = ((wmax - wmin) / UINT4_MAX).clamp_min(MIN_SCALE)
    zero = torch.round(-wmin / scale).clamp_(0, UINT4_MAX).to(torch.uint8)
    return scale, zero


def quantize_weight_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    """Round ``w`` [N, K] with given per-group params.

    Returns int8 [N, K]: signed codes in [-8, 7] when ``zero`` is None, else unsigned codes in
    [0, 15] (stored in int8; dequantize as ``(q - zero) * scale``).
    """
    n, k = w.shape
    g = _check_groups(k, group_size)
    wg = w.float().reshape(n, g, group_size) / scale.float()[..., None]
    if zero is None:
        q = torch.round(wg).clamp_(INT4_MIN, INT4_MAX)
    else:
        q = (torch.round(wg) + zero.float()[..., None]).clamp_(0, UINT4_MAX)
    return q.to(torch.int8).reshape(n, k)


def quantize_weight_rtn(w: torch.Tensor, group_size: int, symmetric: bool, clip: bool = False,
                        col_weight: torch.Tensor | None = None, row_scale: torch.Tensor | None = None):
    """Round-to-nearest int4 weights. Returns (q int8 [N, K], scale f32 [N, K/g], zero|None).

    ``clip``/``col_weight``: the clipping search of :func:`weight_qparams`; ``row_scale``: group
    scales on its integer grid (``int_group_scales``, :func:`int_row_scales`).
    """
    _check_finite(w, "weights")
    scale, zero = weight_qparams(w, group_size, symmetric, clip, col_weight, row_scale)
    return quantize_weight_with(w, scale, zero, group_size), scale, zero


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """int4 codes [N, K] (int8/uint8) -> float32 [N, K]."""
    n, k = q.shape
    g = _check_groups(k, group_size)
    qg = q.to(torch.int16).float().reshape(n, g, group_size)
    if zero is not None:
        qg = qg - zero.float()[..., None]
    return (qg * scale.float()[..., None]).reshape(n, k)


# ---------------------------------------------------------------------------------------------
# int4 packing: two codes per byte, even column in the low nibble
# ---------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes [R, K] (signed [-8, 7] or unsigned [0, 15]) into uint8 [R, K/2].

    The low nibble holds column 2j, the high nibble column 2j+1; signed codes are stored in
    two's complement, which is what int4 tensor cores (s4) read.
    """
    r, k = q.shape
    if k % 2:
        raise CometError(f"cannot pack an odd number of int4 columns ({k})")
    if q.numel() and (q.min() < INT4_MIN or q.max() > UINT4_MAX):
        raise ValueError("values do not fit in 4 bits")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8).reshape(r, k // 2, 2)
    return nib[..., 0] | (nib[..., 1] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [R, K/2] -> int8 [R, K] (sign-extended if signed)."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    if signed:
        q = torch.where(q > INT4_MAX, q - 16, q)
    return q


# ---------------------------------------------------------------------------------------------
# Activations: permute, then per-token groups, 8-bit leading groups and 4-bit rest
# ---------------------------------------------------------------------------------------------

def pad_channels(x: torch.Tensor, k_padded: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` to ``k_padded`` channels."""
    k = x.shape[-1]
    if k == k_padded:
        return x
    return torch.nn.functional.pad(x, (0, k_padded - k))


def quantize_activation(x: torch.Tensor, perm: torch.Tensor, groups8: int, group_size: int,
                        low_bits: int = 4, high_bits: int = 8, int_scales: bool = False,
                        a8_spans: bool = False):
    """Reference of the fused activation-quantization kernel.

    Args:
        x: float [M, K] activations in the layer's original channel order.
        perm: int [K_pad]; channel ``j`` of the permuted input is ``pad(x)[:, perm[j]]``.
        groups8: number of leading permuted groups quantized with ``high_bits``.
        int_scales: the low-precision groups of each span of 16 groups of a token share one
            scale times integer multipliers (``int_group_scales``, :func:`int_token_scales`);
            the 8-bit groups keep their own scales, unless
        a8_spans: the 8-bit groups of each span of 16 share one scale per token, the largest
            absmax of them / 127 (``a8_span_scales``: the Hopper GEMM then sums them in int32
            too; the 8-bit groups are the row's first, so their spans start at group 0).
    Returns:
        q8: int8 [M, groups8 * g] codes of the high-precision groups.
        q4: int8 [M, K_pad - groups8 * g] codes in [-7, 7] of the low-precision groups
            (unpacked; see :func:`pack_int4`).
        scale: float32 [M, K_pad / g] per token and group.
    """
    xp = pad_channels(x, perm.numel()).index_select(-1, perm.long())
    k8 = groups8 * group_size
    q8, s8 = quantize_symmetric(xp[:, :k8], high_bits, group_size, span_shared=a8_spans)
    q4, s4 = quantize_symmetric(xp[:, k8:], low_bits, group_size, int_scales, groups8)
    return q8, q4, torch.cat((s8, s4), dim=1)


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix: float32 [n, n], n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n ** 0.5


def rotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [R, K] with every group of ``group_size`` columns multiplied by the Hadamard matrix."""
    r, k = x.shape
    h = hadamard(group_size).to(x.device, torch.float32)
    return (x.float().reshape(r, k // group_size, group_size) @ h).reshape(r, k)


def fake_quantize_activation(x: torch.Tensor, perm: torch.Tensor, groups8: int, group_size: int,
                             low_bits: int = 4, high_bits: int = 8, rotate: bool = False,
                             int_scales: bool = False, a8_spans: bool = False) -> torch.Tensor:
    """Permuted, padded (optionally group-rotated) activations after quantize -> dequantize:
    float [..., K_pad]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if rotate:
        x2 = rotate_groups(pad_channels(x2, perm.numel()).index_select(-1, perm.long()), group_size)
        perm = torch.arange(perm.numel(), device=perm.device)
    q8, q4, scale = quantize_activation(x2, perm, groups8, group_size, low_bits, high_bits, int_scales,
                                        a8_spans)
    g8 = groups8
    parts = []
    if q8.shape[1]:
        parts.append(dequantize_symmetric(q8, scale[:, :g8], group_size))
    if q4.shape[1]:
        parts.append(dequantize_symmetric(q4, scale[:, g8:], group_size))
    return torch.cat(parts, dim=1).reshape(*shape[:-1], perm.numel()).to(x.dtype)


def w4ax_linear_reference(x: torch.Tensor, perm: torch.Tensor, groups8: int, qweight: torch.Tensor,
                          wscale: torch.Tensor, wzero: torch.Tensor | None, group_size: int,
                          bias: torch.Tensor | None = None, low_bits: int = 4) -> torch.Tensor:
    """Reference of the W4Ax GEMM with fused activation quantization.

    Args:
        x: float [M, K] activations (original channel order).
        perm: int [K_pad] activation permutation; the weight columns are already permuted.
        qweight: uint8 [N, K_pad/2] packed int4 weights (permuted column order).
        wscale: float [N, K_pad/g]; wzero: uint8 [N, K_pad/g] or None (symmetric).
    Returns:
        float [M, N] in ``x``'s dtype.
    """
    xq = fake_quantize_activation(x.float(), perm, groups8, group_size, low_bits)
    w = dequantize_weight(unpack_int4(qweight, signed=wzero is None), wscale, wzero, group_size)
    y = xq @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# KV cache: asymmetric per token per head (group = head_dim)
# ---------------------------------------------------------------------------------------------

def quantize_kv(x: torch.Tensor, bits: int):
    """Asymmetric quantization over the last dim (head_dim) of K or V.

    The step is stored in fp16 (the 4-bit cache keeps it so), rounded up so the codes still
    span the vector's range, with a floor of
    :data:`KV_MIN_SCALE`; the zero point is an integer, clamped to +-:data:`KV_ZERO_LIMIT` so
    fp16 holds it exactly. Every division is IEEE-rounded (the CUDA kernel matches bit for bit).

    Args:
        x: float [..., head_dim].
    Returns:
        q: uint8 [..., head_dim] codes in [0, 2^bits - 1];
        scale, zero: float32 [..., 1] (fp16 values); ``x ~= (q - zero) * scale``.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    scale = _half_round_up(((hi - lo) / levels).clamp_min(KV_MIN_SCALE))
    zero = torch.round(-lo / scale).clamp_(-KV_ZERO_LIMIT, KV_ZERO_LIMIT)
    q = (torch.round(xf / scale) + zero).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero


def _half_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (x positive and finite), as float32."""
    h = x.half()
    below = h.float() < x
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(below, up, h).float()


#: Smallest KV step (an fp16 normal number).
KV_MIN_SCALE = 1e-4
#: Largest KV zero-point magnitude (fp16 holds every integer up to 2048).
KV_ZERO_LIMIT = 2048.0


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quantize_kv(x: torch.Tensor, bits: int) -> torch.Tensor:
    """K or V after asymmetric ``bits``-bit quantize -> dequantize, in ``x``'s dtype."""
    if bits >= 16:
        return x
    return dequantize_kv(*quantize_kv(x, bits)).to(x.dtype)
