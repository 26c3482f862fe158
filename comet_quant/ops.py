"""The W4Ax kernels as torch custom ops (``torch.ops.comet.*``), with PyTorch references.

The CUDA sources ship in ``comet_quant.kernels`` and are JIT-built on first use for the
current device's architecture into ``$COMET_QUANT_CACHE/kernels/<tag>`` (``comet-quant
build-kernels`` precompiles). Every op has a reference in :mod:`comet_quant.primitives`
terms that runs anywhere; :func:`kernels_available` says whether the CUDA path is usable.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .errors import CometError
from .primitives import (MIN_SCALE, SCALE_SPAN, int_token_scales, pack_int4, pad_channels, quantize_activation,
                         rotate_groups, round_up_significant, unpack_int4)

GROUP = 128  # kernels/w4ax.h kGroup
SOURCES = ("binding.cpp", "w4ax_kernels.cu", "w4ax_wgmma.cu", "kv4_kernels.cu")
HEADERS = ("w4ax.h", "w4ax_common.cuh", "wgmma_common.cuh", "kv4.h")
_state: dict = {"loaded": False, "error": None}
# From WIDE_MIN_M tokens on, an sm_90 GPU runs the wgmma GEMM on wide activations, and from
# WIDE_MIN_M_LARGE on where the weight matrix has WIDE_LARGE_WEIGHT elements or more; fewer
# tokens take the decode or tiled mma.sync kernels. Measured on H100, quantization + GEMM on
# each path, all LLaMA-3-8B / 70B shapes (docs/BENCHMARKS.md, "Session 7"): at 40-80 tokens
# the wgmma path is 1.2-2.9x faster on every shape (33 is where the packed path's decode kernel
# stops); at 17-32 tokens 1.1-1.5x faster on the matrices of 58M+ elements, 2-26% slower on
# 8B qkv / o (25M / 17M); at 16 and fewer the decode kernel is faster everywhere.
WIDE_MIN_M = 33
WIDE_MIN_M_LARGE = 17
WIDE_LARGE_WEIGHT = 1 << 25


def _wide_position(c: int) -> int:
    """kernels/w4ax.h wide_position: where channel c of a group sits in the wide layout."""
    return 32 * ((c >> 3) & 3) + 16 * (c & 1) + 4 * (c >> 5) + ((c >> 1) & 3)


# WIDE_ORDER[p] = the channel of a group stored at position p of the wide layout.
WIDE_ORDER = torch.empty(GROUP, dtype=torch.long)
WIDE_ORDER[torch.tensor([_wide_position(c) for c in range(GROUP)])] = torch.arange(GROUP)


# ---------------------------------------------------------------------------------------------
# References (the CPU path and the test oracle)
# ---------------------------------------------------------------------------------------------

def quantize_act_reference(x: torch.Tensor, perm: torch.Tensor, groups8: int, rotate: bool = False,
                           int_scales: bool = False, a8_spans: bool = False):
    """Reference of ``comet::quantize_act``.

    Args:
        x: float16/bfloat16 [M, K]; perm: int32 [K_pad]; groups8: leading 8-bit groups;
        rotate: multiply each permuted group by the orthonormal Hadamard matrix first;
        int_scales: integer group scales for the 4-bit groups (``int_group_scales``);
        a8_spans: one scale per token for the 8-bit groups of each span (``a8_span_scales``).
    Returns:
        q8 int8 [M, groups8*128], q4 uint8 [M, (K_pad - groups8*128)/2] packed, scales f32 [M, G].
    """
    identity = torch.arange(perm.numel(), device=perm.device)
    q8, q4, scales = quantize_activation(_permuted(x, perm, rotate), identity, groups8, GROUP, int_scales=int_scales,
                                         a8_spans=a8_spans)
    return q8, pack_int4(q4), scales


def _permuted(x: torch.Tensor, perm: torch.Tensor, rotate: bool) -> torch.Tensor:
    """float32 [M, K_pad]: x padded, permuted and, with ``rotate``, group-rotated."""
    xp = pad_channels(x.float(), perm.numel()).index_select(-1, perm.long())
    return rotate_groups(xp, GROUP) if rotate else xp


def w4ax_gemm_reference(q8, q4, ascale, qweight, wscale, groups8: int,
                        out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Reference of ``comet::w4ax_gemm``: per-group integer dot products, rescaled, summed.

    Args:
        q8 int8 [M, K8]; q4 uint8 [M, K4/2]; ascale f32 [M, G]; qweight uint8 [N, K/2];
        wscale f16 [N, G]. Returns out_dtype [M, N].
    """
    # float64 holds every integer dot product exactly (|dot| < 2^53) and runs on any device.
    qa = torch.cat((q8.double(), unpack_int4(q4, signed=True).double()), dim=1)
    qw = unpack_int4(qweight, signed=True).double()
    m, k = qa.shape
    g = k // GROUP
    dots = torch.einsum("mgk,ngk->mng", qa.reshape(m, g, GROUP), qw.reshape(-1, g, GROUP))
    y = (dots * ascale.double()[:, None, :] * wscale.double()[None]).sum(-1)
    return y.to(out_dtype)


def spans(groups: int) -> int:
    """Spans of integer group scales in a row of ``groups`` groups."""
    return -(-groups // SCALE_SPAN)


def quantize_act_wide_reference(x: torch.Tensor, perm: torch.Tensor, groups8: int, rotate: bool = False,
                                int_scales: bool = False, a8_spans: bool = False):
    """Reference of ``comet::quantize_act_wide``: the codes of :func:`quantize_act_reference`
    laid out for the Hopper GEMM.

    Returns:
        qa int8 [M, K_pad]: every group as int8 (4-bit groups keep codes in [-7, 7]; with
        ``int_scales`` code * m, m the group's integer multiplier), the channels of each group in
        WIDE_ORDER; scales_t f32 [G, M_pad]: the scales transposed, M_pad = M rounded up to 4,
        padding zero; with ``int_scales`` [G + spans, M_pad], row G + s the scale of span s.
    """
    q8, q4, scales = quantize_act_reference(x, perm, groups8, rotate, int_scales, a8_spans)
    q4 = unpack_int4(q4, signed=True)
    m, g = scales.shape
    # A span without 4-bit groups still gets the kernel's value: the scale of an all-zero span.
    empty_span = round_up_significant(torch.tensor([MIN_SCALE]), 20).item()
    span_rows = scales.new_full((m, spans(g) if int_scales else 0), empty_span)
    if int_scales and q4.shape[1]:
        amax = _permuted(x, perm, rotate)[:, groups8 * GROUP:].reshape(m, -1, GROUP).abs().amax(-1)
        span, mult = int_token_scales(amax, 7, groups8)
        q4 = (q4.reshape(m, -1, GROUP) * mult.to(torch.int8)[..., None]).reshape(m, -1)
        first = torch.arange(groups8, g, device=x.device) // SCALE_SPAN
        span_rows[:, first] = span
    qa = torch.cat((q8, q4), dim=1)
    kp = qa.shape[1]
    qa = qa.reshape(m, kp // GROUP, GROUP)[:, :, WIDE_ORDER.to(qa.device)].reshape(m, kp)
    scales_t = scales.new_zeros(g + span_rows.shape[1], -(-m // 4) * 4)
    scales_t[:, :m] = torch.cat((scales, span_rows), 1).t()
    return qa.contiguous(), scales_t


def w4ax_gemm_wide_reference(qa, scales_t, qweight, wscale, out_dtype: torch.dtype = torch.float16,
                             wscale_row: torch.Tensor | None = None, groups8: int = 0) -> torch.Tensor:
    """Reference of ``comet::w4ax_gemm_wide``: :func:`w4ax_gemm_reference` with every group
    treated as int8, after undoing the wide channel order.

    With ``wscale_row`` (integer group scales) the 4-bit groups (from ``groups8`` on) hold
    code * m: their weights enter as code * (wscale / wscale_row) and each span's integer sum is
    scaled by the span's activation scale (row G + span of ``scales_t``) times ``wscale_row``.
    Also the reference of the kernel's ``a8_spans`` (activations from ``quantize_act_wide`` with
    it): the kernel sums a span's 8-bit groups in int32 and scales the sum by their shared scale,
    which the rows of ``scales_t`` of those groups all hold; here the same sum, group by group.
    """
    m, kp = qa.shape
    g = kp // GROUP
    inverse = torch.argsort(WIDE_ORDER).to(qa.device)
    logical = qa.reshape(m, g, GROUP)[:, :, inverse].reshape(m, kp)
    if wscale_row is None:
        empty4 = torch.empty(m, 0, dtype=torch.uint8, device=qa.device)
        return w4ax_gemm_reference(logical, empty4, scales_t[:g, :m].t(), qweight, wscale, g, out_dtype)
    qw = unpack_int4(qweight, signed=True).double().reshape(-1, g, GROUP)
    mult = torch.round(wscale.double() / wscale_row.double()[:, None])
    dots = torch.einsum("mgk,ngk->mng", logical.double().reshape(m, g, GROUP), qw)
    scale = scales_t[:g, :m].t().double()[:, None, :] * wscale.double()[None]  # the 8-bit groups
    span_of = torch.arange(g, device=qa.device) // SCALE_SPAN
    int_scale = scales_t[g + span_of, :m].t().double()[:, None, :] * wscale_row.double()[None, :, None]
    is_int = torch.arange(g, device=qa.device) >= groups8
    scale = torch.where(is_int, int_scale * mult[None], scale)
    return (dots * scale).sum(-1).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------------

def _arch_flags() -> tuple[str, list[str]]:
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    return arch, [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _source_dir() -> Path:
    """The kernel sources: inside the installed package (comet_quant/kernels), or ./kernels of a
    source checkout (an editable install)."""
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):
        if (d / "binding.cpp").is_file():
            return d
    raise CometError(f"the W4Ax kernel sources are missing (looked in {here / 'kernels'}); "
                     "reinstall comet-quant")


def build(verbose: bool = False) -> Path:
    """Compile and load the kernels for the current GPU; returns the build directory."""
    if _state["loaded"]:
        return _state["build_dir"]
    if not torch.cuda.is_available():
        raise CometError("CUDA is not available: the W4Ax kernels need an NVIDIA GPU "
                         "(the PyTorch reference path runs everywhere else)")
    from torch.utils.cpp_extension import load

    from .models import cache_dir

    src = _source_dir()
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((src / name).read_bytes())
    arch, flags = _arch_flags()
    # Extra nvcc flags for kernel experiments (e.g. -D switches); part of the build's identity.
    flags += os.environ.get("COMET_QUANT_NVCC_FLAGS", "").split()
    digest.update(" ".join(flags).encode())
    tag = f"sm{arch}-{digest.hexdigest()[:12]}"
    build_dir = cache_dir() / "kernels" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load(name=f"comet_w4ax_{tag.replace('-', '_')}", sources=[str(src / s) for s in SOURCES],
             extra_include_paths=[str(src)], extra_cflags=["-O3", "-std=c++17"],
             extra_cuda_cflags=["-O3", "-std=c++17", *flags], build_directory=str(build_dir),
             is_python_module=False, verbose=verbose)
    except Exception as exc:  # compiler missing or failing: say so in one line
        _state["error"] = str(exc).strip().splitlines()[-1][:300]
        raise CometError(f"could not build the W4Ax kernels ({_state['error']}); check that nvcc "
                         "and ninja are installed, or use the reference path") from None
    _register_fakes()
    _state.update(loaded=True, build_dir=build_dir)
    return build_dir


def kernels_available() -> bool:
    """True when the CUDA ops are loaded (building them on first call if possible)."""
    if _state["loaded"]:
        return True
    if not torch.cuda.is_available() or _state["error"] or os.environ.get("COMET_QUANT_NO_KERNELS"):
        return False
    try:
        build()
    except CometError:
        return False
    return True


def _register_fakes() -> None:
    if _state.get("fakes"):
        return

    @torch.library.register_fake("comet::quantize_act")
    def _(x, perm, groups8, rotate=False, int_scales=False, a8_spans=False):
        m, kp = x.shape[0], perm.shape[0]
        k8 = groups8 * GROUP
        return (x.new_empty(m, k8, dtype=torch.int8), x.new_empty(m, (kp - k8) // 2, dtype=torch.uint8),
                x.new_empty(m, kp // GROUP, dtype=torch.float32))

    @torch.library.register_fake("comet::quantize_act_wide")
    def _(x, perm, groups8, rotate=False, int_scales=False, a8_spans=False):
        m, kp = x.shape[0], perm.shape[0]
        g = kp // GROUP
        return (x.new_empty(m, kp, dtype=torch.int8),
                x.new_empty(g + (spans(g) if int_scales else 0), -(-m // 4) * 4, dtype=torch.float32))

    @torch.library.register_fake("comet::w4ax_gemm_wide")
    def _(qa, scales_t, qweight, wscale, split_k, out_dtype, wscale_row=None, groups8=0, expand=0, a8_spans=False):
        return qweight.new_empty(qa.shape[0], qweight.shape[0], dtype=out_dtype)

    @torch.library.register_fake("comet::kv4_append")
    def _(x, codes, scale, zero, start, start_tensor=None):
        return None

    @torch.library.register_fake("comet::kv4_decode_attention")
    def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, scaling, length_tensor=None):
        return torch.empty_like(q)

    @torch.library.register_fake("comet::w4ax_gemm")
    def _(q8, q4, ascale, qweight, wscale, groups8, split_k, int4_mma, out_dtype):
        return qweight.new_empty(ascale.shape[0], qweight.shape[0], dtype=out_dtype)

    _state["fakes"] = True


# ---------------------------------------------------------------------------------------------
# Public wrappers
# ---------------------------------------------------------------------------------------------

def default_int4_mma() -> bool:
    """int4 tensor cores exist on sm_80/86/89; Hopper emulates them, so it uses int8 there."""
    return torch.cuda.get_device_capability()[0] == 8


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x contiguous and 16-byte aligned, as the kernels read it (a row slice such as x[1:] is
    contiguous but offset: copied, where the op itself would refuse it)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def quantize_act(x: torch.Tensor, perm: torch.Tensor, groups8: int, rotate: bool = False,
                 int_scales: bool = False, a8_spans: bool = False):
    """Fused permute (+ rotation) + per-token per-group quantization (see the reference)."""
    if x.is_cuda and kernels_available():
        return torch.ops.comet.quantize_act(_kernel_input(x), perm, groups8, rotate, int_scales, a8_spans)
    return quantize_act_reference(x, perm, groups8, rotate, int_scales, a8_spans)


def w4ax_gemm(q8, q4, ascale, qweight, wscale, groups8: int, out_dtype=torch.float16,
              split_k: int = 0, int4_mma: bool | None = None) -> torch.Tensor:
    """Mixed W4A8/W4A4 GEMM (see :func:`w4ax_gemm_reference`); split_k=0 picks automatically."""
    if qweight.is_cuda and kernels_available():
        use4 = default_int4_mma() if int4_mma is None else int4_mma
        return torch.ops.comet.w4ax_gemm(q8, q4, ascale, qweight, wscale, groups8, split_k, use4, out_dtype)
    return w4ax_gemm_reference(q8, q4, ascale, qweight, wscale, groups8, out_dtype)


def uses_wide_gemm(x: torch.Tensor, qweight: torch.Tensor | None = None) -> bool:
    """Whether :func:`w4ax_linear` takes the Hopper wgmma path for this input (and these packed
    weights [N, K / 2]; without them, the rule for small weight matrices)."""
    m = x.shape[0]
    large = qweight is not None and qweight.shape[0] * qweight.shape[1] * 2 >= WIDE_LARGE_WEIGHT
    return (x.is_cuda and (m >= WIDE_MIN_M or (large and m >= WIDE_MIN_M_LARGE)) and kernels_available()
            and torch.cuda.get_device_capability(x.device) == (9, 0))


def quantize_linear_input(x: torch.Tensor, perm: torch.Tensor, groups8: int, rotate: bool, wide: bool,
                          int_scales: bool = False, a8_spans: bool = False) -> tuple:
    """The activation quantization of :func:`w4ax_linear`: (qa, scales_t) for the wgmma path
    (``wide``), (q8, q4, scales) for the packed one."""
    if wide:
        return torch.ops.comet.quantize_act_wide(_kernel_input(x), perm, groups8, rotate, int_scales, a8_spans)
    return quantize_act(x, perm, groups8, rotate, int_scales, a8_spans)


def w4ax_linear_quantized(qx: tuple, groups8: int, qweight: torch.Tensor, wscale: torch.Tensor,
                          out_dtype: torch.dtype, wscale_row: torch.Tensor | None = None,
                          a8_spans: bool = False) -> torch.Tensor:
    """The GEMM of :func:`w4ax_linear` on :func:`quantize_linear_input`'s output (with
    ``wscale_row``: quantized with ``int_scales``; ``a8_spans``: and ``a8_spans``)."""
    if len(qx) == 2:
        return torch.ops.comet.w4ax_gemm_wide(*qx, qweight, wscale, 0, out_dtype, wscale_row, groups8, 0, a8_spans)
    # The packed kernels take every group scale as it is (for integer group scales, the products).
    return w4ax_gemm(*qx, qweight, wscale, groups8, out_dtype)


def w4ax_linear(x: torch.Tensor, perm: torch.Tensor, groups8: int, qweight: torch.Tensor,
                wscale: torch.Tensor, out_dtype=None, rotate: bool = False,
                wscale_row: torch.Tensor | None = None, a8_spans: bool = False) -> torch.Tensor:
    """y = W4Ax(x): x float16/bfloat16 [M, K] (original channel order) -> [M, N].

    With ``rotate`` the activation groups are Hadamard-rotated (the weights already are). On
    sm_90 from WIDE_MIN_M tokens on (WIDE_MIN_M_LARGE on large weight matrices), the activations
    are quantized into the wide layout and multiplied by the wgmma kernel; elsewhere the packed
    layout and the mma.sync kernels. ``wscale_row`` (fp16 [N]): the weights have integer group
    scales (``int_group_scales``), and so do the activations' 4-bit groups; ``a8_spans`` (with
    ``wscale_row`` only): the 8-bit groups of each span share one activation scale
    (``a8_span_scales``), and the wgmma kernel sums them in int32 too."""
    ints = wscale_row is not None
    if a8_spans and not ints:
        raise CometError("a8_spans (a8_span_scales) needs integer group scales (wscale_row)")
    qx = quantize_linear_input(x, perm, groups8, rotate, uses_wide_gemm(x, qweight), ints, a8_spans)
    return w4ax_linear_quantized(qx, groups8, qweight, wscale, out_dtype or x.dtype, wscale_row, a8_spans)
