"""Text sources for calibration and evaluation, and how they become token windows.

``--dataset`` is a registered name (``calib``, ``calib-heldout``, ``wikitext2``, ``c4``,
``pile``) or a local file (``.txt``/``.raw``, ``.jsonl`` with a ``text`` field, ``.parquet``
with a ``text`` column). Every loader returns the text plus a spec that records exactly what
was read; outputs store the spec.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from .errors import CometError

DOC_SEPARATOR = "\n\n"
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class TextSource:
    """Loaded text and a JSON-able record of where it came from."""

    text: str
    spec: dict = field(default_factory=dict)


Loader = Callable[[str], TextSource]
DATASETS: dict[str, Loader] = {}
#: Which split each registered dataset reads for calibration and for evaluation.
DEFAULT_SPLITS = {"calibration": "train", "evaluation": "test"}


def register_dataset(name: str):
    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn
    return deco


def _source(text: str, **spec) -> TextSource:
    if not text.strip():
        raise CometError(f"dataset {spec.get('name')} is empty; pass a file or dataset with text")
    spec["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    spec["chars"] = len(text)
    return TextSource(text=text, spec=spec)


# ---------------------------------------------------------------------------------------------
# Bundled text (written by the comet-quant authors, shipped as the comet_quant.calib package)
# ---------------------------------------------------------------------------------------------

def _bundled(kind: str) -> list[tuple[str, str]]:
    try:
        root = resources.files("comet_quant.calib")
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH: the text lives in ./calib
        root = Path(__file__).resolve().parent.parent / "calib"
    files = sorted((p for p in root.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    chosen = [p for p in files if p.name.startswith("heldout") == (kind == "heldout")]
    return [(p.name, p.read_text(encoding="utf-8")) for p in chosen]


@register_dataset("calib")
def _calib(split: str) -> TextSource:
    docs = _bundled("calibration")
    return _source(DOC_SEPARATOR.join(t for _, t in docs), name="calib", split="all",
                   files=[n for n, _ in docs])


@register_dataset("calib-heldout")
def _calib_heldout(split: str) -> TextSource:
    docs = _bundled("heldout")
    return _source(DOC_SEPARATOR.join(t for _, t in docs), name="calib-heldout", split="all",
                   files=[n for n, _ in docs])


# ---------------------------------------------------------------------------------------------
# Hub datasets through `datasets` (real names, splits and files)
# ---------------------------------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub resolves; offline machines fail fast instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(HUB_HOST, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _load_hub(name: str, path: str, split: str, *, config: str | None = None,
              data_files: dict | None = None) -> TextSource:
    import datasets

    try:
        if not hub_reachable():
            datasets.config.HF_HUB_OFFLINE = True  # read the local datasets cache only
        ds = datasets.load_dataset(path, config, data_files=data_files, split=split)
    except Exception as exc:
        raise CometError(
            f"could not load dataset '{name}' ({path}, split {split}) from the Hugging Face hub "
            f"or its cache: {str(exc).strip().splitlines()[0][:200]}; pass --dataset with a "
            "local .txt/.raw/.jsonl/.parquet file instead") from None
    text = DOC_SEPARATOR.join(t for t in ds["text"] if t is not None)
    return _source(text, name=name, hub=path, config=config, split=split, data_files=data_files)


@register_dataset("wikitext2")
def _wikitext2(split: str) -> TextSource:
    return _load_hub("wikitext2", "wikitext", split, config="wikitext-2-raw-v1")


_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
             "validation": "en/c4-validation.00000-of-00008.json.gz"}


@register_dataset("c4")
def _c4(split: str) -> TextSource:
    split = "validation" if split == "test" else split
    if split not in _C4_FILES:
        raise CometError(f"c4 has splits {sorted(_C4_FILES)}, not '{split}'")
    return _load_hub("c4", "allenai/c4", split, data_files={split: _C4_FILES[split]})


@register_dataset("pile")
def _pile(split: str) -> TextSource:
    # The Pile's validation set as mirrored for calibration (it has only this split).
    return _load_hub("pile", "mit-han-lab/pile-val-backup", "validation")


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> str:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CometError(f"{path}:{lineno} is not valid JSON; each line of a .jsonl "
                                 "file must be an object with a 'text' field") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CometError(f"{path}:{lineno} has no string 'text' field")
            docs.append(row["text"])
    return DOC_SEPARATOR.join(docs)


def _read_parquet(path: Path) -> str:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise CometError(f"could not read parquet file {path}: {exc}") from None
    if "text" not in table.column_names:
        raise CometError(f"{path} has no 'text' column (columns: {table.column_names})")
    return DOC_SEPARATOR.join(t for t in table.column("text").to_pylist() if t)


LOCAL_READERS: dict[str, Callable[[Path], str]] = {
    ".txt": lambda p: p.read_text(encoding="utf-8"),
    ".raw": lambda p: p.read_text(encoding="utf-8"),
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def load_text(dataset: str, purpose: str = "calibration") -> TextSource:
    """Load the text named by ``--dataset`` for ``purpose`` ('calibration' or 'evaluation')."""
    if dataset in DATASETS:
        return DATASETS[dataset](DEFAULT_SPLITS[purpose])
    path = Path(dataset).expanduser()
    if not path.exists():
        raise CometError(f"dataset '{dataset}' is neither a file nor one of: "
                         f"{', '.join(DATASETS)}")
    reader = LOCAL_READERS.get(path.suffix.lower())
    if reader is None:
        raise CometError(f"unsupported dataset file type '{path.suffix}' for {path}; use one "
                         f"of {', '.join(LOCAL_READERS)}")
    return _source(reader(path), name=path.name, path=str(path.resolve()), split="file")


def load_eval_text(dataset: str | None) -> TextSource:
    """Evaluation text: ``dataset``, or WikiText-2 test when reachable, else the held-out text.

    With no ``--dataset`` the standard WikiText-2 test split is used where the hub or its cache
    has it; on an offline machine the bundled held-out text is used and a note says so.
    """
    if dataset is not None:
        return load_text(dataset, "evaluation")
    try:
        return load_text("wikitext2", "evaluation")
    except CometError as exc:
        print(f"note: {exc}\nnote: evaluating on the bundled held-out text ('calib-heldout') "
              "instead; numbers are not comparable with published WikiText-2 perplexities",
              file=sys.stderr)
        src = load_text("calib-heldout", "evaluation")
        return TextSource(src.text, {**src.spec, "fallback_from": "wikitext2"})


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token sequence: int64 [T] (no special tokens added)."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = sys.maxsize  # one long text, windowed later; silence the warning
    try:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    finally:
        tokenizer.model_max_length = saved
    return ids


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens: int64 [nsamples, seqlen].

    Windows start at seeded random offsets (the GPTQ protocol); with fewer than
    ``nsamples * seqlen`` tokens they overlap, which is allowed but reported by the caller.
    """
    if nsamples < 1 or seqlen < 1:
        raise CometError("--nsamples and --seqlen must be positive")
    if ids.numel() < seqlen + 1:
        raise CometError(f"the dataset has only {ids.numel()} tokens, fewer than --seqlen "
                         f"{seqlen}; use more text or a smaller --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` over the joined text: int64 [W, seqlen]."""
    n = ids.numel() // seqlen
    if n == 0:
        raise CometError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of --seqlen {seqlen}; use a smaller --seqlen or more text")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)
