"""Perplexity: the standard protocol, for an FP model and a quantized checkpoint side by side.

Protocol: the whole split joined into one text, tokenized once, cut into non-overlapping
windows of ``seqlen`` tokens; perplexity = exp(mean next-token NLL over all windows).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from .calibrate import resolve_device
from .checkpoint import is_quantized_checkpoint, open_checkpoint
from .errors import CometError
from .models import ModelRef, load_model, resolve_model
from .outputs import versions, write_json
from .qmodules import build_quantized_model

DEFAULT_EVAL_SEQLEN = 2048


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str, desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` over ``windows`` (int64 [W, T]): {'ppl', 'nll', 'tokens'}."""
    total_nll, total_tok = 0.0, 0
    for w in tqdm(windows, desc=desc, unit="window"):
        ids = w[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tok += ids.shape[1] - 1
    mean = total_nll / total_tok
    if not math.isfinite(mean):
        raise CometError("the model produced non-finite losses; the checkpoint or model is broken")
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tok}


def _reference_ref(ckpt) -> ModelRef | None:
    src = ckpt.qconfig.get("source_model") or {}
    try:
        ref = ModelRef(**src)
        if ref.hub_id is None and not Path(ref.path).exists():
            return None
        return ref
    except (TypeError, CometError):
        return None


def eval_perplexity(target: str | None = None, dataset: str | None = None,
                    seqlen: int = DEFAULT_EVAL_SEQLEN, max_windows: int | None = None,
                    device: str = "auto", reference: str | None = None,
                    output: str | Path | None = None, skip_reference: bool = False,
                    backend: str = "simulated") -> dict:
    """Evaluate a model, or a quantized checkpoint next to its FP reference; writes JSON.

    ``target``: a model (as for ``--model``) or a checkpoint directory; None picks the default
    export if it exists, else the default model. ``reference`` overrides the FP model that a
    checkpoint names as its source.
    """
    from .export import default_export_dir
    from .scheme import DEFAULT_PRESET, get_scheme

    device = resolve_device(device)
    if target is None:
        default_ckpt = default_export_dir(resolve_model(None), get_scheme(DEFAULT_PRESET))
        target = str(default_ckpt) if is_quantized_checkpoint(default_ckpt) else None
        print(f"Evaluating {target or 'the default model'}")
    ckpt = open_checkpoint(target) if target and is_quantized_checkpoint(target) else None
    if ckpt is None:
        ref = resolve_model(target)
    elif reference is not None:
        ref = resolve_model(reference)
    else:
        ref = None if skip_reference else _reference_ref(ckpt)
        if ref is None and not skip_reference:
            print("note: the checkpoint's source model is not available here; pass --reference "
                  "MODEL to report the FP model beside it")
    if seqlen < 2:
        raise CometError("--seqlen must be at least 2")
    src = data_mod.load_eval_text(dataset)
    results: dict = {"dataset": src.spec, "seqlen": seqlen, "max_windows": max_windows,
                     "device": device, "versions": versions(), "results": {}}
    t0 = time.time()
    tokenizer = None
    windows = None
    if ref is not None and not skip_reference:
        model, tokenizer = load_model(ref, device=device)
        windows = _windows(tokenizer, src, seqlen, max_windows)
        results["results"]["fp"] = {"model": ref.name, **perplexity(model, windows, device, "fp")}
        del model
    if ckpt is not None:
        from transformers import AutoTokenizer

        qtok = AutoTokenizer.from_pretrained(str(ckpt.path))
        if windows is None:
            windows = _windows(qtok, src, seqlen, max_windows)
        dtype = torch.float16 if backend == "kernels" else torch.float32
        model = build_quantized_model(ckpt, device, dtype, backend)
        results["results"]["quantized"] = {
            "checkpoint": str(ckpt.path), "scheme": ckpt.scheme.name, "backend": backend,
            "summary": ckpt.qconfig.get("summary", {}),
            **perplexity(model, windows, device, ckpt.scheme.name)}
    results["windows"] = int(windows.shape[0])
    results["seconds"] = round(time.time() - t0, 1)
    fp, q = results["results"].get("fp"), results["results"].get("quantized")
    if fp and q:
        results["ratio"] = q["ppl"] / fp["ppl"]
    out = Path(output) if output else _default_result_path(target, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    write_json(tmp, results)
    tmp.replace(out)
    print(format_results(results))
    print(f"Results written to {out}")
    return results


def _windows(tokenizer, src, seqlen, max_windows):
    return data_mod.eval_windows(data_mod.tokenize(tokenizer, src.text), seqlen, max_windows)


def _default_result_path(target, ckpt) -> Path:
    if ckpt is not None:
        return ckpt.path.parent / f"{ckpt.path.name}-perplexity.json"
    name = Path(target).name if target else "default-model"
    return Path("comet_quant_out") / f"{name}-perplexity.json"


def format_results(results: dict) -> str:
    ds = results["dataset"].get("name")
    lines = [f"Perplexity on {ds} (seqlen {results['seqlen']}, {results['windows']} windows)",
             f"{'model':<40} {'perplexity':>12}"]
    for key, r in results["results"].items():
        label = r.get("model") if key == "fp" else f"{r['scheme']} ({r['backend']})"
        lines.append(f"{label:<40} {r['ppl']:>12.3f}")
    if "ratio" in results:
        lines.append(f"{'quantized / fp':<40} {results['ratio']:>12.4f}")
    return "\n".join(lines)
