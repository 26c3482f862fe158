"""End-to-end serving benchmark: prefill and decode throughput and memory, quantized vs FP16.

Both models run the same loop in the same process: one prefill forward of ``batch x
prompt_len`` random token ids (a fresh cache), then ``gen_len`` single-token decode forwards
(greedy next token fed back). The quantized model uses the W4Ax kernels and its 4-bit KV
cache (:mod:`comet_quant.kvcache`); the FP16 model uses transformers' default attention (SDPA).
Times are medians over ``repeats`` runs after a warm-up; memory is the CUDA allocator's peak.

Decode runs one of two ways, the same for both models:

- ``graphs=True`` (default on CUDA): one decode step (forward, greedy argmax fed back into the
  input buffer, positions advanced) is captured into a CUDA graph after two warm-up steps and
  replayed ``gen_len`` times. The caches are static: the quantized model's :class:`Kv4Cache`
  preallocated and switched to device-side positions, the FP16 model's transformers
  ``StaticCache``. This is how a serving engine runs decode; it measures the GPU, not Python.
- ``graphs=False``: eager forwards with growing caches (``Kv4Cache`` / ``DynamicCache``).

Prefill is eager in both modes.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

from .errors import CometError
from .kvcache import Kv4Cache, cache_keyword, new_cache


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kv_bytes(cache, tokens: int) -> int:
    """Bytes the cache needs for ``tokens`` tokens: bytes per token (allocated bytes over the
    allocated length, dim 2 of every K/V tensor) times ``tokens``, so growing, preallocated and
    static caches compare on what they hold, not on how much they reserved."""
    tensors = []
    for layer in cache.layers:
        if getattr(layer, "k", None) is not None:  # Kv4Layer: (codes, scale, zero) for K and V
            tensors += [*layer.k, *layer.v]
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 3:
                tensors.append(t)
    return int(sum(t.numel() * t.element_size() / t.shape[2] for t in tensors if t.shape[2]) * tokens)


GRAPH_WARMUP_STEPS = 2


def _decode_graph(model, cache, nxt: torch.Tensor, position: int):
    """Capture one greedy decode step of ``model`` into a CUDA graph (see module doc)."""
    ids = nxt.clone()
    positions = torch.full_like(ids, position)
    device_positions = isinstance(cache, Kv4Cache)
    if device_positions:
        cache.use_device_positions()

    def step():
        out = model(ids, position_ids=positions, **{cache_keyword(): cache}, use_cache=True, logits_to_keep=1)
        ids.copy_(out.logits[:, -1:].argmax(-1))
        positions.add_(1)
        if device_positions:
            cache.advance()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # real decode steps: allocator pools and lazy state settle
        for _ in range(GRAPH_WARMUP_STEPS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as exc:
        raise CometError(f"CUDA-graph capture of the decode step failed ({str(exc).splitlines()[0][:160]}); "
                         "rerun with --eager") from None
    return graph


@torch.no_grad()
def run_model(model, make_cache, batch: int, prompt_len: int, gen_len: int, device: str,
              repeats: int = 3, seed: int = 0, graphs: bool = False) -> dict:
    """Prefill + decode timings of ``model`` for one batch size."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    pre, dec, kv = [], [], 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    capacity = prompt_len + gen_len + (GRAPH_WARMUP_STEPS + 1 if graphs else 0)
    for rep in range(repeats + 1):  # the first run warms up (kernel build, allocator)
        cache = make_cache(capacity)
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, **{cache_keyword(): cache}, use_cache=True, logits_to_keep=1)
        _sync(device)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        graph = _decode_graph(model, cache, nxt, prompt_len) if graphs else None
        _sync(device)
        t2 = time.perf_counter()
        for _ in range(gen_len):
            if graph is not None:
                graph.replay()
            else:
                nxt = model(nxt, **{cache_keyword(): cache}, use_cache=True,
                            logits_to_keep=1).logits[:, -1:].argmax(-1)
        _sync(device)
        t3 = time.perf_counter()
        if rep:
            pre.append(t1 - t0)
            dec.append((t3 - t2) / max(gen_len, 1))
        kv = _kv_bytes(cache, prompt_len + gen_len)
        del graph, cache
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    p, d = statistics.median(pre), statistics.median(dec)
    return {"batch": batch, "prefill_s": p, "prefill_tok_s": batch * prompt_len / p,
            "decode_step_s": d, "decode_tok_s": batch / d, "kv_cache_bytes": kv,
            "peak_mem_bytes": peak}


def benchmark(checkpoint: str, batches: list[int], prompt_len: int, gen_len: int, device: str,
              reference: str | None = None, repeats: int = 3, skip_reference: bool = False,
              output: str | Path | None = None, graphs: bool | None = None) -> dict:
    """Benchmark a checkpoint (kernels + 4-bit KV cache) against its FP16 source model."""
    from .checkpoint import open_checkpoint
    from .evaluate import _reference_ref
    from .models import load_model, resolve_model
    from .qmodules import load_quantized

    if not batches or min(batches) < 1 or prompt_len < 1 or gen_len < 1:
        raise CometError("--batch values, --prompt-len and --gen-len must be positive")
    ckpt = open_checkpoint(checkpoint)
    ref = resolve_model(reference) if reference else _reference_ref(ckpt)
    if ref is None and not skip_reference:
        raise CometError(f"the source model of {checkpoint} is not available here; pass "
                         "--reference MODEL or --no-reference")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if graphs is None:
        graphs = device.startswith("cuda")
    if graphs and not device.startswith("cuda"):
        raise CometError("CUDA-graph decode needs a GPU; use --eager on the CPU")
    result = {"checkpoint": str(checkpoint), "scheme": ckpt.scheme.name, "device": device,
              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats,
              "decode_mode": "cuda-graph" if graphs else "eager", "runs": {}}

    def bench_one(label, model, make_cache):
        rows = []
        for b in batches:
            rows.append(run_model(model, make_cache, b, prompt_len, gen_len, device, repeats, graphs=graphs))
            print(f"{label} batch {b}: prefill {rows[-1]['prefill_tok_s']:.0f} tok/s, decode "
                  f"{rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
        return rows

    model, _ = load_quantized(checkpoint, device=device, dtype=dtype)
    kv4 = ckpt.scheme.kv_bits == 4
    weights = sum(b.numel() * b.element_size() for b in model.buffers()) + \
        sum(p.numel() * p.element_size() for p in model.parameters())
    result["runs"]["quantized"] = {"weights_bytes": weights,
                                   "kv_cache": "4-bit" if kv4 else ("static" if graphs else "dynamic"),
                                   "rows": bench_one("quantized", model, _cache_factory(model, kv4, graphs))}
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not skip_reference:
        fp, _ = load_model(ref, dtype=dtype, device=device)
        weights = sum(p.numel() * p.element_size() for p in fp.parameters())
        result["runs"]["fp16"] = {"weights_bytes": weights, "kv_cache": "static" if graphs else "dynamic",
                                  "rows": bench_one("fp16", fp, _cache_factory(fp, False, graphs))}
        del fp
        gc.collect()
    print(format_table(result))
    if output:
        Path(output).write_text(json.dumps(result, indent=2))
        print(f"Benchmark written to {output}")
    return result


def _cache_factory(model, kv4: bool, graphs: bool):
    """A function of the capacity returning a fresh cache: 4-bit, static (graphs) or dynamic."""
    from transformers import DynamicCache, StaticCache

    if kv4:
        return lambda n: new_cache(model, n)
    if graphs:
        return lambda n: StaticCache(config=model.config, max_cache_len=n)

    def dynamic(_n):
        try:
            return DynamicCache(config=model.config)
        except TypeError:  # older transformers
            return DynamicCache()
    return dynamic


def format_table(result: dict) -> str:
    q = {r["batch"]: r for r in result["runs"]["quantized"]["rows"]}
    f = {r["batch"]: r for r in result["runs"].get("fp16", {}).get("rows", [])}
    lines = [f"{result['gpu']}, prompt {result['prompt_len']}, {result['gen_len']} generated tokens, "
             f"median of {result['repeats']}, decode {result.get('decode_mode', 'eager')}",
             "| batch | prefill tok/s (quant / fp16 / x) | decode tok/s (quant / fp16 / x) | "
             "KV cache MiB (quant / fp16 / x) | peak GiB (quant / fp16) |",
             "|---|---|---|---|---|"]
    for b, r in q.items():
        fr = f.get(b)

        def trio(key, scale=1.0, fmt="{:.0f}"):
            a = fmt.format(r[key] * scale)
            if fr is None:
                return a
            return f"{a} / {fmt.format(fr[key] * scale)} / {r[key] / fr[key]:.2f}x"
        peak = f"{r['peak_mem_bytes'] / 2**30:.1f}" + (f" / {fr['peak_mem_bytes'] / 2**30:.1f}" if fr else "")
        lines.append(f"| {b} | {trio('prefill_tok_s')} | {trio('decode_tok_s', fmt='{:.1f}')} | "
                     f"{trio('kv_cache_bytes', 2**-20, '{:.1f}')} | {peak} |")
    return "\n".join(lines)
