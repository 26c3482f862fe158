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


def test_int_group_scales_needs_symmetric_4bit():
    from comet_quant.errors import CometError
    from comet_quant.scheme import QuantScheme

    assert QuantScheme(int_group_scales=True).kernel_gap() is None
    with pytest.raises(CometError, match="symmetric"):
        QuantScheme(int_group_scales=True, w_symmetric=False)
    with pytest.raises(CometError, match="4-bit"):
        QuantScheme(int_group_scales=True, a_bits=8)
    with pytest.raises(CometError, match="a8_span_scales .* needs int_group_scales=true"):
        QuantScheme(a8_span_scales=True)
    assert get_scheme("w4ax-rot-kv4-int-a8span").a8_span_scales


@pytest.mark.parametrize("a8_spans", [False, True])
def test_int_group_scales_checkpoint_roundtrip(tiny_model, text_file, tmp_path, a8_spans):
    """Export with integer group scales: wscale_row stored, the load check passes, and the
    simulated model runs; a tampered wscale_row is refused. a8_span_scales: recorded, and the
    loaded linears quantize their 8-bit groups with one scale per span."""
    import torch

    from comet_quant.calibrate import CalibrationConfig
    from comet_quant.errors import CometError
    from comet_quant.export import export
    from comet_quant.primitives import fake_quantize_activation, quantize_activation
    from comet_quant.qmodules import check_int_scales, load_quantized
    from comet_quant.scheme import get_scheme

    scheme = get_scheme("w4ax-kv4-rtn", int_group_scales=True, a8_span_scales=a8_spans, a8_budget=0.5)
    ck = export(str(tiny_model), None, scheme, tmp_path / "ck",
                calib_config=CalibrationConfig(dataset=str(text_file), nsamples=2, seqlen=32, device="cpu"))
    model, _ = load_quantized(ck)
    q = model.model.layers[0].self_attn.q_proj
    assert q.int_scales and q.wscale_row.shape == (q.out_features,)
    assert q.a8_spans == a8_spans
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    d = max(downs, key=lambda m: m.groups8)
    assert d.groups8 >= 2
    x = torch.randn(3, d.in_features) * torch.linspace(0.1, 4, d.in_features)
    _, _, s = quantize_activation(x, d.act_perm, d.groups8, d.group_size, int_scales=True, a8_spans=a8_spans)
    assert torch.equal(s[:, 0], s[:, 1]) == a8_spans
    sim = {a: fake_quantize_activation(x, d.act_perm, d.groups8, d.group_size, int_scales=True, a8_spans=a)
           for a in (False, True)}
    assert torch.equal(d.quantized_input(x), sim[a8_spans]) and not torch.equal(sim[False], sim[True])
    out = model(torch.randint(0, 100, (1, 8))).logits
    assert torch.isfinite(out).all()
    with pytest.raises(CometError, match="corrupt"):
        check_int_scales(q.wscale, q.wscale_row * 3)


def test_schemes_listing_names_every_preset_and_its_options():
    from click.testing import CliRunner

    from comet_quant.cli import main
    from comet_quant.scheme import PRESETS

    out = CliRunner().invoke(main, ["schemes"])
    assert out.exit_code == 0, out.output
    lines = {l.split()[0]: l for l in out.output.splitlines()}
    assert set(lines) == set(PRESETS)
    assert "hadamard int-group-scales" in lines["w4ax-rot-kv4-int"]
    assert "a8-span" not in lines["w4ax-rot-kv4-int"]
    assert "hadamard int-group-scales a8-span-scales" in lines["w4ax-rot-kv4-int-a8span"]
    assert "hadamard" in lines["quarot-like"] and "int-group" not in lines["w4ax-rot-kv4"]
    assert "a4/a8 x1 grp" in lines["atom-like"] and "a4/a8<= 25%" in lines["w4ax-kv4-25"]
    assert "a16" in lines["w4a16"] and "kv16" in lines["w4a16"]
