import json

import pytest
import torch

from comet_quant import data
from comet_quant.errors import CometError


def test_local_text_formats_agree(tmp_path):
    docs = ["First document about rivers.", "Second one, about bread and ovens."]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    texts = {ext: data.load_text(str(tmp_path / f"a.{ext}")) for ext in ("txt", "jsonl", "parquet")}
    assert len({t.text for t in texts.values()}) == 1
    spec = texts["jsonl"].spec
    assert spec["path"].endswith("a.jsonl") and len(spec["sha256"]) == 64 and spec["chars"] > 0


def test_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(CometError, match="empty"):
        data.load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CometError, match=r"bad.jsonl:2 has no string 'text'"):
        data.load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CometError, match="unsupported dataset file type"):
        data.load_text(str(tmp_path / "x.csv"))
    with pytest.raises(CometError, match="neither a file nor one of"):
        data.load_text("no-such-dataset")


def test_hub_dataset_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CometError, match="pass --dataset with a local"):
        data.load_text("wikitext2", "evaluation")


def test_bundled_calibration_text_is_large_enough():
    src = data.load_text("calib")
    held = data.load_text("calib-heldout")
    assert src.spec["files"] and held.spec["files"]
    assert not set(src.spec["files"]) & set(held.spec["files"])
    # 128 windows of 512 tokens need >= 65,536 tokens; ~4 characters per token in English.
    assert len(src.text) > 4 * 128 * 512


def test_eval_falls_back_to_heldout_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    src = data.load_eval_text(None)
    assert src.spec["name"] == "calib-heldout" and src.spec["fallback_from"] == "wikitext2"
    assert "held-out" in capsys.readouterr().err


def test_windows():
    ids = torch.arange(1000)
    a = data.calibration_windows(ids, 8, 64, seed=3)
    b = data.calibration_windows(ids, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))
    assert not torch.equal(a, data.calibration_windows(ids, 8, 64, seed=4))
    w = data.eval_windows(ids, 300)
    assert w.shape == (3, 300) and torch.equal(w.flatten(), ids[:900])
    assert data.eval_windows(ids, 300, max_windows=2).shape == (2, 300)
    with pytest.raises(CometError, match="fewer than --seqlen"):
        data.calibration_windows(ids[:10], 1, 64, 0)
    with pytest.raises(CometError, match="fewer than one window"):
        data.eval_windows(ids[:10], 64)
