"""End-to-end serving benchmark at LLaMA-3-8B shape: random model -> export -> bench -> profile.

Builds a random-weight LLaMA-3-8B-shaped model (hidden 4096, 32 layers, GQA 32/8, never
zeros; see scripts/memory_profile.py), exports it through the normal path (calibration on the
bundled text, FMPQ plan, RTN int4 weights, KV4), runs ``comet-quant bench`` against the FP16
model in the same process, and profiles one decode step and one prefill of each model
(torch.profiler, CUDA time per kernel). Everything lands in ``--out``.

    python scripts/serving_bench.py --work /tmp/l8 --out bench_out [--batch 1,16,64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from comet_quant.bench import benchmark  # noqa: E402
from comet_quant.calibrate import CalibrationConfig  # noqa: E402
from comet_quant.export import export  # noqa: E402
from comet_quant.scheme import get_scheme  # noqa: E402


def _profiled(forward, title: str, path: Path, rows: int = 25) -> str:
    """Runs ``forward()`` once under torch.profiler; writes and returns the per-op table."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    text = f"# {title}: wall {wall * 1e3:.2f} ms (profiled)\n{table}\n"
    path.write_text(text)
    return text


@torch.no_grad()
def profile_decode(model, make_cache, batch: int, prompt_len: int, label: str, out: Path) -> str:
    """CUDA time per kernel of one decode step after a ``prompt_len`` prefill."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    cache = make_cache(prompt_len + 8)
    logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    nxt = logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up steps
        nxt = model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    return _profiled(lambda: model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1),
                     f"{label}: one decode step, batch {batch}, context {prompt_len}",
                     out / f"decode_profile_{label}.txt")


@torch.no_grad()
def profile_prefill(model, make_cache, batch: int, prompt_len: int, label: str, out: Path) -> str:
    """CUDA and CPU time per op of one ``batch x prompt_len`` prefill (after a warm-up one)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    model(ids, past_key_values=make_cache(prompt_len + 8), use_cache=True, logits_to_keep=1)
    cache = make_cache(prompt_len + 8)
    return _profiled(lambda: model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1),
                     f"{label}: one prefill, batch {batch}, {prompt_len} tokens",
                     out / f"prefill_profile_{label}.txt", rows=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/comet-llama8b")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--scheme", default="w4ax-kv4-rtn")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-batch", type=int, default=16)
    ap.add_argument("--profile-prefill-batch", type=int, default=1)
    ap.add_argument("--modes", default="graphs",
                    help="decode modes to benchmark, comma-separated: graphs (CUDA graph, static "
                         "caches), eager (growing caches)")
    ap.add_argument("--clip", action="store_true",
                    help="use the weight clipping search (slow on the CPU at 8B; speed does not "
                         "depend on weight values, so the benchmark skips it by default)")
    ap.add_argument("--int-group-scales", action="store_true",
                    help="the scheme with integer group scales (the wgmma GEMM's integer loop at prefill)")
    ap.add_argument("--a8-span-scales", action="store_true",
                    help="with --int-group-scales: one activation scale per span for the 8-bit groups "
                         "(the integer loop sums them in int32 too)")
    args = ap.parse_args()
    if args.a8_span_scales and not args.int_group_scales:
        ap.error("--a8-span-scales needs --int-group-scales")
    from memory_profile import build

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t = time.time()
    build(work / "model", args.layers)
    times["build_model_s"] = round(time.time() - t, 1)
    t = time.time()
    suffix = ("-int" if args.int_group_scales else "") + ("-a8span" if args.a8_span_scales else "")
    ck = work / f"ck-{args.scheme}{suffix}"
    if not (ck / "comet_manifest.json").is_file():
        scheme = get_scheme(args.scheme, w_clip=args.clip, int_group_scales=args.int_group_scales or None,
                            a8_span_scales=args.a8_span_scales or None)
        export(str(work / "model"), None, scheme, ck, overwrite=True,
               calib_config=CalibrationConfig(nsamples=8, seqlen=256, batch_size=8, device="cuda"))
    times["export_s"] = round(time.time() - t, 1)
    print(json.dumps(times), flush=True)
    batches = [int(b) for b in args.batch.split(",")]
    for mode in args.modes.split(","):
        res = benchmark(str(ck), batches, args.prompt_len, args.gen_len, "cuda", str(work / "model"),
                        args.repeats, graphs=mode == "graphs")
        res["times"] = times
        (out / f"bench-{mode}.json").write_text(json.dumps(res, indent=2))

    # Per-kernel view of one eager decode step (the same kernels a graph replays).
    from comet_quant.bench import _cache_factory
    from comet_quant.models import load_model, resolve_model
    from comet_quant.qmodules import load_quantized

    model, _ = load_quantized(ck, device="cuda")
    print(profile_decode(model, _cache_factory(model, True, False), args.profile_batch,
                         args.prompt_len, "quantized", out)[:4000])
    print(profile_prefill(model, _cache_factory(model, True, False), args.profile_prefill_batch,
                          args.prompt_len, "quantized", out)[:4000])
    del model
    torch.cuda.empty_cache()
    fp, _ = load_model(resolve_model(str(work / "model")), dtype=torch.float16, device="cuda")
    print(profile_decode(fp, _cache_factory(fp, False, False), args.profile_batch,
                         args.prompt_len, "fp16", out)[:4000])
    print(profile_prefill(fp, _cache_factory(fp, False, False), args.profile_prefill_batch,
                          args.prompt_len, "fp16", out)[:4000])


if __name__ == "__main__":
    main()
