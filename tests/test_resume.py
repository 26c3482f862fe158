"""Resume: kill a real calibrate/export process midway, --resume, get the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from comet_quant.cli import main
from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, sample_text):
    """Eight layers, wide enough that each takes a moment: room to kill a run between layers."""
    return make_tiny_llama(tmp_path_factory.mktemp("deep") / "deep", sample_text, hidden=256,
                           inter=1024, layers=8, heads=4, kv_heads=2)


def args(model, text_file, out, *extra):
    return ["--model", str(model), "--dataset", str(text_file), "--nsamples", "48", "--seqlen", "128",
            "--out", str(out), *extra]


def kill_when(cmd, ready, cwd, timeout=120):
    """Start `comet-quant cmd`, SIGKILL it as soon as ready() is true; return whether it was."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "comet_quant.cli", *cmd], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    return False


def test_calibration_resume_after_kill(deep_model, text_file, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert CliRunner().invoke(main, ["calibrate", *args(deep_model, text_file, whole, "--hessians")]).exit_code == 0
    partial = tmp_path / ".cut.partial"
    killed = kill_when(["calibrate", *args(deep_model, text_file, cut, "--hessians")],
                       lambda: (partial / "layer_002.safetensors").is_file(), tmp_path)
    assert killed, "the run finished before it could be killed"
    assert not cut.exists() and (partial / "job.json").is_file()
    assert not (partial / "layer_007.safetensors").exists()
    r = CliRunner().invoke(main, ["calibrate", *args(deep_model, text_file, cut, "--hessians", "--resume")])
    assert r.exit_code == 0, r.output
    assert "Resuming" in r.output and not partial.exists()
    for i in range(8):
        a, b = load_file(whole / f"layer_{i:03d}.safetensors"), load_file(cut / f"layer_{i:03d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_resume_after_kill(deep_model, text_file, tmp_path):
    cal = tmp_path / "cal"
    assert CliRunner().invoke(main, ["calibrate", *args(deep_model, text_file, cal, "--hessians")]).exit_code == 0
    common = ["--model", str(deep_model), "--calib", str(cal), "--scheme", "w4ax-kv4"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert CliRunner().invoke(main, ["export", *common, "--out", str(whole)]).exit_code == 0
    partial = tmp_path / ".cut.partial"
    killed = kill_when(["export", *common, "--out", str(cut)],
                       lambda: len(list(partial.glob("model-*-of-*.safetensors"))) >= 4, tmp_path)
    assert killed, "the run finished before it could be killed"
    assert not cut.exists()
    r = CliRunner().invoke(main, ["export", *common, "--out", str(cut), "--resume"])
    assert r.exit_code == 0, r.output
    for f in sorted(whole.glob("model-*.safetensors")):
        a, b = load_file(f), load_file(cut / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = lambda d: json.loads((d / "model.safetensors.index.json").read_text())  # noqa: E731
    assert idx(whole) == idx(cut)


def test_resume_with_other_settings_is_refused(deep_model, text_file, tmp_path):
    partial = tmp_path / ".cut.partial"
    cut = tmp_path / "cut"
    killed = kill_when(["calibrate", *args(deep_model, text_file, cut)],
                       lambda: (partial / "layer_001.safetensors").is_file(), tmp_path)
    assert killed
    r = CliRunner().invoke(main, ["calibrate", *args(deep_model, text_file, cut, "--resume"), "--seed", "7"])
    assert r.exit_code == 2 and "used different settings" in r.output
    # Without --resume a fresh run replaces the stale partial directory.
    r = CliRunner().invoke(main, ["calibrate", *args(deep_model, text_file, cut), "--seed", "7"])
    assert r.exit_code == 0 and not partial.exists() and (cut / "manifest.json").is_file()


def test_two_workers_match_one(deep_model, text_file, tmp_path):
    """Data-parallel calibration (2 gloo ranks on the CPU) gives the single-process statistics."""
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["calibrate", "--model", str(deep_model), "--dataset", str(text_file), "--nsamples", "8",
            "--seqlen", "64", "--hessians", "--device", "cpu"]
    assert CliRunner().invoke(main, [*base, "--out", str(one), "--workers", "1"]).exit_code == 0
    r = CliRunner().invoke(main, [*base, "--out", str(two), "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads((two / "manifest.json").read_text())["workers"] == 2
    for i in range(8):
        a, b = load_file(one / f"layer_{i:03d}.safetensors"), load_file(two / f"layer_{i:03d}.safetensors")
        for k in a:
            if k.endswith("absmax"):
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_dead_worker_is_a_one_line_error(deep_model, text_file, tmp_path, monkeypatch):
    """A worker killed by a signal ends the run with a clean error and keeps the partial directory."""
    import torch.multiprocessing as mp

    def killed(*a, **k):
        raise mp.ProcessExitedException("process 1 terminated with signal SIGABRT", error_index=1,
                                         error_pid=4242, exit_code=-6, signal_name="SIGABRT")

    monkeypatch.setattr(mp, "spawn", killed)
    out = tmp_path / "two"
    r = CliRunner().invoke(main, ["calibrate", "--model", str(deep_model), "--dataset", str(text_file),
                                  "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--workers", "2",
                                  "--out", str(out)])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "calibration worker 1 died" in r.output and "SIGABRT" in r.output and "--resume" in r.output
    assert "Traceback" not in r.output and not out.exists()
    assert (tmp_path / ".two.partial").is_dir()
