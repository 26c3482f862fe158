"""Peak memory of calibrate + export as a function of model depth (bounded-memory check).

Builds random LLaMA-3-8B-shaped models (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocabulary 128256, untied head) with 2, 4 and 8 decoder layers on disk, shard by shard, then
runs calibrate + export (RTN weights, a few samples) for each in a fresh process and reports
its peak RSS. Memory must stay flat in the number of layers (within 15%) and under 4 GB.

    python scripts/memory_profile.py --work /tmp/memprof [--layers 2,4,8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
             tie_word_embeddings=False)
LIMIT_GB, FLATNESS = 4.0, 0.15


def build(folder: Path, layers: int, seed: int = 0) -> None:
    """Write a random model (never zeros) shard by shard: bounded memory for the writer too."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer  # the tests' tiny BPE tokenizer

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    gen = torch.Generator().manual_seed(seed)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.float16)

    weight_map, total = {}, layers + 2

    def shard(k, tensors):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(1, {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.float16)})
    shard(2, {"lm_head.weight": rnd(cfg.vocab_size, h)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        norm = torch.ones(h, dtype=torch.float16)
        shard(layer + 3, {
            p + "input_layernorm.weight": norm, p + "post_attention_layernorm.weight": norm.clone(),
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    make_tokenizer((ROOT / "calib" / "01_rivers_and_bridges.txt").read_text()).save_pretrained(folder)


RUN = """
import sys
from comet_quant.calibrate import CalibrationConfig
from comet_quant.export import export
from comet_quant.scheme import get_scheme
model, out = sys.argv[1], sys.argv[2]
export(model, None, get_scheme("w4ax-kv4-rtn"), out, overwrite=True,
       calib_config=CalibrationConfig(nsamples=4, seqlen=128, batch_size=4, device="cpu"))
"""


def profile(model: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of calibrate + export in a fresh process."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(model), str(out)], cwd=str(model.parent),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the max over children
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"export of {model} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 2**20, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/comet-memprof")
    ap.add_argument("--layers", default="2,4,8")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for n in map(int, args.layers.split(",")):
        model = work / f"llama3-8b-shape-{n}l"
        build(model, n)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
        peak, secs = profile(model, work / f"out-{n}l")
        rows.append({"layers": n, "disk_gb": round(size, 2), "peak_rss_gb": round(peak, 2), "seconds": round(secs)})
        print(f"{n} layers: {size:.2f} GB on disk, peak RSS {peak:.2f} GB, {secs:.0f} s", flush=True)
    peaks = [r["peak_rss_gb"] for r in rows]
    flat = (max(peaks) - min(peaks)) / min(peaks)
    print("\n| layers | weights on disk (GB) | peak RSS calibrate+export (GB) | time (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['disk_gb']} | {r['peak_rss_gb']} | {r['seconds']} |")
    ok = flat <= FLATNESS and max(peaks) < LIMIT_GB
    print(f"\nspread {flat:.1%} (limit {FLATNESS:.0%}), max {max(peaks):.2f} GB (limit {LIMIT_GB} GB): "
          f"{'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
