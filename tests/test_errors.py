"""Bad input: one clear line, exit status 2, no traceback, no half-written output."""
import json
import shutil

import pytest
from click.testing import CliRunner

from comet_quant import export as export_mod
from comet_quant.cli import main
from comet_quant.errors import CometError
from comet_quant.export import export
from comet_quant.scheme import get_scheme

from conftest import make_tiny_llama

FAST = ["--nsamples", "4", "--seqlen", "64"]


def run(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def assert_one_line_error(code, output, needle):
    assert code == 2, output
    lines = [l for l in output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], output
    assert "Traceback" not in output


def test_missing_model(tmp_path):
    assert_one_line_error(*run("calibrate", "--model", str(tmp_path / "nope")), "does not exist")


def test_directory_without_config(tmp_path):
    assert_one_line_error(*run("calibrate", "--model", str(tmp_path)), "no config.json")


def test_unsupported_architecture(tmp_path, sample_text, text_file):
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    assert_one_line_error(*run("calibrate", "--model", str(gpt2), "--dataset", str(text_file), *FAST),
                          "unsupported architecture 'gpt2'")


def test_corrupt_model_weights(tmp_path, tiny_model, text_file):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(*run("calibrate", "--model", str(bad), "--dataset", str(text_file), *FAST),
                          "could not load model")


def test_group_size_policy_error(tiny_model, text_file, tmp_path):
    with pytest.raises(CometError, match="not a multiple of the group size"):
        export(str(tiny_model), None, get_scheme("w4ax-kv4-rtn", k_policy="error"), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(*run("export", "--model", str(tiny_model), "--group-size", "100"),
                          "group_size must be a positive multiple of 16")


def test_a8_span_scales_needs_integer_group_scales(tiny_model, tmp_path):
    assert_one_line_error(*run("export", "--model", str(tiny_model), "--a8-span-scales", "--out", str(tmp_path / "o")),
                          "a8_span_scales shares the 8-bit groups' scales for the integer-scale GEMM; "
                          "it needs int_group_scales=true")
    assert not (tmp_path / "o").exists()


def test_empty_dataset(tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert_one_line_error(*run("calibrate", "--model", str(tiny_model), "--dataset", str(empty),
                               "--out", str(tmp_path / "c")), "is empty")
    assert not (tmp_path / "c").exists()


def test_existing_output_needs_overwrite(tiny_model, text_file, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    args = ["calibrate", "--model", str(tiny_model), "--dataset", str(text_file), *FAST, "--out", str(out)]
    assert_one_line_error(*run(*args), "already exists; pass --overwrite")
    code, output = run(*args, "--overwrite")
    assert code == 0, output
    assert (out / "manifest.json").is_file()


def test_interrupted_export_leaves_nothing(tiny_model, text_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = export_mod.quantize_linear

    def interrupt_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(export_mod, "quantize_linear", interrupt_midway)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ck"
    code, output = run("export", "--model", str(tiny_model), "--dataset", str(text_file), *FAST,
                       "--scheme", "w4ax-kv4-rtn", "--out", str(out))
    assert code == 130 and "interrupted" in output and "--resume" in output
    assert not out.exists()
    # Progress is kept only under the hidden partial name, marked unfinished by its job file.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck")] == [".ck.partial"]
    assert (tmp_path / ".ck.partial" / "job.json").is_file()


@pytest.fixture()
def exported(tiny_model, text_file, tmp_path):
    out = tmp_path / "ck"
    from comet_quant.calibrate import CalibrationConfig
    export(str(tiny_model), None, get_scheme("w4ax-kv4-rtn"), out,
           calib_config=CalibrationConfig(dataset=str(text_file), nsamples=4, seqlen=64))
    return out


def test_truncated_checkpoint(exported, text_file):
    f = sorted(exported.glob("model-*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:1000])
    assert_one_line_error(*run("eval", "perplexity", str(exported), "--dataset", str(text_file)),
                          "does not match its recorded sha256")


def edit_scheme(checkpoint, **fields):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["quantization_config"]["scheme"].update(fields)
    (checkpoint / "config.json").write_text(json.dumps(cfg))


def test_edited_config(exported, text_file):
    edit_scheme(exported, group_size=64)
    assert_one_line_error(*run("eval", "perplexity", str(exported), "--dataset", str(text_file)),
                          "config.json does not match its recorded sha256")


def test_unknown_scheme_field_in_checkpoint(exported, text_file):
    edit_scheme(exported, w_bits_extra=3)
    assert_one_line_error(*run("eval", "perplexity", str(exported), "--dataset", str(text_file)),
                          "unknown quantization scheme field")


def test_mismatched_calibration(tiny_model, text_file, tmp_path, sample_text):
    other = make_tiny_llama(tmp_path / "other", sample_text, seed=3, layers=1)
    cal = tmp_path / "cal"
    assert run("calibrate", "--model", str(other), "--dataset", str(text_file), *FAST,
               "--out", str(cal))[0] == 0
    assert_one_line_error(*run("export", "--model", str(tiny_model), "--calib", str(cal),
                               "--scheme", "w4ax-kv4-rtn", "--out", str(tmp_path / "o")),
                          "was made for model")


def test_gptq_needs_hessians(tiny_model, text_file, tmp_path):
    cal = tmp_path / "cal"
    assert run("calibrate", "--model", str(tiny_model), "--dataset", str(text_file), *FAST,
               "--out", str(cal))[0] == 0
    assert_one_line_error(*run("export", "--model", str(tiny_model), "--calib", str(cal),
                               "--out", str(tmp_path / "o")), "has no Hessians")


def test_cuda_missing(tiny_model, text_file, exported):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_one_line_error(*run("calibrate", "--model", str(tiny_model), "--device", "cuda"),
                          "CUDA is not available")
    assert_one_line_error(*run("verify", str(exported)), "needs an NVIDIA GPU")
    assert_one_line_error(*run("build-kernels"), "CUDA is not available")
    assert_one_line_error(*run("eval", "perplexity", str(exported), "--dataset", str(text_file),
                               "--backend", "kernels"), "needs a CUDA GPU")


def test_tensors_from_another_model(exported, tiny_model, text_file, tmp_path, sample_text):
    """A checkpoint whose shards come from a different model, manifest rewritten to match."""
    from comet_quant.checkpoint import MANIFEST_FILE, sha256_file

    other_model = make_tiny_llama(tmp_path / "wide", sample_text, hidden=256, inter=320, layers=2,
                                  heads=4, kv_heads=2)
    other = tmp_path / "other"
    from comet_quant.calibrate import CalibrationConfig
    export(str(other_model), None, get_scheme("w4ax-kv4-rtn"), other,
           calib_config=CalibrationConfig(dataset=str(text_file), nsamples=4, seqlen=64))
    for f in other.glob("model-*.safetensors"):
        shutil.copy(f, exported / f.name)
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    manifest["sha256"] = {n: sha256_file(exported / n) for n in manifest["sha256"]}
    (exported / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert_one_line_error(*run("eval", "perplexity", str(exported), "--dataset", str(text_file)),
                          "does not match its config")
    assert_one_line_error(*run("verify", str(exported)), "does not match its config")


def test_verify_checks_integrity_without_gpu(exported):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, output = run("verify", str(exported))
    assert "integrity: OK" in output
    assert_one_line_error(code, output, "needs an NVIDIA GPU")
