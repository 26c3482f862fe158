import pytest

from comet_quant.errors import CometError
from comet_quant.scheme import PRESETS, QuantScheme, get_scheme


def test_presets_round_trip_through_dict():
    for name, s in PRESETS.items():
        assert s.name == name
        assert QuantScheme.from_dict(s.to_dict()) == s


def test_unknown_field_is_refused():
    d = get_scheme("w4ax-kv4").to_dict() | {"bogus": 1}
    with pytest.raises(CometError, match="unknown quantization scheme field"):
        QuantScheme.from_dict(d)


@pytest.mark.parametrize("field,value", [("group_size", 100), ("a8_budget", 1.5), ("a_bits", 3),
                                         ("kv_bits", 2), ("w_method", "awq"), ("k_policy", "x"),
                                         ("group_size", "128"), ("permute", 1)])
def test_bad_values_are_refused(field, value):
    d = get_scheme("w4ax-kv4").to_dict() | {field: value}
    with pytest.raises(CometError):
        QuantScheme.from_dict(d)


def test_unknown_preset():
    with pytest.raises(CometError, match="unknown scheme"):
        get_scheme("w3a3")


def test_overrides_ignore_none():
    s = get_scheme("w4ax-kv4", a8_budget=0.25, group_size=None)
    assert s.a8_budget == 0.25 and s.group_size == 128
