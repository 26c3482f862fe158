"""Kernel references (CPU) and CUDA kernels against them (GPU, skipped without CUDA)."""
import os

import pytest
import torch

from comet_quant import ops
from comet_quant.kvcache import cache_keyword
from comet_quant.primitives import pack_int4, quantize_weight_rtn, w4ax_linear_reference

GROUP = ops.GROUP
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(m, k, n, groups8, seed=0, device="cpu", dtype=torch.float16, outliers=True):
    g = torch.Generator().manual_seed(seed)
    kp = -(-k // GROUP) * GROUP
    x = torch.randn(m, k, generator=g)
    if outliers:
        x[:, torch.randperm(k, generator=g)[:8]] *= 40
    perm = torch.randperm(kp, generator=g).to(torch.int32)
    w = torch.randn(n, kp, generator=g) * 0.05
    q, s, _ = quantize_weight_rtn(w, GROUP, True)
    return (x.to(dtype).to(device), perm.to(device), groups8, pack_int4(q).to(device),
            s.to(torch.float16).to(device))


# --------------------------------------------------------------------------- CPU: references

@pytest.mark.parametrize("groups8", [0, 1, 3])
def test_gemm_reference_matches_linear_reference(groups8):
    x, perm, g8, qw, ws = make_case(5, 300, 40, groups8)
    q8, q4, s = ops.quantize_act_reference(x, perm, g8)
    assert q8.shape == (5, g8 * GROUP) and q4.shape == (5, (384 - g8 * GROUP) // 2)
    y = ops.w4ax_gemm_reference(q8, q4, s, qw, ws, g8, torch.float32)
    ref = w4ax_linear_reference(x.float(), perm, g8, qw, ws.float(), None, GROUP)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)


def test_rotated_reference_matches_simulation():
    """The rotated act-quant reference is the simulated model's rotated fake quantization."""
    from comet_quant.primitives import dequantize_symmetric, fake_quantize_activation, unpack_int4

    x, perm, g8, _, _ = make_case(4, 300, 8, 1)
    q8, q4, s = ops.quantize_act_reference(x, perm, g8, rotate=True)
    deq = dequantize_symmetric(torch.cat((q8, unpack_int4(q4, True)), 1), s, GROUP)
    torch.testing.assert_close(deq, fake_quantize_activation(x.float(), perm, g8, GROUP, rotate=True))


@pytest.mark.parametrize("groups8", [0, 1, 3])
def test_wide_reference_matches_packed_reference(groups8):
    """The wide layout (every group int8, channels in the wgmma order, scales transposed) is
    the same computation as the packed one."""
    x, perm, g8, qw, ws = make_case(5, 300, 40, groups8)
    qa, scales_t = ops.quantize_act_wide_reference(x, perm, g8)
    assert qa.dtype == torch.int8 and qa.shape == (5, 384) and scales_t.shape == (3, 8)
    assert not scales_t[:, 5:].any()
    q8, q4, s = ops.quantize_act_reference(x, perm, g8)
    assert torch.equal(scales_t[:, :5], s.t())
    assert qa[:, g8 * GROUP:].abs().le(7).all() and qa.abs().max() > 7 * (g8 > 0)
    torch.testing.assert_close(ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32),
                               ops.w4ax_gemm_reference(q8, q4, s, qw, ws, g8, torch.float32), rtol=0, atol=0)


def int_case(m, k, n, groups8, seed=0, device="cpu", dtype=torch.float16):
    """make_case with integer group scales (int_group_scales): weights on a row scale's grid."""
    from comet_quant.primitives import int_row_scales

    x, perm, _, _, _ = make_case(m, k, n, groups8, seed=seed, device=device, dtype=dtype)
    w = torch.randn(n, perm.numel(), generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    w[:, :GROUP] *= 4  # groups of different ranges: multipliers other than 16
    rows = int_row_scales(w, GROUP)
    q, s, _ = quantize_weight_rtn(w, GROUP, True, True, None, rows)
    return x, perm, pack_int4(q).to(device), s.to(torch.float16).to(device), rows.to(torch.float16).to(device)


@pytest.mark.parametrize("a8_spans", [False, True])
@pytest.mark.parametrize("groups8", [0, 3, 17, 20])
def test_int_scales_wide_reference_matches_packed(groups8, a8_spans):
    """Integer group scales: the wide layout (4-bit groups as code x multiplier, span scales in
    the extra rows of scales_t, spans summed in integer) computes what the packed layout does;
    with a8_spans the 8-bit groups' rows of scales_t hold their span's shared scale."""
    x, perm, qw, ws, wr = int_case(5, 20 * GROUP, 48, groups8, seed=groups8)
    q8, q4, s = ops.quantize_act_reference(x, perm, groups8, int_scales=True, a8_spans=a8_spans)
    ref = ops.w4ax_gemm_reference(q8, q4, s, qw, ws, groups8, torch.float32)
    qa, scales_t = ops.quantize_act_wide_reference(x, perm, groups8, int_scales=True, a8_spans=a8_spans)
    assert scales_t.shape == (20 + 2, 8)
    if groups8 < 20:
        assert qa[:, groups8 * GROUP:].abs().max() > 7  # codes times multipliers
    if a8_spans and groups8 > 1:
        assert torch.equal(scales_t[:min(groups8, 16)], scales_t[:1].expand(min(groups8, 16), -1))
    wide = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, wr, groups8)
    torch.testing.assert_close(wide, ref, rtol=1e-6, atol=1e-6)
    m = ws.float() / wr.float()[:, None]
    assert torch.equal(m, m.round()) and m.min() >= 1 and m.max() <= 16 and m.min() < 16


def test_int_scales_checkpoint_check():
    from comet_quant.errors import CometError
    from comet_quant.qmodules import check_int_scales

    _, _, _, ws, wr = int_case(1, 4 * GROUP, 16, 0)
    check_int_scales(ws, wr)
    with pytest.raises(CometError, match="corrupt"):
        check_int_scales(ws, wr * 1.5)
    with pytest.raises(CometError, match="wscale_row"):
        check_int_scales(ws, None)


def test_wide_order_is_a_permutation_per_group():
    assert sorted(ops.WIDE_ORDER.tolist()) == list(range(GROUP))
    # position 32 s + 16 h + 4 t + b holds channel 32 t + 8 s + 2 b + h (kernels/w4ax.h)
    for p in (0, 1, 16, 17, 37, 127):
        s, h, t, b = p // 32, (p // 16) % 2, (p // 4) % 4, p % 4
        assert ops.WIDE_ORDER[p] == 32 * t + 8 * s + 2 * b + h


def test_build_identity_covers_every_kernel_file():
    """The JIT build's cache key hashes ops.SOURCES + ops.HEADERS: a kernel file left out of them
    could change without a rebuild."""
    src = ops._source_dir()
    on_disk = {p.name for p in src.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    assert on_disk == set(ops.SOURCES + ops.HEADERS)


def test_cpu_wrappers_fall_back_to_reference():
    x, perm, g8, qw, ws = make_case(3, 256, 16, 1)
    torch.testing.assert_close(ops.w4ax_linear(x, perm, g8, qw, ws, torch.float32),
                               ops.w4ax_gemm_reference(*ops.quantize_act_reference(x, perm, g8), qw, ws, g8,
                                                       torch.float32))


SCALES = {"free": {}, "int": {"int_group_scales": True},
          "a8span": {"int_group_scales": True, "a8_span_scales": True}}


def _shared_input_linears(k=300, sizes=(40, 24, 24), groups8=1, device="cpu", m=6, scales="free"):
    """Linears of one site (one permutation, one set of 8-bit groups) on the kernel backend, and
    an input [2, m / 2, k]; ``scales``: free group scales, integer ones, or integer with shared
    8-bit span scales (SCALES)."""
    from comet_quant.qmodules import W4AxLinear
    from comet_quant.scheme import get_scheme

    x, perm, g8, _, _ = make_case(m, k, 8, groups8, seed=1, device=device)
    lins = []
    for i, n in enumerate(sizes):
        if scales == "free":
            _, _, _, qw, ws = make_case(1, k, n, groups8, seed=10 + i, device=device)
            tensors = {"qweight": qw, "wscale": ws}
        else:
            _, _, qw, ws, wr = int_case(1, k, n, groups8, seed=10 + i, device=device)
            tensors = {"qweight": qw, "wscale": ws, "wscale_row": wr}
        lins.append(W4AxLinear(k, {**tensors, "act_perm": perm, "act_groups8": torch.tensor([g8])},
                               get_scheme("w4ax-kv4-rtn", **SCALES[scales]), True))
    return x.reshape(2, m // 2, k), lins


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("m", [6, 600])
def test_shared_input_group_matches_members_alone(m, scales, monkeypatch):
    """q / k / v (or gate / up) as one group: one activation quantization, then (up to 256
    tokens) one GEMM over the concatenated weights, each member its slice, or (above) a GEMM per
    member on the shared quantized input; in any call order; the members' weights become views
    (no copy); a member asked with another input, or whose buffers were replaced, runs alone.
    For free and integer group scales (the integer ones with wscale_row concatenated too).
    CPU: the reference ops."""
    from comet_quant import qmodules
    from comet_quant.qmodules import SharedInputGroup

    x, lins = _shared_input_linears(k=600, groups8=3, m=m, scales=scales)  # 3 of 5 groups in 8 bit
    fused = m <= qmodules.FUSED_GEMM_MAX_TOKENS
    alone = [m._forward_kernels(x) for m in lins]
    assert SharedInputGroup.same_input(lins)
    assert not SharedInputGroup.compatible(lins)  # CPU tensors: load_quantized groups kernel linears only
    group = SharedInputGroup(lins)
    qweight, wscale, *row = group.concatenated()
    assert len(row) == (scales != "free")
    assert qweight.shape[0] == wscale.shape[0] == sum(m.out_features for m in lins)
    assert all(m._group is group and m.qweight._base is qweight and m.wscale._base is wscale for m in lins)
    assert not row or all(m.wscale_row._base is row[0] for m in lins)
    quantized = []
    real = ops.quantize_linear_input
    monkeypatch.setattr(ops, "quantize_linear_input", lambda *a: quantized.append(1) or real(*a))
    for order in ([0, 1, 2], [2, 0, 1]):
        out = {i: lins[i]._forward_kernels(x) for i in order}
        assert len(quantized) == (1 if order[0] == 0 else 2)  # once per input for the whole group
        assert not group._pending and group._input is None  # every slice handed out, nothing held
        for i in order:
            assert out[i].shape == alone[i].shape and out[i].abs().max() > 0
            torch.testing.assert_close(out[i], alone[i], rtol=2e-3, atol=2e-3)
    first = lins[0]._forward_kernels(x)
    assert set(group._pending) == {1, 2}
    assert all(v is not None for v in group._pending.values()) == fused  # slices, or GEMMs still to run
    assert len(group._quantized) == (0 if fused else 1)  # the shared quantized input, kept for the others
    y = lins[1]._forward_kernels(x.clone())  # another input: computed afresh, its own slice
    torch.testing.assert_close(y, alone[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(first, alone[0], rtol=2e-3, atol=2e-3)
    lins[2].wscale = lins[2].wscale.clone()  # what .to() / .float() do to a buffer
    assert group.concatenated() is None and group.output(lins[0], x) is None
    torch.testing.assert_close(lins[2]._forward_kernels(x), alone[2], rtol=2e-3, atol=2e-3)


def test_shared_input_group_needs_one_quantized_input():
    from comet_quant.qmodules import SharedInputGroup

    _, lins = _shared_input_linears()
    _, ints = _shared_input_linears(scales="int")
    _, spans = _shared_input_linears(scales="a8span")
    assert not SharedInputGroup.same_input(lins[:2] + ints[2:])  # free and integer group scales
    assert not SharedInputGroup.same_input(ints[:2] + spans[2:])  # per-group and shared 8-bit scales
    assert SharedInputGroup.same_input(lins) and not SharedInputGroup.same_input(lins[:1])
    perm = lins[1].act_perm
    lins[1].act_perm = perm.flip(0)
    assert not SharedInputGroup.same_input(lins)
    lins[1].act_perm = perm
    lins[2].groups8 += 1
    assert not SharedInputGroup.same_input(lins)


# --------------------------------------------------------------------------- GPU: kernels

@pytest.fixture(scope="module")
def kernels():
    if not ops.kernels_available():
        pytest.fail(f"CUDA is present but the kernels did not build: {ops._state['error']}")
    return ops


M_SWEEP = [1, 2, 7, 9, 16, 17, 33, 64, 127, 128, 129, 1024, 4096]


@gpu
@pytest.mark.parametrize("m", M_SWEEP)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [300, 576, 4096, 14336, 28672])
def test_quantize_act_bitwise(kernels, m, dtype, k):
    if m > 1024 and k > 4096:
        pytest.skip("covered by smaller M; keeps the CPU reference fast")
    x, perm, _, _, _ = make_case(m, k, 8, 0, seed=m, device="cuda", dtype=dtype)
    g = perm.numel() // GROUP
    for g8 in sorted({0, 1, g // 2, g}):
        got = torch.ops.comet.quantize_act(x, perm, g8)
        want = ops.quantize_act_reference(x.cpu(), perm.cpu(), g8)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b), (m, k, g8)


@gpu
@pytest.mark.parametrize("m", [1, 17, 1024])
def test_quantize_act_rotated(kernels, m):
    """Butterfly (kernel) and matrix (reference) Hadamard agree to rounding: codes may differ by
    one step only where a value sits on a rounding boundary."""
    x, perm, _, _, _ = make_case(m, 576, 8, 0, seed=m, device="cuda")
    for g8 in (0, 2):
        got = torch.ops.comet.quantize_act(x, perm, g8, True)
        want = ops.quantize_act_reference(x, perm, g8, rotate=True)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=0)
        from comet_quant.primitives import unpack_int4
        a = torch.cat((got[0], unpack_int4(got[1], True)), 1).int()
        b = torch.cat((want[0], unpack_int4(want[1], True)), 1).int()
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3


def unit_scales(m, n, g):
    return torch.ones(m, g, device="cuda"), torch.ones(n, g, device="cuda", dtype=torch.float16)


@gpu
@pytest.mark.parametrize("int4_mma", [False, True])
@pytest.mark.parametrize("m", M_SWEEP)
@pytest.mark.parametrize("k8_frac", [0.0, "one", 0.5, 1.0])
def test_gemm_integer_accumulation_exact(kernels, int4_mma, m, k8_frac):
    """With unit scales every output is an integer sum below 2^24: float32 must match exactly."""
    k, n = 1024, 200
    g = k // GROUP
    g8 = 1 if k8_frac == "one" else int(k8_frac * g)
    x, perm, _, qw, _ = make_case(m, k, n, g8, seed=m + 1, device="cuda")
    q8, q4, _ = torch.ops.comet.quantize_act(x, perm, g8)
    sa, sw = unit_scales(m, n, g)
    # 0: automatic (a decode kernel for M <= 16); -1: the decode ring kernel, -2: the 32-channel
    # decode kernel (M <= 16)
    for split in (0, 1, 4) + ((-1, -2) if m <= 16 else ()):
        y = torch.ops.comet.w4ax_gemm(q8, q4, sa, qw, sw, g8, split, int4_mma, torch.float32)
        ref = ops.w4ax_gemm_reference(q8.cpu(), q4.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), g8, torch.float32)
        assert torch.equal(y.cpu(), ref), (m, g8, split, (y.cpu() - ref).abs().max())


@gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n, k", [(197, 600), (64, 128), (4096, 4096)])
def test_gemm_forced_decode_kernels_scaled(kernels, m, n, k):
    """The decode ring kernel and the 32-channel register kernel (forced; automatic only for
    large matrices / wide grids) against the reference, with real scales: the ring's scale tile
    covers odd G and a last block of a few rows (197 x 5 fp16 scales end 2 bytes past a 16-byte
    copy), the 32-channel kernel a last block of 5 rows, whose second 16-row tile is all past N;
    both equal the tiled kernel up to float rounding."""
    g = -(-k // GROUP)
    x, perm, g8, qw, ws = make_case(m, k, n, max(1, g // 3), seed=n + m, device="cuda")
    q8, q4, s = torch.ops.comet.quantize_act(x, perm, g8)
    ref = ops.w4ax_gemm_reference(q8.cpu(), q4.cpu(), s.cpu(), qw.cpu(), ws.cpu(), g8, torch.float32)
    tiled = torch.ops.comet.w4ax_gemm(q8, q4, s, qw, ws, g8, 1, False, torch.float32)
    xx = torch.randn(17, k, device="cuda", dtype=torch.float16)
    for split, name in ((-1, "decode ring kernel"), (-2, "32-channel decode kernel")):
        y = torch.ops.comet.w4ax_gemm(q8, q4, s, qw, ws, g8, split, False, torch.float32)
        assert rel_err(y.cpu(), ref) < 1e-5, split
        assert rel_err(y, tiled) < 1e-5, split
        with pytest.raises(RuntimeError, match=name):
            torch.ops.comet.w4ax_gemm(*torch.ops.comet.quantize_act(xx, perm, g8), qw, ws, g8, split, False,
                                      torch.float32)


@gpu
@pytest.mark.parametrize("blocks_per_sm", [2.5, 5])
@pytest.mark.parametrize("m", [1, 16])
def test_gemm_decode_block_sizes_exact(kernels, blocks_per_sm, m):
    """The decode kernels run 4- or 8-warp blocks, chosen from the grid's waves on this GPU: 2.5
    and 5 blocks of 16 channels per SM take, between them, both sizes of the register and the
    ring kernel at 1 and 16 tokens, and of the 32-channel kernel at 16 (automatic at 16 tokens
    and 5 blocks per SM). Unit scales: float32 must match the reference exactly."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k, n = 1024, int(16 * blocks_per_sm * sms)
    g = k // GROUP
    x, perm, _, qw, _ = make_case(m, k, n, 2, seed=n + m, device="cuda")
    q8, q4, _ = torch.ops.comet.quantize_act(x, perm, 2)
    sa, sw = unit_scales(m, n, g)
    ref = ops.w4ax_gemm_reference(q8.cpu(), q4.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), 2, torch.float32)
    assert ref.abs().max() > 100
    # the automatic kernel (a register kernel below 32 MB), the ring kernel, the 32-channel kernel
    for split in (0, -1, -2):
        y = torch.ops.comet.w4ax_gemm(q8, q4, sa, qw, sw, 2, split, False, torch.float32)
        assert torch.equal(y.cpu(), ref), (split, (y.cpu() - ref).abs().max())


@gpu
def test_offset_views(kernels):
    """A row slice is contiguous but not 16-byte aligned: the Python entry points copy it, the
    ops refuse it with a clear error (not a misaligned-address fault that kills the context)."""
    x, perm, g8, qw, ws = make_case(9, 300, 64, 1, device="cuda")  # rows of 600 bytes
    want = ops.quantize_act(x[1:].clone(), perm, g8)
    got = ops.quantize_act(x[1:], perm, g8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    torch.testing.assert_close(ops.w4ax_linear(x[1:], perm, g8, qw, ws), ops.w4ax_linear(x[1:].clone(), perm, g8, qw, ws))
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        torch.ops.comet.quantize_act(x[1:], perm, g8, False)
    q8, q4, s = want
    offset_qw = torch.cat((qw.flatten()[:1], qw.flatten()))[1:].view_as(qw)
    with pytest.raises(RuntimeError, match="qweight must start at a 16-byte aligned"):
        torch.ops.comet.w4ax_gemm(q8, q4, s, offset_qw, ws, g8, 0, False, torch.float16)


WIDE_M = [1, 7, 64, 127, 128, 129, 1024, 4096]
sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                          reason="needs an sm_90 GPU (wgmma)")


@gpu
@pytest.mark.parametrize("m", M_SWEEP)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [300, 576, 14336])
def test_quantize_act_wide_bitwise(kernels, m, dtype, k):
    if m > 1024 and k > 4096:
        pytest.skip("covered by smaller M; keeps the CPU reference fast")
    x, perm, _, _, _ = make_case(m, k, 8, 0, seed=m + 7, device="cuda", dtype=dtype)
    g = perm.numel() // GROUP
    for g8 in sorted({0, 1, g // 2, g}):
        qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8)
        want_qa, want_s = ops.quantize_act_wide_reference(x.cpu(), perm.cpu(), g8)
        assert torch.equal(qa.cpu(), want_qa), (m, k, g8)
        assert torch.equal(scales_t.cpu(), want_s), (m, k, g8)


def extreme_activations(m, k, dtype):
    """Rows whose groups hit the quantizer's edges: rounding ties (amax 7 or 127 makes the
    reciprocal scale exact, so x.5 values are true ties, which round to even), the largest
    finite values, subnormals, all-zero and negative-zero groups; the rest random."""
    g = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=g)
    ties4 = torch.tensor([7.0, -7.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -3.5, 6.5, -6.5])
    ties8 = torch.tensor([127.0, -126.5, 0.5, -0.5, 1.5, 2.5, -3.5, 125.5, 126.5, 64.5])
    big = 65504.0 if dtype == torch.float16 else 3.0e38
    for r in range(m):
        c = torch.randperm(k, generator=g)
        x[r, c[:12]] = ties4 if r % 2 else ties8[:10].repeat(2)[:12]
        x[r, c[12:14]] = torch.tensor([big, -big]) if r % 3 == 0 else x[r, c[12:14]]
        x[r, c[14:20]] = 3e-8 * (r % 5)
    x[0] = 0.0
    if m > 1:
        x[1] = -0.0
    return x.to(dtype)


@gpu
@pytest.mark.parametrize("m", [5, 64, 300])  # the gather kernel (M < 64) and the row kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_act_extreme_values_bitwise(kernels, m, dtype):
    """Both layouts equal the reference bit for bit at the quantizer's edges (the kernels round
    by adding 1.5 * 2^23 and leave out the clamp, which the scale makes a no-op)."""
    k = 384
    x = extreme_activations(m, k, dtype)
    g = k // GROUP
    for perm in (torch.arange(k, dtype=torch.int32), torch.randperm(k + 128).to(torch.int32)):
        for g8 in (0, 1, g):
            got = torch.ops.comet.quantize_act(x.cuda(), perm.cuda(), g8)
            want = ops.quantize_act_reference(x, perm, g8)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b), (m, g8)
            qa, scales_t = torch.ops.comet.quantize_act_wide(x.cuda(), perm.cuda(), g8)
            want_qa, want_s = ops.quantize_act_wide_reference(x, perm, g8)
            assert torch.equal(qa.cpu(), want_qa) and torch.equal(scales_t.cpu(), want_s), (m, g8)
    q8, _, _ = ops.quantize_act_reference(x, torch.arange(k, dtype=torch.int32), g)
    assert (q8.abs() == 127).any() and (q8 == 0).any()  # the edges are really there


@gpu
@pytest.mark.parametrize("m", [17, 1024])
def test_quantize_act_wide_rotated(kernels, m):
    x, perm, _, _, _ = make_case(m, 576, 8, 0, seed=m, device="cuda")
    for g8 in (0, 2):
        qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8, True)
        want_qa, want_s = ops.quantize_act_wide_reference(x, perm, g8, rotate=True)
        torch.testing.assert_close(scales_t, want_s, rtol=1e-5, atol=0)
        d = (qa.int() - want_qa.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3


def unit_scale_case(m, n, k, seed, groups8=2):
    """Wide activations with unit scales (every GEMM output an exact integer sum) and the reference."""
    g = k // GROUP
    x, perm, _, qw, _ = make_case(m, k, n, groups8, seed=seed, device="cuda")
    qa, _ = torch.ops.comet.quantize_act_wide(x, perm, groups8)
    scales_t = torch.ones(g, -(-m // 4) * 4, device="cuda")
    sw = torch.ones(n, g, device="cuda", dtype=torch.float16)
    ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, sw, torch.float32)
    assert ref.abs().max() > 100  # real data, not zeros
    return qa, scales_t, qw, sw, ref


@sm90
@pytest.mark.parametrize("m", WIDE_M)
@pytest.mark.parametrize("k8_frac", [0.0, "one", 0.5, 1.0])
def test_gemm_wide_integer_accumulation_exact(kernels, m, k8_frac):
    """Unit scales: every output is an integer sum below 2^24, so float32 must match exactly.
    N = 200 leaves a partial 128-channel tile; split 3 of 8 groups leaves a short last split;
    -1 is stream-K (here one block per tile: 8 groups are its smallest share), -2 persistent tiles."""
    k, n = 1024, 200
    g8 = 1 if k8_frac == "one" else int(k8_frac * (k // GROUP))
    qa, scales_t, qw, sw, ref = unit_scale_case(m, n, k, seed=m + 11, groups8=g8)
    for split in (0, 1, 3, 8, -1, -2):
        y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, sw, split, torch.float32)
        assert torch.equal(y, ref), (m, g8, split, (y - ref).abs().max())


@sm90
def test_gemm_wide_every_token_tile_exact(kernels):
    """Every token tile of the wgmma GEMM (64, 96, 128 or 192, picked per shape by its wave cost
    model), each on shapes that take it, with partial token and channel tiles; unit scales make
    every output an integer sum, so float32 must match exactly."""
    k = 1024
    seen = set()
    for m, n in [(200, 200), (700, 2048), (1000, 4096), (777, 3000), (3000, 6000), (4096, 4096)]:
        tokens, split, *_ = torch.ops.comet.wide_tile(m, n, k)
        seen.add(tokens)
        qa, scales_t, qw, sw, ref = unit_scale_case(m, n, k, seed=m)
        y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, sw, 0, torch.float32)
        assert torch.equal(y, ref), (m, n, tokens, split, (y - ref).abs().max())
    assert seen == {64, 96, 128, 192}, seen


@sm90
@pytest.mark.parametrize("int_scales", [False, True])
def test_gemm_wide_channel_tile_counts(kernels, int_scales):
    """Tiled grids with even and odd numbers of 128-channel tiles, unsplit and split-K, with
    token tiles whose second half lies partly (M = 100, 200) or wholly (M = 20) past M (the cases
    a two-block cluster sharing its token tile, tried in session 13, had to get right)."""
    k = 2048
    for m, n in [(20, 256), (20, 384), (100, 512), (200, 640), (1000, 1024), (1000, 1152)]:
        if int_scales:  # float sums of span results: a tolerance
            x, perm, qw, ws, wr = int_case(m, k, n, 2, seed=m + n, device="cuda")
            qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 2, False, True)
            extra = (wr, 2)
            ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, *extra)
            assert ref.abs().max() > 1
        else:  # unit scales: integer sums, exact
            qa, scales_t, qw, ws, ref = unit_scale_case(m, n, k, seed=m + n)
            extra = ()
        for split in (1, 2):
            y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, torch.float32, *extra)
            ok = rel_err(y, ref) < 1e-5 if int_scales else torch.equal(y, ref)
            assert ok, (m, n, split, rel_err(y, ref))


@sm90
@pytest.mark.parametrize("int_scales", [False, True])
def test_gemm_wide_raster_bands(kernels, int_scales):
    """From 32 MiB of packed weights the tiled grid runs in bands of 8 token rows (raster_tile):
    N = 16384, K = 4096 at M = 2100 has full bands and a short last one, whichever token tile the
    plan picks. The tiled result must equal stream-K's (its own tile order) everywhere, and the
    reference on tokens of every band (unit scales: exact; integer group scales: a tolerance)."""
    m, n, k = 2100, 16384, 4096
    tokens, split, *_ = torch.ops.comet.wide_tile(m, n, k, 0, int_scales)
    assert split == 1 and n * k // 2 >= 32 << 20 and -(-m // tokens) > 8 and -(-m // tokens) % 8
    if int_scales:
        x, perm, qw, ws, wr = int_case(m, k, n, 2, seed=5, device="cuda")
        qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 2, False, True)
        extra = (wr, 2)
    else:
        x, perm, _, qw, _ = make_case(m, k, n, 2, seed=5, device="cuda")
        qa, _ = torch.ops.comet.quantize_act_wide(x, perm, 2)
        scales_t = torch.ones(k // GROUP, m, device="cuda")  # m % 4 == 0: no padding columns
        ws = torch.ones(n, k // GROUP, device="cuda", dtype=torch.float16)
        extra = ()
    tiled = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, 1, torch.float32, *extra)
    stream_k = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, -1, torch.float32, *extra)
    persistent = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, -2, torch.float32, *extra)
    rows = torch.tensor([0, 1023, 1029, 2047, 2048, 2099], device="cuda")
    ref = ops.w4ax_gemm_wide_reference(qa[rows], scales_t[:, rows], qw, ws, torch.float32, *extra)
    assert ref.abs().max() > (1 if int_scales else 100)
    if int_scales:
        assert rel_err(tiled, stream_k) < 1e-5 and rel_err(tiled[rows], ref) < 1e-5
    else:
        assert torch.equal(tiled, stream_k) and torch.equal(tiled[rows], ref), (tiled[rows] - ref).abs().max()
    assert torch.equal(persistent, tiled)  # the same tiles, the same sums, fewer blocks


@sm90
@pytest.mark.parametrize("int_scales", [False, True])
def test_gemm_wide_persistent_tiles(kernels, int_scales):
    """Persistent tiled grids (split_k = -2: at most one block per SM, each walking several
    tiles, its TMA ring running on from tile to tile) on shapes of 3-15 tiles per block, with
    partial token and channel tiles and an odd N (whose tiles store element by element); and the
    stores of whole tiles, two channels at a time after a lane exchange, in every output dtype:
    fp16 / bf16 must be the float32 result rounded (one accumulator, one rounding)."""
    k = 1024
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m, n in [(3000, 6000), (4096, 4096), (3000, 4097), (2050, 8192)]:
        tokens, split, blocks, *_ = torch.ops.comet.wide_tile(m, n, k, -2, int_scales)
        tiles = -(-m // tokens) * -(-n // 128)
        assert split == 1 and blocks == min(tiles, sms) and tiles >= 3 * blocks, (m, n, tokens, blocks)
        assert torch.ops.comet.wide_tile(m, n, k, 0, int_scales)[1:3] == [1, blocks]  # the automatic plan's too
        if int_scales:
            x, perm, qw, ws, wr = int_case(m, k, n, 1, seed=m + n, device="cuda")
            qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 1, False, True)
            extra = (wr, 1)
            ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, *extra)
            assert ref.abs().max() > 1
        else:
            qa, scales_t, qw, ws, ref = unit_scale_case(m, n, k, seed=m + n)
            extra = ()
        y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, -2, torch.float32, *extra)
        if int_scales:
            assert rel_err(y, ref) < 1e-5, (m, n, rel_err(y, ref))
        else:
            assert torch.equal(y, ref), (m, n, (y - ref).abs().max())
        assert torch.equal(torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, 1, torch.float32, *extra), y)
        if not int_scales:  # integer sums up to ~1e5: give the half-precision roundings real work
            scales_t = torch.rand_like(scales_t) * 1e-3 + 1e-4
        for split in (-2, 1, -1):
            y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, torch.float32, *extra)
            for dt in (torch.float16, torch.bfloat16):
                got = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, dt, *extra)
                assert torch.equal(got, y.to(dt)), (m, n, dt, split)


@sm90
@pytest.mark.parametrize("int_scales", [False, True])
def test_gemm_wide_expanded_weights(kernels, int_scales):
    """expand = 1: the weights expanded to int8 first (expand_weights_kernel), both wgmma operands
    from shared memory; expand = -1: fragments built from the packed weights in registers. On
    every grid kind (automatic, one tile per block, split-K, stream-K, persistent), token tiles of
    64-192, partial token and channel tiles, an 8-bit group and all-8-bit: both paths must equal
    the reference (unit scales: exactly), and each other bit for bit where their plans agree."""
    k = 1024
    seen = set()
    for m, n, g8 in [(20, 200, 2), (200, 200, 1), (700, 2048, 0), (1000, 4096, 8), (3000, 6000, 2),
                     (4096, 4096, 2)]:
        if int_scales:
            x, perm, qw, ws, wr = int_case(m, k, n, g8, seed=m + n, device="cuda")
            qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True)
            extra = (wr, g8)
            ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, *extra)
            assert ref.abs().max() > 1
        else:
            qa, scales_t, qw, ws, ref = unit_scale_case(m, n, k, seed=m + n, groups8=g8)
            extra = (None, 0)
        for split in (0, 1, 2, -1, -2):
            plans = {e: torch.ops.comet.wide_tile(m, n, k, split, int_scales, e) for e in (1, -1)}
            assert plans[1][4] == 1 and plans[-1][4] == 0
            seen.add(plans[1][0])
            y = {e: torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, torch.float32, *extra, e)
                 for e in (1, -1)}
            for e in (1, -1):
                ok = rel_err(y[e], ref) < 1e-5 if int_scales else torch.equal(y[e], ref)
                assert ok, (m, n, split, e, plans[e], rel_err(y[e], ref))
            if plans[1][:4] == plans[-1][:4]:
                assert torch.equal(y[1], y[-1]), (m, n, split, plans)
    assert seen == {64, 96, 128, 192}, seen
    # the automatic choice: expanded from COMET_WIDE_EXPAND_MIN_M tokens on (opt-in: never
    # unless the build sets it), forced either way by the op's argument
    min_m = expand_min_m()
    for m in (256, 1024, 4096):
        assert torch.ops.comet.wide_tile(m, 4096, 4096, 0, int_scales)[4] == int(m >= min_m), m
        assert torch.ops.comet.wide_tile(m, 4096, 4096, 0, int_scales, 1)[4] == 1, m
        assert torch.ops.comet.wide_tile(m, 4096, 4096, 0, int_scales, -1)[4] == 0, m


@sm90
def test_gemm_wide_stage_reuse_race(kernels):
    """Blocks that run several tiles (persistent grids, stream-K) refill a stage for the next tile
    while the consumers finish the last: a warp whose shared-memory loads of a stage's activation
    scales were still in flight when it released the stage read the next copy's scales (8 tokens x
    16 channels off by a group's share, in ~5% of persistent launches of this shape on an H100,
    before the proxy fence in release_reads). 400 persistent launches must all equal one block per
    tile bit for bit (the same sums in the same order), 400 stream-K launches (which were wrong
    ~100x less often) within float rounding of it (its cut tiles add partial sums)."""
    m, n, k = 1024, 10240, 8192  # LLaMA-3-70B qkv: 640 tiles of 64 groups
    x, perm, _, qw, ws = make_case(m, k, n, 6, seed=3, device="cuda", dtype=torch.bfloat16)
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 6)
    want = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, 1, torch.float32)
    assert want.abs().max() > 1
    for split, same in ((-2, torch.equal), (-1, lambda y, w: rel_err(y, w) < 1e-5)):
        bad = sum(not same(torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, torch.float32), want)
                  for _ in range(400))
        assert bad == 0, (split, bad)


@sm90
def test_gemm_wide_stream_k_exact(kernels):
    """Stream-K (split_k = -1) on each of its token tiles (64, 96, 128), on shapes whose iteration shares cut
    tiles between 2 to 4 blocks (at most one per 8 groups of a tile) and give blocks a tile's
    tail, whole tiles and another's head,
    and on two with full waves of whole tiles first (1000 x 6000: 376 tiles on 132 SMs, one wave;
    900 x 6144: 480 tiles, two waves); partial channel and token tiles too. Unit scales: float32
    must match the reference exactly."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    seen, waves = set(), set()
    for m, n, k in [(200, 1000, 4096), (300, 6144, 1024), (700, 4096, 2048), (90, 700, 2048), (1, 200, 4096),
                    (1000, 6000, 1024), (900, 6144, 1024)]:
        tokens, split, blocks, dp_tiles, _ = torch.ops.comet.wide_tile(m, n, k, -1)
        g = k // GROUP
        tiles = -(-m // tokens) * -(-n // 128)
        assert split == -1 and blocks == min(sms, tiles * -(-g // 8)) and dp_tiles % blocks == 0
        assert (tiles - dp_tiles) % blocks, (m, n, k)  # some tile is cut between blocks
        seen.add(tokens)
        waves.add(dp_tiles // blocks)
        qa, scales_t, qw, sw, ref = unit_scale_case(m, n, k, seed=m + n)
        for _ in range(2):  # a second launch on a fresh workspace and nonce
            y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, sw, -1, torch.float32)
            assert torch.equal(y, ref), (m, n, k, tokens, (y - ref).abs().max())
    assert seen == {64, 96, 128} and waves == {0, 1, 2}, (seen, waves)


@sm90
def test_gemm_wide_stream_k_graph_replays(kernels):
    """A captured stream-K launch replays on the same workspace: its flags must come back clear
    after every replay. Replayed on new activations each time, real scales, fp16 out."""
    m, n, k = 300, 6144, 1024
    x, perm, g8, qw, ws = make_case(m, k, n, 2, seed=3, device="cuda")
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, -1, torch.float16)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, -1, torch.float16)
    for seed in range(3):
        x2 = make_case(m, k, n, 2, seed=10 + seed, device="cuda")[0]
        qa2, scales2 = torch.ops.comet.quantize_act_wide(x2, perm, g8)
        qa.copy_(qa2)
        scales_t.copy_(scales2)
        graph.replay()
        torch.cuda.synchronize()
        ref = ops.w4ax_gemm_wide_reference(qa2, scales2, qw, ws, torch.float32)
        assert rel_err(y, ref) < 1e-3, seed  # fp16 rounding of the output only


@sm90
def test_wide_path_small_batch_in_cuda_graph(kernels):
    """24 tokens on a 32M-element weight matrix take the wgmma path (ops.WIDE_MIN_M_LARGE), as a
    batched CUDA-graph decode step would: captured and replayed, it matches the eager call and
    the reference."""
    m, k, n = 24, 4096, 8192
    x, perm, g8, qw, ws = make_case(m, k, n, 3, seed=5, device="cuda")
    assert ops.uses_wide_gemm(x, qw) and not ops.uses_wide_gemm(x, qw[:1024])
    eager = ops.w4ax_linear(x, perm, g8, qw, ws)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.w4ax_linear(static_x, perm, g8, qw, ws)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ops.w4ax_linear(static_x, perm, g8, qw, ws)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, ops.w4ax_linear(x * 2, perm, g8, qw, ws)) < 1e-6  # split-K order aside
    codes = [t.cuda() for t in ops.quantize_act_reference(x.cpu(), perm.cpu(), g8)]
    ref = ops.w4ax_gemm_reference(*codes, qw, ws, g8, torch.float32)
    assert rel_err(eager, ref) < 2e-3


@sm90
def test_opcheck_wide(kernels):
    x, perm, g8, qw, ws = make_case(130, 512, 256, 1, device="cuda")
    torch.library.opcheck(torch.ops.comet.quantize_act_wide.default, (x, perm, g8))
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8)
    torch.library.opcheck(torch.ops.comet.w4ax_gemm_wide.default, (qa, scales_t, qw, ws, 0, torch.float16))


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def expand_min_m():
    """The token count from which the wgmma GEMM's automatic plan expands the weights: never by
    default (opt-in, kernels/w4ax_wgmma.cu), else what -DCOMET_WIDE_EXPAND_MIN_M=N in the build's
    COMET_QUANT_NVCC_FLAGS says."""
    flags = os.environ.get("COMET_QUANT_NVCC_FLAGS", "").split()
    values = [f.split("=", 1)[1] for f in flags if f.startswith("-DCOMET_WIDE_EXPAND_MIN_M=")]
    return int(values[-1]) if values else 2**31 - 1


SHAPES = {  # (N, K): LLaMA-3-8B and 70B linears, plus SmolLM2's padded and narrow ones
    "8b-qkv": (6144, 4096), "8b-o": (4096, 4096), "8b-gateup": (28672, 4096), "8b-down": (4096, 14336),
    "70b-qkv": (10240, 8192), "70b-down": (8192, 28672), "smol-k": (192, 576), "smol-down": (576, 1536),
}


@gpu
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("m", [1, 16, 24, 40, 65, 129, 200, 1024])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemm_scaled_matches_reference(kernels, shape, m, out_dtype):
    """Whatever kernel w4ax_linear picks (decode, tiled, or on sm_90 wgmma: from 17 tokens on
    large weight matrices, from 33 on all)."""
    n, k = SHAPES[shape]
    g = -(-k // GROUP)
    g8 = max(1, g // 10)
    x, perm, _, qw, ws = make_case(m, k, n, g8, seed=3, device="cuda", dtype=out_dtype)
    y = ops.w4ax_linear(x, perm, g8, qw, ws, out_dtype)
    codes = [t.cuda() for t in ops.quantize_act_reference(x.cpu(), perm.cpu(), g8)]
    ref = ops.w4ax_gemm_reference(*codes, qw, ws, g8, torch.float32)
    tol = 2e-3 if out_dtype == torch.float16 else 1e-2
    assert rel_err(y, ref) < tol
    if ops.uses_wide_gemm(x, qw):  # the wgmma path, float32 out: only accumulation order differs
        qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8)
        assert rel_err(torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, 0, torch.float32), ref) < 1e-5


@gpu
@pytest.mark.parametrize("m, n, code_byte", [(33, 128, 0x77), (130, 136, 0x88)])  # codes +7 / -8
def test_gemm_extreme_values(kernels, m, n, code_byte):
    """fp16-max activations next to tiny ones; 130 tokens take the wgmma path on sm_90."""
    k = 512
    x = torch.full((m, k), 60000.0, device="cuda", dtype=torch.float16)
    x[::2] *= -1
    x[:, ::3] = 0.001
    perm = torch.arange(k, device="cuda", dtype=torch.int32)
    qw = torch.full((n, k // 2), code_byte, device="cuda", dtype=torch.uint8)
    ws = torch.full((n, k // GROUP), 1e-4, device="cuda", dtype=torch.float16)
    for g8 in (0, 2, 4):
        y = ops.w4ax_linear(x, perm, g8, qw, ws, torch.float32)
        q8, q4, s = ops.quantize_act_reference(x.cpu(), perm.cpu(), g8)
        ref = ops.w4ax_gemm_reference(q8, q4, s, qw.cpu(), ws.cpu(), g8, torch.float32)
        assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) < 1e-5


@gpu
def test_opcheck(kernels):
    x, perm, g8, qw, ws = make_case(17, 512, 256, 1, device="cuda")
    torch.library.opcheck(torch.ops.comet.quantize_act.default, (x, perm, g8))
    q8, q4, s = torch.ops.comet.quantize_act(x, perm, g8)
    torch.library.opcheck(torch.ops.comet.w4ax_gemm.default,
                          (q8, q4, s, qw, ws, g8, 0, False, torch.float16))


@gpu
def test_verify_exported_checkpoint(kernels, tiny_model, text_file, tmp_path):
    from comet_quant.calibrate import CalibrationConfig
    from comet_quant.export import export
    from comet_quant.scheme import get_scheme
    from comet_quant.verify import verify_checkpoint

    ck = export(str(tiny_model), None, get_scheme("w4ax-kv4-rtn", a8_budget=0.25), tmp_path / "ck",
                calib_config=CalibrationConfig(dataset=str(text_file), nsamples=4, seqlen=64, device="cpu"))
    result = verify_checkpoint(ck)
    assert result["ok"] and set(result["worst"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"}
    assert all(0 < e < 1e-2 for e in result["worst"].values())


@gpu
@pytest.mark.parametrize("rotate", [False, True])
def test_kernel_backend_matches_simulated(kernels, tiny_model, text_file, tmp_path, rotate):
    """The whole model on the kernels equals the simulated backend up to fp16 rounding."""
    from comet_quant import data
    from comet_quant.calibrate import CalibrationConfig
    from comet_quant.evaluate import perplexity
    from comet_quant.export import export
    from comet_quant.qmodules import load_quantized
    from comet_quant.scheme import get_scheme

    ck = export(str(tiny_model), None, get_scheme("w4ax-kv4-rtn", a8_budget=0.25, rotate=rotate),
                tmp_path / "ck",
                calib_config=CalibrationConfig(dataset=str(text_file), nsamples=4, seqlen=64, device="cpu"))
    fast, tok = load_quantized(ck, device="cuda")
    sim, _ = load_quantized(ck, device="cuda", dtype=torch.float16, backend="simulated")
    assert fast.model.layers[0].self_attn.q_proj.use_kernels
    layer = fast.model.layers[0]  # q / k / v and gate / up each run as one GEMM
    assert layer.self_attn.q_proj._group is layer.self_attn.v_proj._group is not None
    assert layer.mlp.gate_proj._group is layer.mlp.up_proj._group is not None
    assert not sim.model.layers[0].self_attn.q_proj.use_kernels
    ids = data.eval_windows(data.tokenize(tok, text_file.read_text()), 128, 4)
    a, b = perplexity(fast, ids, "cuda")["ppl"], perplexity(sim, ids, "cuda")["ppl"]
    assert abs(a / b - 1) < 0.01, (a, b)
    out = fast.generate(ids[:1, :8].cuda(), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


@gpu
@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("m", [2, 32, 128, 600])
def test_shared_input_group_on_kernels(kernels, m, scales):
    """The grouped GEMM (one activation quantization, concatenated weights) gives each member
    what it computes alone on the kernels, on the decode, packed and wgmma paths, for free and
    integer group scales."""
    from comet_quant.qmodules import SharedInputGroup

    x, lins = _shared_input_linears(k=1024, sizes=(512, 128, 128), groups8=2, device="cuda", m=m,
                                    scales=scales)
    for lin in lins:
        lin.to("cuda")
    alone = [lin(x) for lin in lins]
    assert SharedInputGroup.compatible(lins)
    group = SharedInputGroup(lins)
    grouped = [lin(x) for lin in lins]
    assert not group._pending
    for a, b in zip(grouped, alone):
        assert b.abs().max() > 1 and (a.float() - b.float()).abs().max() <= 2e-3 * b.float().abs().max()


# --------------------------------------------------------------------------- GPU: 4-bit KV cache

def _kv(b, h, t, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g) * (torch.rand(b, h, t, 1, generator=g) * 8 + 0.1)
    x[0, 0, 0] += 30.0          # all-positive vector: negative zero point
    x[-1, -1, -1, :3] = 300.0   # an outlier in one vector
    return x.to(dtype)


@gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv4_append_bit_exact(kernels, d, dtype):
    from comet_quant.kvcache import quantize_kv4

    x = _kv(2, 3, 37, d, dtype, seed=d)
    cap, start = 64, 5
    codes = torch.zeros(2, 3, cap, d // 2, dtype=torch.uint8, device="cuda")
    scale = torch.zeros(2, 3, cap, dtype=torch.float16, device="cuda")
    zero = torch.zeros_like(scale)
    torch.ops.comet.kv4_append(x.cuda(), codes, scale, zero, start)
    rc, rs, rz = quantize_kv4(x.float())
    sl = slice(start, start + 37)
    assert torch.equal(codes[:, :, sl].cpu(), rc)
    assert torch.equal(scale[:, :, sl].cpu(), rs) and torch.equal(zero[:, :, sl].cpu(), rz)
    assert not codes[:, :, :start].any() and not codes[:, :, start + 37:].any()


@gpu
@pytest.mark.parametrize("b,h,rep,d,length", [(1, 8, 4, 128, 1), (1, 8, 4, 128, 1000), (16, 8, 4, 128, 1280),
                                              (3, 3, 3, 64, 37), (2, 2, 8, 128, 5000), (1, 1, 1, 256, 300),
                                              (64, 8, 4, 128, 1100)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv4_decode_attention_matches_reference(kernels, b, h, rep, d, length, dtype):
    from comet_quant.kvcache import kv4_decode_attention_reference, quantize_kv4

    cap = length + 7
    k, v = (_kv(b, h, cap, d, dtype, seed=s).cuda() for s in (1, 2))
    kc, vc = quantize_kv4(k), quantize_kv4(v)
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(b, h * rep, d, generator=g) * 0.5).to(dtype).cuda()
    scaling = d ** -0.5
    out = torch.ops.comet.kv4_decode_attention(q, *kc, *vc, length, scaling)
    ref = kv4_decode_attention_reference(q.float(), *kc, *vc, length, scaling)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 8e-3 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    # Tokens past `length` are ignored: changing them changes nothing.
    kc[0][:, :, length:] = 15
    assert torch.equal(torch.ops.comet.kv4_decode_attention(q, *kc, *vc, length, scaling), out)


@gpu
def test_kv4_opcheck(kernels):
    x = _kv(2, 2, 5, 128, torch.float16, 0).cuda()
    codes = torch.zeros(2, 2, 16, 64, dtype=torch.uint8, device="cuda")
    scale, zero = (torch.zeros(2, 2, 16, dtype=torch.float16, device="cuda") for _ in range(2))
    torch.library.opcheck(torch.ops.comet.kv4_append.default, (x, codes, scale, zero, 3))
    q = torch.randn(2, 8, 128, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.comet.kv4_decode_attention.default,
                          (q, codes, scale, zero, codes, scale, zero, 8, 0.08))


@gpu
def test_kv4_cache_decode_kernel_matches_reference_in_model(kernels, checkpoint, monkeypatch):
    """Prefill + decode through the 4-bit cache on the GPU: the decode-attention kernel gives
    the logits of the PyTorch reference attention over the same cache (fp32 math)."""
    from comet_quant import kvcache
    from comet_quant.qmodules import load_quantized, new_kv_cache

    model, tok = load_quantized(checkpoint, device="cuda")
    ids = tok("Children ran along the quay counting boats and arguing about", return_tensors="pt").input_ids.cuda()

    def run():
        cache = new_kv_cache(model)
        steps = [model(ids[:, :4], **{cache_keyword(): cache}, use_cache=True).logits]
        for i in range(4, ids.shape[1]):
            steps.append(model(ids[:, i:i + 1], **{cache_keyword(): cache}, use_cache=True).logits)
        assert cache.layers[0].k[0].is_cuda and cache.get_seq_length() == ids.shape[1]
        return torch.cat(steps, 1).float()

    fast = run()
    real = kvcache.kv4_decode_attention
    calls = []
    monkeypatch.setattr(kvcache, "kv4_decode_attention",
                        lambda q, *a: calls.append(1) or kvcache.kv4_decode_attention_reference(q, *a))
    ref = run()
    assert calls and real is not kvcache.kv4_decode_attention
    torch.testing.assert_close(fast, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))


@gpu
def test_kv4_device_positions_match_host_positions(kernels):
    """CUDA-graph decode reads the write position and the length from device tensors: the same
    bits as the host integers for the append, the reference within tolerance for attention
    (the launch is sized for the capacity, so the sequence splits differ), also when a captured
    graph is replayed after the length changed."""
    from comet_quant.kvcache import kv4_decode_attention_reference, quantize_kv4

    b, h, rep, d, cap = 2, 4, 4, 128, 700
    x = _kv(b, h, 3, d, torch.float16, 5).cuda()
    host = [torch.zeros(b, h, cap, d // 2, dtype=torch.uint8, device="cuda"),
            *(torch.zeros(b, h, cap, dtype=torch.float16, device="cuda") for _ in range(2))]
    dev = [t.clone() for t in host]
    torch.ops.comet.kv4_append(x, *host, 301)
    torch.ops.comet.kv4_append(x, *dev, 0, torch.tensor([301], dtype=torch.int32, device="cuda"))
    assert all(torch.equal(a, c) for a, c in zip(host, dev)) and host[0][:, :, 301:304].any()
    torch.ops.comet.kv4_append(x, *dev, 0, torch.tensor([cap - 2], dtype=torch.int32, device="cuda"))
    assert all(torch.equal(a, c) for a, c in zip(host, dev)), "a write past the capacity must be dropped"

    k, v = (_kv(b, h, cap, d, torch.float16, seed=s).cuda() for s in (1, 2))
    kc, vc = quantize_kv4(k), quantize_kv4(v)
    q = (torch.randn(b, h * rep, d, generator=torch.Generator().manual_seed(3)) * 0.5).half().cuda()
    length = torch.tensor([37], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.ops.comet.kv4_decode_attention(q, *kc, *vc, cap, 0.09, length)  # warm-up outside capture
    with torch.cuda.graph(graph):
        out = torch.ops.comet.kv4_decode_attention(q, *kc, *vc, cap, 0.09, length)
    for n in (37, 1, 256, 699, cap):
        length.fill_(n)
        graph.replay()
        ref = kv4_decode_attention_reference(q.float(), *kc, *vc, n, 0.09)
        torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=8e-3 * float(ref.abs().max()))


@gpu
def test_graph_decode_matches_eager_decode(kernels, checkpoint):
    """A decode step captured in a CUDA graph over the 4-bit cache in device-position mode and
    replayed gives the logits of eager decode steps (same tokens fed)."""
    from comet_quant.qmodules import load_quantized, new_kv_cache

    model, tok = load_quantized(checkpoint, device="cuda")
    ids = tok("Children ran along the quay counting boats and arguing about", return_tensors="pt").input_ids.cuda()
    ids = ids.repeat(2, 1)  # batch 2
    n0 = 4
    with torch.no_grad():
        cache = new_kv_cache(model, ids.shape[1] + 4)
        model(ids[:, :n0], **{cache_keyword(): cache}, use_cache=True)
        eager = [model(ids[:, i:i + 1], **{cache_keyword(): cache}, use_cache=True).logits[:, -1].float()
                 for i in range(n0, ids.shape[1])]

        cache = new_kv_cache(model, ids.shape[1] + 4)
        model(ids[:, :n0], **{cache_keyword(): cache}, use_cache=True)
        cache.use_device_positions()
        step_ids = ids[:, n0:n0 + 1].clone()
        pos = torch.full_like(step_ids, n0)
        model(step_ids, position_ids=pos, **{cache_keyword(): cache}, use_cache=True)  # warm-up: writes n0
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(step_ids, position_ids=pos, **{cache_keyword(): cache}, use_cache=True).logits[:, -1]
            pos.add_(1)
            cache.advance()
        # The warm-up step already wrote token n0 without advancing: the first replay rewrites it.
        got = []
        for i in range(n0, ids.shape[1]):
            step_ids.copy_(ids[:, i:i + 1])
            graph.replay()
            got.append(logits.float().clone())
    assert cache.positions.tolist() == [ids.shape[1], ids.shape[1] + 1]
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))


@gpu
def test_bench_cuda_graphs_both_models(kernels, checkpoint, tiny_model, tmp_path):
    """`comet-quant bench` captures the decode step of the quantized model (4-bit cache) and of
    the FP16 model (transformers StaticCache) and replays it."""
    from comet_quant.bench import benchmark

    res = benchmark(str(checkpoint), [1, 3], 16, 5, "cuda", str(tiny_model), repeats=1, graphs=True)
    assert res["decode_mode"] == "cuda-graph"
    for run in ("quantized", "fp16"):
        rows = res["runs"][run]["rows"]
        assert [r["batch"] for r in rows] == [1, 3] and all(r["decode_tok_s"] > 0 for r in rows)
    q, f = res["runs"]["quantized"]["rows"][1], res["runs"]["fp16"]["rows"][1]
    assert q["kv_cache_bytes"] < 0.4 * f["kv_cache_bytes"]


@gpu
@pytest.mark.parametrize("kv_bits", [8, 16])
def test_bench_cuda_graphs_without_kv4(kernels, tiny_model, calib_dir, tmp_path, kv_bits):
    """Schemes without the 4-bit cache decode through transformers' StaticCache on the
    quantized side too (KV8: fake-quantized K/V inside attention); both capture and replay."""
    from comet_quant.bench import benchmark
    from comet_quant.export import export
    from comet_quant.scheme import get_scheme

    ck = export(str(tiny_model), calib_dir, get_scheme("w4ax-kv4", kv_bits=kv_bits), tmp_path / "q")
    res = benchmark(str(ck), [2], 12, 4, "cuda", str(tiny_model), repeats=1, graphs=True)
    q, f = res["runs"]["quantized"], res["runs"]["fp16"]
    assert q["kv_cache"] == "static" and q["rows"][0]["decode_tok_s"] > 0 and f["rows"][0]["decode_tok_s"] > 0
    assert q["rows"][0]["kv_cache_bytes"] == f["rows"][0]["kv_cache_bytes"]  # both fp16 static caches


@gpu
@pytest.mark.parametrize("a8_spans", [False, True])
@pytest.mark.parametrize("m", [1, 7, 64, 300])  # gather (M < 64), streaming rows, rows
@pytest.mark.parametrize("k", [576, 4096, 14336, 28672])
def test_quantize_act_int_scales_bitwise(kernels, m, k, a8_spans):
    """Integer group scales: the span exchange of both layouts' kernels, bit for bit (a8_spans:
    the 8-bit groups' own exchange too)."""
    x, perm, _, _, _ = make_case(m, k, 8, 0, seed=m + k, device="cuda")
    g = perm.numel() // GROUP
    for g8 in sorted({0, 1, 3, min(17, g), g // 2, g}):
        got = torch.ops.comet.quantize_act(x, perm, g8, False, True, a8_spans)
        want = ops.quantize_act_reference(x.cpu(), perm.cpu(), g8, False, True, a8_spans)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b), (m, k, g8)
        if a8_spans and g8 >= 3:
            assert torch.equal(want[2][:, 0], want[2][:, 2])  # one scale for the span's 8-bit groups
        qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True, a8_spans)
        want_qa, want_s = ops.quantize_act_wide_reference(x.cpu(), perm.cpu(), g8, False, True, a8_spans)
        assert torch.equal(qa.cpu(), want_qa), (m, k, g8)
        assert torch.equal(scales_t.cpu(), want_s), (m, k, g8)


@sm90
@pytest.mark.parametrize("m", [40, 200, 1000])
@pytest.mark.parametrize("g8", [0, 1, 17, 40])
def test_gemm_wide_int_scales(kernels, m, g8):
    """The wgmma GEMM with integer group scales (8-bit groups rescaled, each span's 4-bit groups
    summed in int32): K = 5120 is 40 groups, spans of 16 / 16 / 8; N = 520 leaves a partial
    channel tile; automatic, tiled, split-K, stream-K and persistent grids."""
    x, perm, qw, ws, wr = int_case(m, 40 * GROUP, 520, g8, seed=m + g8, device="cuda")
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True)
    ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, wr, g8)
    assert ref.abs().max() > 1
    for split in (0, 1, 3, -1, -2):
        y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, torch.float32, wr, g8)
        assert rel_err(y, ref) < 1e-5, (m, g8, split, rel_err(y, ref))


@sm90
@pytest.mark.parametrize("m", [40, 200, 1000])
@pytest.mark.parametrize("g8", [1, 3, 17, 40])
def test_gemm_wide_a8_spans(kernels, m, g8):
    """a8_spans: the 8-bit groups of each span share one activation scale and the wgmma GEMM sums
    them in int32 as runs of their own (K = 5120 is 40 groups: 17 8-bit groups are a run of 16
    and one of 1 in the next span; 40 is all 8-bit), on every grid kind and on expanded weights.
    Against the reference with the real scales (a wrong scale row or a group counted twice shows),
    and bit for bit against the same codes with unit scales (every output an integer sum)."""
    x, perm, qw, ws, wr = int_case(m, 40 * GROUP, 520, g8, seed=m + g8, device="cuda")
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True, True)
    ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, wr, g8)
    assert ref.abs().max() > 1
    if g8 > 1:  # per-group 8-bit scales (a8_spans off) give another result: the test tells them apart
        qa_off, scales_off = torch.ops.comet.quantize_act_wide(x, perm, g8, False, True)
        assert rel_err(ops.w4ax_gemm_wide_reference(qa_off, scales_off, qw, ws, torch.float32, wr, g8), ref) > 1e-4
    mult = (ws.float() / wr.float()[:, None]).half()  # the integer multipliers
    ones_t, ones_r = torch.ones_like(scales_t), torch.ones_like(wr)
    exact = ops.w4ax_gemm_wide_reference(qa, ones_t, qw, mult, torch.float32, ones_r, g8)
    assert exact.abs().max() > 100
    for split in (0, 1, 3, -1, -2):
        for expand in (0, 1):
            y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, split, torch.float32, wr, g8, expand, True)
            assert rel_err(y, ref) < 1e-5, (m, g8, split, expand, rel_err(y, ref))
            y = torch.ops.comet.w4ax_gemm_wide(qa, ones_t, qw, mult, split, torch.float32, ones_r, g8, expand, True)
            assert torch.equal(y, exact), (m, g8, split, expand, (y - exact).abs().max())


@sm90
def test_gemm_wide_int_scales_every_token_tile(kernels):
    """Integer group scales on every token tile the automatic plan takes, against the reference."""
    k = 1024
    seen = set()
    for m, n in [(200, 200), (700, 2048), (1000, 4096), (777, 3000), (3000, 6000), (4096, 4096)]:
        tokens, split, *_ = torch.ops.comet.wide_tile(m, n, k, 0, True)
        seen.add(tokens)
        x, perm, qw, ws, wr = int_case(m, k, n, 1, seed=m, device="cuda")
        qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 1, False, True)
        ref = ops.w4ax_gemm_wide_reference(qa, scales_t, qw, ws, torch.float32, wr, 1)
        y = torch.ops.comet.w4ax_gemm_wide(qa, scales_t, qw, ws, 0, torch.float32, wr, 1)
        assert rel_err(y, ref) < 1e-5, (m, n, tokens, split)
    # Integer group scales take 192-token tiles only on expanded weights (as free scales do);
    # on packed weights at most 128 (w4ax.h, WidePlan). Expansion is opt-in in the automatic
    # plan (COMET_WIDE_EXPAND_MIN_M), forced here for the large shapes.
    big = [(3000, 6000), (4096, 4096)]
    assert seen == ({64, 96, 128, 192} if expand_min_m() <= 3000 else {64, 96, 128}), seen
    assert 192 in {torch.ops.comet.wide_tile(m, n, k)[0] for m, n in big}  # free scales, either path
    assert 192 in {torch.ops.comet.wide_tile(m, n, k, 0, True, 1)[0] for m, n in big}
    assert 192 not in {torch.ops.comet.wide_tile(m, n, k, 0, True, -1)[0] for m, n in big}


@gpu
@pytest.mark.parametrize("a8_spans", [False, True])
@pytest.mark.parametrize("shape", ["8b-qkv", "8b-down", "smol-down"])
@pytest.mark.parametrize("m", [1, 16, 24, 64, 300])
def test_linear_int_scales_matches_reference(kernels, shape, m, a8_spans):
    """Whatever path w4ax_linear takes, integer group scales (and a8_spans) give the
    reference's result."""
    n, k = SHAPES[shape]
    g8 = max(1, -(-k // GROUP) // 10)
    x, perm, qw, ws, wr = int_case(m, k, n, g8, seed=5, device="cuda")
    y = ops.w4ax_linear(x, perm, g8, qw, ws, torch.float16, False, wr, a8_spans)
    codes = [t.cuda() for t in ops.quantize_act_reference(x.cpu(), perm.cpu(), g8, False, True, a8_spans)]
    ref = ops.w4ax_gemm_reference(*codes, qw, ws, g8, torch.float32)
    assert rel_err(y, ref) < 2e-3, rel_err(y, ref)


@sm90
def test_opcheck_wide_int_scales(kernels):
    x, perm, qw, ws, wr = int_case(130, 512, 256, 1, device="cuda")
    torch.library.opcheck(torch.ops.comet.quantize_act_wide.default, (x, perm, 1, False, True))
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 1, False, True)
    torch.library.opcheck(torch.ops.comet.w4ax_gemm_wide.default, (qa, scales_t, qw, ws, 0, torch.float16, wr, 1))
    x, perm, qw, ws, wr = int_case(130, 512, 256, 2, device="cuda")
    torch.library.opcheck(torch.ops.comet.quantize_act_wide.default, (x, perm, 2, False, True, True))
    torch.library.opcheck(torch.ops.comet.quantize_act.default, (x, perm, 2, False, True, True))
    qa, scales_t = torch.ops.comet.quantize_act_wide(x, perm, 2, False, True, True)
    torch.library.opcheck(torch.ops.comet.w4ax_gemm_wide.default,
                          (qa, scales_t, qw, ws, 0, torch.float16, wr, 2, 0, True))


@gpu
@pytest.mark.parametrize("a8_spans", [False, True])
def test_kernel_backend_int_scales(kernels, tiny_model, text_file, tmp_path, a8_spans):
    """A checkpoint of integer group scales (and a8_span_scales) on the kernels equals its
    simulation, and verifies."""
    from comet_quant import data
    from comet_quant.calibrate import CalibrationConfig
    from comet_quant.evaluate import perplexity
    from comet_quant.export import export
    from comet_quant.qmodules import load_quantized
    from comet_quant.scheme import get_scheme
    from comet_quant.verify import verify_checkpoint

    ck = export(str(tiny_model), None, get_scheme("w4ax-kv4-rtn", a8_budget=0.25, int_group_scales=True,
                                                  a8_span_scales=a8_spans),
                tmp_path / "ck",
                calib_config=CalibrationConfig(dataset=str(text_file), nsamples=4, seqlen=64, device="cpu"))
    fast, tok = load_quantized(ck, device="cuda")
    sim, _ = load_quantized(ck, device="cuda", dtype=torch.float16, backend="simulated")
    assert fast.model.layers[0].self_attn.q_proj.use_kernels
    ids = data.eval_windows(data.tokenize(tok, text_file.read_text()), 128, 4)
    a, b = perplexity(fast, ids, "cuda")["ppl"], perplexity(sim, ids, "cuda")["ppl"]
    assert abs(a / b - 1) < 0.01, (a, b)
    assert verify_checkpoint(ck)["ok"]
