import pytest
import torch

from comet_quant import primitives as P
from comet_quant.errors import CometError


def randn(*shape, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers:
        x[..., :: max(1, shape[-1] // 7)] *= 30.0
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,g", [((1, 128), 128), ((17, 256), 128), ((5, 96), 32)])
def test_symmetric_round_trip_error_bound(bits, shape, g):
    x = randn(*shape, seed=bits)
    q, s = P.quantize_symmetric(x, bits, g)
    qmax = P.qmax_for_bits(bits)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
    # The largest element of each group is represented exactly at +-qmax.
    assert int(q.abs().reshape(shape[0], -1, g).amax(-1).min()) == qmax
    err = (P.dequantize_symmetric(q, s, g) - x).abs().reshape(shape[0], -1, g)
    assert (err <= s[..., None] / 2 + 1e-6).all()


def test_zero_group_is_finite():
    x = torch.zeros(2, 128)
    x[1, 5] = 3.0
    q, s = P.quantize_symmetric(x, 4, 128)
    assert torch.isfinite(s).all()
    assert torch.equal(P.dequantize_symmetric(q, s, 128)[0], torch.zeros(128))


def test_group_size_must_divide():
    with pytest.raises(CometError, match="not a multiple of the group size"):
        P.quantize_symmetric(torch.randn(2, 100), 4, 128)


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_rtn_round_trip(symmetric):
    w = randn(64, 256, seed=3, outliers=False)
    q, s, z = P.quantize_weight_rtn(w, 128, symmetric)
    if symmetric:
        assert z is None and q.min() >= -8 and q.max() <= 7
    else:
        assert z.dtype == torch.uint8 and q.min() >= 0 and q.max() <= 15
    err = (P.dequantize_weight(q, s, z, 128) - w).abs().reshape(64, 2, 128)
    assert (err <= s[..., None] * 0.5 + 1e-5).all()
    assert err.mean() < 0.2 * w.abs().mean()


def test_weight_rtn_rejects_nan():
    w = torch.randn(4, 128)
    w[0, 0] = float("nan")
    with pytest.raises(CometError, match="NaN"):
        P.quantize_weight_rtn(w, 128, True)


@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_bit_exact(signed):
    g = torch.Generator().manual_seed(7)
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (33, 258), generator=g, dtype=torch.int8)
    packed = P.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (33, 129)
    assert torch.equal(P.unpack_int4(packed, signed), q)
    # Layout: even column in the low nibble, two's complement for signed codes.
    assert int(packed[0, 0]) == (int(q[0, 0]) & 0xF) | ((int(q[0, 1]) & 0xF) << 4)


def test_pack_rejects_odd_columns():
    with pytest.raises(CometError):
        P.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def _integer_reference(x, perm, groups8, qweight, wscale, g):
    """Integer accumulation per group, then scales: what the GEMM kernel computes."""
    q8, q4, sx = P.quantize_activation(x, perm, groups8, g)
    qx = torch.cat((q8, q4), 1).to(torch.int64)
    qw = P.unpack_int4(qweight, signed=True).to(torch.int64)
    m, kp = qx.shape
    acc = torch.einsum("mgk,ngk->mng", qx.reshape(m, -1, g), qw.reshape(qw.shape[0], -1, g))
    return (acc.double() * sx.double()[:, None, :] * wscale.double()[None]).sum(-1)


@pytest.mark.parametrize("groups8", [0, 1, 3])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4ax_reference_matches_integer_accumulation(groups8, m):
    g, k, n = 128, 300, 48
    kp = 384
    x = randn(m, k, seed=m)
    perm = torch.randperm(kp, generator=torch.Generator().manual_seed(2)).to(torch.int32)
    w = randn(n, kp, seed=5, outliers=False)
    q, s, _ = P.quantize_weight_rtn(w, g, True)
    qweight = P.pack_int4(q)
    y = P.w4ax_linear_reference(x, perm, groups8, qweight, s, None, g)
    ref = _integer_reference(x, perm, groups8, qweight, s, g)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    # And it approximates the float product of permuted, padded x with the weight.
    exact = P.pad_channels(x, kp)[:, perm.long()] @ P.dequantize_weight(q, s, None, g).t()
    rel = (y - exact).norm() / exact.norm()
    assert 0 < rel < 0.25


def test_more_8bit_groups_reduce_activation_error():
    x = randn(64, 512, seed=11)
    perm = torch.sort(x.abs().amax(0), descending=True).indices.to(torch.int32)
    xp = x[:, perm.long()]
    errs = [(P.fake_quantize_activation(x, perm, g8, 128) - xp).norm() for g8 in range(5)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_round_trip_bound(bits):
    x = randn(2, 3, 9, 64, seed=bits)
    q, s, z = P.quantize_kv(x, bits)
    assert q.dtype == torch.uint8 and int(q.max()) <= (1 << bits) - 1
    err = (P.dequantize_kv(q, s, z) - x).abs()
    assert (err <= s / 2 + 1e-5).all()
    assert torch.equal(P.fake_quantize_kv(x, 16), x)


@pytest.mark.parametrize("groups8", [1, 3, 17, 20])
def test_a8_span_scales_share_one_scale_per_span(groups8):
    """a8_spans: the 8-bit groups of each span of 16 share one scale per token (their largest
    absmax / 127), every code stays in [-127, 127] with the error bound of that scale, and the
    4-bit groups are quantized exactly as without it."""
    m, g = 6, 20
    x = randn(m, g * 128, seed=groups8)
    x[:, :128 * groups8] *= torch.linspace(0.05, 3, groups8).repeat_interleave(128)  # groups of unlike ranges
    perm = torch.arange(g * 128)
    q8, q4, s = P.quantize_activation(x, perm, groups8, 128, int_scales=True, a8_spans=True)
    b8, b4, bs = P.quantize_activation(x, perm, groups8, 128, int_scales=True)
    assert torch.equal(q4, b4) and torch.equal(s[:, groups8:], bs[:, groups8:])
    amax = x[:, :128 * groups8].reshape(m, groups8, 128).abs().amax(-1)
    for first in range(0, groups8, 16):
        span = slice(first, min(groups8, first + 16))
        want = amax[:, span].amax(-1, keepdim=True) / 127
        torch.testing.assert_close(s[:, span], want.expand_as(s[:, span]), rtol=1e-6, atol=0)
    if groups8 > 16:  # a second span: its own scale
        assert not torch.equal(s[:, 15], s[:, 16])
    assert not torch.equal(s[:, :groups8], bs[:, :groups8]) or groups8 == 1  # shared, not per group
    assert int(q8.abs().max()) <= 127 and int(q8.abs().max()) == 127
    err = (P.dequantize_symmetric(q8, s[:, :groups8], 128) - x[:, :128 * groups8]).abs()
    assert (err.reshape(m, groups8, 128) <= s[:, :groups8, None] / 2 + 1e-6).all()
