"""Calibrate -> export -> load -> evaluate on a tiny random LLaMA, through Python and the CLI."""
import json

import pytest
import torch
from click.testing import CliRunner

from comet_quant.calibrate import Calibration
from comet_quant.checkpoint import open_checkpoint
from comet_quant.cli import main
from comet_quant.export import export
from comet_quant.models import SITES, load_model, resolve_model
from comet_quant.primitives import w4ax_linear_reference
from comet_quant.qmodules import W4AxLinear, load_quantized
from comet_quant.scheme import get_scheme

CFG = dict(nsamples=8, seqlen=64, batch_size=4)


def test_calibration_contents(calib_dir, tiny_model):
    cal = Calibration.open(calib_dir)
    m = cal.manifest
    assert m["num_layers"] == 2 and m["hessians"] is True
    assert m["data"]["nsamples"] == 8 and m["data"]["seqlen"] == 64 and len(m["data"]["sha256"]) == 64
    stats = cal.layer(0)
    assert stats["attn_in.absmax"].shape == (192,) and stats["mlp_out.absmax"].shape == (320,)
    assert stats["attn_in.hessian"].shape == (192, 192)
    h = stats["mlp_in.hessian"]
    assert torch.allclose(h, h.t()) and (h.diagonal() >= 0).all() and h.abs().sum() > 0
    # The planted outlier channels (norm weight 20 on channels 0-4) dominate attn_in.
    assert stats["attn_in.absmax"][:5].min() > stats["attn_in.absmax"][5:].max()
    assert stats["k_proj.absmax"].shape == (64,)
    # 256 evenly spaced activation rows per input (8 x 64 tokens: every second token).
    sample = stats["mlp_out.sample"]
    assert sample.shape == (256, 320) and sample.dtype == torch.float16
    assert torch.isfinite(sample).all() and sample.abs().sum() > 0
    assert (sample.float().abs().amax(0) <= stats["mlp_out.absmax"] * 1.001 + 1e-3).all()


def test_massive_tokens_left_out_of_hessian():
    from comet_quant.calibrate import _SiteStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, generator=g)
    x[:, 0] *= 300  # attention-sink-like first positions
    plain, robust = _SiteStats(True), _SiteStats(True, massive_ratio=100.0)
    plain.add(x)
    robust.add(x)
    hp, hr = plain.tensors("s")["s.hessian"], robust.tensors("s")["s.hessian"]
    rest = x[:, 1:].reshape(-1, 16)
    torch.testing.assert_close(hr, rest.t() @ rest / rest.shape[0])
    assert hp.diagonal().mean() > 100 * hr.diagonal().mean()
    # absmax still sees every token (activation quantization must cover them).
    assert torch.equal(robust.tensors("s")["s.absmax"], plain.tensors("s")["s.absmax"])


def test_checkpoint_format(checkpoint):
    ckpt = open_checkpoint(checkpoint)
    qc = ckpt.qconfig
    assert qc["format_version"] == 1 and qc["scheme"]["name"] == "w4ax-kv4"
    assert qc["layers"]["0"]["attn_in"] == {"k": 192, "k_padded": 256, "groups8": qc["layers"]["0"]["attn_in"]["groups8"]}
    t = ckpt.tensors()
    p = "model.layers.0.self_attn.q_proj"
    assert t[f"{p}.qweight"].dtype == torch.uint8 and t[f"{p}.qweight"].shape == (192, 128)
    assert t[f"{p}.wscale"].dtype == torch.float16 and t[f"{p}.wscale"].shape == (192, 2)
    assert t[f"{p}.act_perm"].dtype == torch.int32
    # q, k, v share one permutation and precision map.
    for lin in ("k_proj", "v_proj"):
        assert torch.equal(t[f"model.layers.0.self_attn.{lin}.act_perm"], t[f"{p}.act_perm"])
    assert "lm_head.weight" not in t  # tied embeddings are stored once
    summary = qc["summary"]
    assert summary["groups8"] == int(0.25 * summary["activation_groups"])
    assert 4 < summary["effective_activation_bits"] < 8


def test_loaded_linear_matches_reference(checkpoint, tiny_model):
    """The loaded module equals the reference op on the stored tensors, and approximates FP."""
    model, _ = load_quantized(checkpoint)
    fp, _ = load_model(resolve_model(str(tiny_model)))
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(0))
    outliers = {"self_attn": slice(0, 5), "mlp": slice(-3, None)}  # as planted in the model
    for i in range(2):
        for lin in SITES["attn_in"] + SITES["mlp_in"]:
            q = model.model.layers[i].get_submodule(lin)
            assert isinstance(q, W4AxLinear)
            xin = x.clone()
            xin[:, outliers[lin.split(".")[0]]] *= 20
            ref = w4ax_linear_reference(xin, q.act_perm, q.groups8, q.qweight, q.wscale, None, 128)
            torch.testing.assert_close(q(xin), ref, rtol=1e-5, atol=1e-5)
            exact = fp.model.layers[i].get_submodule(lin)(xin)
            rel = float((q(xin) - exact).norm() / exact.norm())
            assert 0 < rel < 0.2, (lin, rel)


def test_save_load_identical_outputs(checkpoint, tiny_model):
    a, tok = load_quantized(checkpoint)
    b, _ = load_quantized(checkpoint)
    ids = tok("The harbor town woke slowly", return_tensors="pt").input_ids
    la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb)
    fp, _ = load_model(resolve_model(str(tiny_model)))
    lf = fp(ids).logits
    assert 0 < float((la - lf).norm() / lf.norm()) < 0.5
    out = a.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_kv4_changes_attention_inputs(checkpoint):
    model, tok = load_quantized(checkpoint)
    assert model.model.layers[0].self_attn.comet_kv_bits == 4
    ids = tok("Children ran along the quay", return_tensors="pt").input_ids
    with_kv4 = model(ids).logits
    model.set_attn_implementation("sdpa")
    assert not torch.equal(with_kv4, model(ids).logits)


def test_layers_load_lazily(tiny_model):
    """Decoder layers stay on the meta device until materialized, and go back after release."""
    from comet_quant.lazy import LayerwiseModel

    lm = LayerwiseModel(resolve_model(str(tiny_model)))
    assert lm.lazy
    q = lambda i: lm.model.model.layers[i].self_attn.q_proj.weight  # noqa: E731
    assert q(0).is_meta and q(1).is_meta and not lm.model.model.embed_tokens.weight.is_meta
    fp, _ = load_model(resolve_model(str(tiny_model)))
    lm.materialize(1)
    assert torch.equal(q(1), fp.model.layers[1].self_attn.q_proj.weight) and q(0).is_meta
    lm.release(1)
    assert q(1).is_meta
    assert set(dict(lm.non_layer_tensors())) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert not dict(lm.non_layer_tensors(head=True))  # tied: no separate lm_head


def test_cli_end_to_end(tiny_model, text_file, tmp_path):
    r = CliRunner()
    cal, ck, res = tmp_path / "cal", tmp_path / "ck", tmp_path / "res.json"
    common = ["--dataset", str(text_file), "--nsamples", "4", "--seqlen", "64"]
    out = r.invoke(main, ["calibrate", "--model", str(tiny_model), "--out", str(cal), *common])
    assert out.exit_code == 0, out.output
    out = r.invoke(main, ["export", "--model", str(tiny_model), "--calib", str(cal), "--scheme",
                          "w4ax-kv4-rtn", "--out", str(ck)])
    assert out.exit_code == 0, out.output
    out = r.invoke(main, ["eval", "perplexity", str(ck), "--dataset", str(text_file), "--seqlen",
                          "128", "--max-windows", "2", "--output", str(res)])
    assert out.exit_code == 0, out.output
    result = json.loads(res.read_text())
    assert set(result["results"]) == {"fp", "quantized"} and result["windows"] == 2
    assert result["dataset"]["path"] == str(text_file)
    assert result["results"]["quantized"]["ppl"] > 1 and result["results"]["fp"]["ppl"] > 1
    assert "quantized / fp" in out.output
    out = r.invoke(main, ["generate", str(ck), "--prompt", "The harbor town", "--max-new-tokens", "5",
                          "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("The harbor town") or "harbor" in out.output
    # The accuracy options reach the scheme written into the checkpoint.
    ck2 = tmp_path / "ck2"
    out = r.invoke(main, ["export", "--model", str(tiny_model), "--calib", str(cal), "--scheme",
                          "w4ax-kv4-rtn", "--a8-criterion", "error", "--a8-layer-cap", "0.5",
                          "--no-clip", "--a8-budget", "0.25", "--out", str(ck2)])
    assert out.exit_code == 0, out.output
    sch = open_checkpoint(ck2).scheme
    assert (sch.a8_criterion, sch.a8_layer_cap, sch.w_clip) == ("error", 0.5, False)
    layers = open_checkpoint(ck2).qconfig["layers"]
    assert all(v["groups8"] <= v["k_padded"] // 128 // 2 for lay in layers.values() for v in lay.values())
    # Integer group scales from the command line: stored in the scheme, wscale_row written, and
    # a combination the scheme refuses is one line.
    ck3 = tmp_path / "ck3"
    out = r.invoke(main, ["export", "--model", str(tiny_model), "--calib", str(cal), "--scheme",
                          "w4ax-kv4-rtn", "--int-group-scales", "--out", str(ck3)])
    assert out.exit_code == 0, out.output
    opened = open_checkpoint(ck3)
    assert opened.scheme.int_group_scales
    assert any(k.endswith("wscale_row") for k in opened.tensors())
    out = r.invoke(main, ["export", "--model", str(tiny_model), "--calib", str(cal), "--scheme",
                          "w4ax-kv4-rtn", "--int-group-scales", "--asymmetric", "--out", str(tmp_path / "ck4")])
    assert out.exit_code == 2 and "symmetric" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "ck4").exists()


def test_export_without_calib_calibrates_first(tiny_model, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_model), "--dataset", str(text_file),
                                  "--nsamples", "4", "--seqlen", "64"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "comet_quant_out" / "tiny-llama-calib" / "manifest.json").is_file()
    ck = tmp_path / "comet_quant_out" / "tiny-llama-w4ax-kv4"
    assert open_checkpoint(ck).qconfig["calibration"]["nsamples"] == 4


@pytest.mark.parametrize("preset", ["atom-like", "quarot-like"])
def test_baseline_presets(tiny_model, calib_dir, tmp_path, preset):
    """Atom-like keeps one 8-bit group per input; QuaRot-like rotates and stays all 4-bit;
    both approximate the FP layers (the rotation is undone exactly by the rotated weights)."""
    ck = export(str(tiny_model), calib_dir, get_scheme(preset), tmp_path / preset)
    qc = open_checkpoint(ck).qconfig
    groups8 = {s["groups8"] for layer in qc["layers"].values() for s in layer.values()}
    assert groups8 == ({1} if preset == "atom-like" else {0})
    model, _ = load_quantized(ck)
    fp, _ = load_model(resolve_model(str(tiny_model)))
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(1))
    q = model.model.layers[0].mlp.gate_proj
    exact = fp.model.layers[0].mlp.gate_proj(x)
    # A wrong rotation or permutation would give errors near 1; 4-bit GPTQ on random inputs
    # (not the calibration distribution) costs ~0.2.
    assert 0 < float((q(x) - exact).norm() / exact.norm()) < 0.35
    q.a_bits = 16  # weights only: rotation in, rotation out
    assert float((q(x) - exact).norm() / exact.norm()) < 0.3
