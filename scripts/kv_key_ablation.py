"""Ablation: how the 4-bit key cache is grouped (per token, as the format does, or per channel
over blocks of tokens, as KIVI does), on an exported checkpoint, simulated.

Values stay per token in every variant. Per-channel keys are a study, not a format option yet:
the 4-bit cache and its kernels store keys per token.

    python scripts/kv_key_ablation.py CHECKPOINT [--eval-data FILE] [--max-windows 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comet_quant import data  # noqa: E402
from comet_quant import qmodules  # noqa: E402
from comet_quant.checkpoint import open_checkpoint  # noqa: E402
from comet_quant.evaluate import perplexity  # noqa: E402


def per_channel_fake_quant(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Asymmetric ``bits``-bit quantization of K [B, H, T, D] per channel over ``block`` tokens."""
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    pad = (-t) % block
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, pad), value=float("nan"))
    xg = xp.reshape(b, h, -1, block, d)
    lo = torch.nan_to_num(xg, nan=float("inf")).amin(3, keepdim=True)
    hi = torch.nan_to_num(xg, nan=float("-inf")).amax(3, keepdim=True)
    s = ((hi - lo) / levels).clamp_min(1e-4)
    z = torch.round(-lo / s)
    q = (torch.round(xg / s) + z).clamp(0, levels)
    return ((q - z) * s).reshape(b, h, -1, d)[:, :, :t].to(x.dtype)


def keys_per_channel(block: int):
    """A stand-in for qmodules.fake_quantize_kv that groups keys per channel."""
    per_token = qmodules.fake_quantize_kv
    state = {"key": False}

    def fake(x, bits):  # kv_quant_attention quantizes the key, then the value
        state["key"] = not state["key"]
        if not state["key"] or bits >= 16:
            return per_token(x, bits)
        return per_channel_fake_quant(x, bits, block)
    return fake


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--eval-data", default="wikitext2")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    ck = open_checkpoint(args.checkpoint)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    src = data.load_text(args.eval_data, "evaluation")
    windows = data.eval_windows(data.tokenize(tok, src.text), 2048, args.max_windows)
    per_token = qmodules.fake_quantize_kv
    variants = [("keys per token (the format)", per_token, None),
                ("keys per channel, 128-token blocks", keys_per_channel(128), None),
                ("keys per channel, 32-token blocks", keys_per_channel(32), None),
                ("KV unquantized", per_token, 16)]
    print(f"| {ck.scheme.name}: K/V grouping | perplexity |\n|---|---|")
    for label, fake, kv_bits in variants:
        qmodules.fake_quantize_kv = fake
        model = qmodules.build_quantized_model(ck, args.device)
        if kv_bits:
            for layer in model.model.layers:
                layer.self_attn.comet_kv_bits = kv_bits
        print(f"| {label} | {perplexity(model, windows, args.device, label)['ppl']:.3f} |", flush=True)
    qmodules.fake_quantize_kv = per_token


if __name__ == "__main__":
    main()
