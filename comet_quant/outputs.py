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


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``out`` only on success.

    On any exception (Ctrl-C included) the temporary directory is removed, so an interrupted
    run never leaves a directory under the final name. A killed process can leave only a
    hidden ``.NAME.tmp-PID`` sibling, never a complete-looking output.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
