"""Property tests of the reference quantizers, packing and scheme parsing (hypothesis)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comet_quant import primitives as P
from comet_quant.errors import CometError
from comet_quant.scheme import QuantScheme, get_scheme

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grouped(draw):
    rows = draw(st.integers(1, 9))
    group = draw(st.sampled_from([16, 32, 64, 128]))
    groups = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 6e4]))
    x = torch.randn(rows, group * groups, generator=torch.Generator().manual_seed(seed)) * scale
    zero_rows = draw(st.lists(st.integers(0, rows - 1), max_size=2))
    x[zero_rows] = 0.0
    return x, group


@SETTINGS
@given(grouped(), st.sampled_from([4, 8]))
def test_symmetric_quantization_bounds(case, bits):
    x, g = case
    q, s = P.quantize_symmetric(x, bits, g)
    qmax = P.qmax_for_bits(bits)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert int(q.abs().max()) <= qmax
    err = (P.dequantize_symmetric(q, s, g) - x).abs().reshape(x.shape[0], -1, g)
    assert (err <= s[..., None] * 0.5 * (1 + 1e-5) + 1e-30).all()


@SETTINGS
@given(grouped(), st.booleans())
def test_weight_round_trip(case, symmetric):
    w, g = case
    q, s, z = P.quantize_weight_rtn(w, g, symmetric)
    assert int(q.min()) >= (-8 if symmetric else 0) and int(q.max()) <= (7 if symmetric else 15)
    packed = P.pack_int4(q)
    assert torch.equal(P.unpack_int4(packed, signed=symmetric), q)
    err = (P.dequantize_weight(q, s, z, g) - w).abs().reshape(w.shape[0], -1, g)
    # Asymmetric rounds the zero point too, which can cost up to one more half step.
    assert (err <= s[..., None] * (0.5 if symmetric else 1.0) * (1 + 1e-5) + 1e-30).all()


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_pack_unpack_any_shape(rows, half_cols, seed):
    q = torch.randint(-8, 8, (rows, 2 * half_cols), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.int8)
    assert torch.equal(P.unpack_int4(P.pack_int4(q), True), q)


@SETTINGS
@given(grouped(), st.sampled_from([4, 8]))
def test_kv_round_trip(case, bits):
    x, _ = case
    q, s, z = P.quantize_kv(x, bits)
    assert int(q.max()) <= (1 << bits) - 1
    assert ((P.dequantize_kv(q, s, z) - x).abs() <= s * 0.5 * (1 + 1e-5) + s * 1e-3).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused(bad):
    x = torch.randn(3, 128)
    x[1, 7] = bad
    with pytest.raises(CometError, match="NaN or inf"):
        P.quantize_symmetric(x, 4, 128)
    with pytest.raises(CometError, match="NaN or inf"):
        P.quantize_weight_rtn(x, 128, True)


_FIELDS = {f: v for f, v in get_scheme("w4ax-kv4").to_dict().items()}
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                    st.text(max_size=6))


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(_FIELDS) + ["extra"]), _values, max_size=5))
def test_scheme_parsing_never_crashes(changes):
    """Any edit of a scheme dict either parses to a valid scheme or raises CometError."""
    d = dict(_FIELDS, **changes)
    try:
        s = QuantScheme.from_dict(d)
    except CometError:
        return
    assert s.group_size % 16 == 0 and 0 <= s.a8_budget <= 1 and s.kv_bits in (4, 8, 16)
    assert not (isinstance(s.a8_threshold, float) and math.isnan(s.a8_threshold))
