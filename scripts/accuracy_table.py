"""Perplexity of every scheme on one model, in one harness, written as a markdown table.

Calibrates once (with GPTQ Hessians) on text disjoint from the evaluation split, exports each
scheme from that calibration, and evaluates the FP model and every checkpoint (simulated
quantization) on the same windows.

    python scripts/accuracy_table.py --calib-data ../shared/data/wikitext2-valid.raw \
        --eval-data ../shared/data/wikitext2-test.raw --out docs/RESULTS.md [--max-windows N]

``--schemes`` takes preset names, each optionally with field overrides after colons, e.g.
``w4a16:w_clip=true:gptq_act_order=true`` (values are JSON).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comet_quant import data  # noqa: E402
from comet_quant.calibrate import (DEFAULT_MASSIVE_RATIO, CalibrationConfig, calibrate,  # noqa: E402
                                   resolve_device)
from comet_quant.checkpoint import open_checkpoint  # noqa: E402
from comet_quant.evaluate import perplexity  # noqa: E402
from comet_quant.export import export  # noqa: E402
from comet_quant.lazy import LayerwiseModel  # noqa: E402
from comet_quant.models import load_model, resolve_model  # noqa: E402
from comet_quant.qmodules import build_quantized_model  # noqa: E402
from comet_quant.scheme import get_scheme  # noqa: E402

def parse_scheme(arg: str):
    """``preset[:field=json]...`` -> a QuantScheme named ``arg``."""
    name, *fields = arg.split(":")
    changes = {}
    for f in fields:
        key, _, value = f.partition("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    scheme = get_scheme(name, **changes)
    return scheme.replace(name=arg.replace(":", "+").replace("=", "-")) if changes else scheme


SCHEMES = ["w4a16", "w4a8-kv4", "w4a4-rtn", "atom-like", "quarot-like", "w4ax-kv4-5", "w4ax-kv4",
           "w4ax-kv4-25"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib-data", default="calib")
    ap.add_argument("--eval-data", default="wikitext2")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--massive-ratio", type=float, default=DEFAULT_MASSIVE_RATIO,
                    help="leave tokens above this x median squared norm out of the Hessians")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None, help="default: the whole split")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="comet_quant_out/accuracy")
    ap.add_argument("--out", default="docs/RESULTS.md")
    args = ap.parse_args()
    device = resolve_device(args.device)
    ref = resolve_model(args.model)
    work = Path(args.work)
    cal = work / "calib"
    if not (cal / "manifest.json").is_file():
        calibrate(ref, cal, CalibrationConfig(dataset=args.calib_data, nsamples=args.nsamples,
                                              seqlen=args.calib_seqlen, hessians=True, device=device,
                                              massive_ratio=args.massive_ratio),
                  overwrite=True)
    tok = LayerwiseModel(ref).tokenizer
    src = data.load_text(args.eval_data, "evaluation")
    windows = data.eval_windows(data.tokenize(tok, src.text), args.seqlen, args.max_windows)
    rows = []
    t0 = time.time()
    fp_model, _ = load_model(ref, device=device)
    fp = perplexity(fp_model, windows, device, "fp")["ppl"]
    del fp_model
    rows.append(("fp16 (reference)", fp, 0.0, 16.0))
    for name in args.schemes.split(","):
        scheme = parse_scheme(name)
        name = scheme.name
        ck = export(ref, cal, scheme, work / name, overwrite=True)
        c = open_checkpoint(ck)
        model = build_quantized_model(c, device)
        ppl = perplexity(model, windows, device, name)["ppl"]
        del model
        summ = c.qconfig["summary"]
        rows.append((name, ppl, summ["fraction_8bit_groups"], summ["effective_activation_bits"]))
        print(f"{name}: {ppl:.3f} ({ppl / fp:.3f}x fp)", flush=True)
    cmd = "python scripts/accuracy_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# Accuracy: {ref.name}",
        "",
        f"Perplexity on `{src.spec.get('name')}` ({windows.shape[0]} windows of {args.seqlen} tokens"
        f"{', the whole split' if args.max_windows is None else ''}), calibrated on "
        f"`{args.calib_data}` ({args.nsamples} x {args.calib_seqlen} tokens, GPTQ Hessians), "
        f"simulated quantization on {device}; {time.time() - t0:.0f} s.",
        "",
        f"Command: `{cmd}`",
        "",
        "| scheme | perplexity | x fp16 | 8-bit groups | effective activation bits |",
        "|---|---|---|---|---|",
    ]
    for name, ppl, frac, bits in rows:
        lines.append(f"| {name} | {ppl:.3f} | {ppl / fp:.3f} | {frac:.1%} | {bits} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
