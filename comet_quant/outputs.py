"""Outputs that appear whole or not at all."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CometError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; call before any long work."""
    if out.exists() and not out.is_dir():
        raise CometError(f"output path {out} exists and is not a directory; choose another --out")
    if out.exists() and not overwrite:
        raise CometError(f"output directory {out} already exists; pass --overwrite to replace it "
                         "or choose another --out")


JOB_FILE = "job.json"  # marks a partial directory; removed when the run completes


def partial_dir(out: Path) -> Path:
    """Where an unfinished run of ``out`` keeps its progress (hidden, never a final name)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextmanager
def output_dir(out: Path, overwrite: bool, resume: bool = False, job: dict | None = None) -> Iterator[Path]:
    """Yield the hidden partial directory of ``out``; rename it to ``out`` only on success.

    An interrupted or killed run leaves its progress in ``.NAME.partial`` (never under the
    final name); ``resume`` continues it if ``job`` (the run's settings) is the same, else a
    fresh run replaces it. Per-item files inside must themselves be written atomically.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    part = partial_dir(out)
    job = job or {}
    if resume and part.is_dir():
        saved = read_json(part / JOB_FILE, f"the interrupted run in {part}")
        if saved != json.loads(json.dumps(job)):
            raise CometError(f"the interrupted run in {part} used different settings; repeat its "
                             "exact options with --resume, or run without --resume to start over")
        print(f"Resuming from {part}")
    else:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        write_json(part / JOB_FILE, job)
    try:
        yield part
    except KeyboardInterrupt:
        print(f"interrupted: progress kept in {part}; rerun the same command with --resume")
        raise
    (part / JOB_FILE).unlink()
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(part, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, out)


def replace_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (no half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CometError(f"{path} is missing: {what} is incomplete or not a comet-quant output")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CometError(f"{path} is corrupt ({exc.__class__.__name__}: {exc}); re-create {what}") from None
    if not isinstance(data, dict):
        raise CometError(f"{path} is not a JSON object; re-create {what}")
    return data


def versions() -> dict:
    import torch
    import transformers

    from . import __version__
    return {"comet_quant": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}
