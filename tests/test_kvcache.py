"""The 4-bit KV cache: reference numerics, cache bookkeeping, and model-level equivalence
with the simulated KV4 attention (CPU); kernel-vs-reference checks are in test_kernels.py."""
import torch
from click.testing import CliRunner

from comet_quant.cli import main
from comet_quant.kvcache import (Kv4Cache, cache_keyword, dequantize_kv4, kv4_decode_attention_reference,
                                 quantize_kv4)
from comet_quant.primitives import fake_quantize_kv
from comet_quant.qmodules import load_quantized, new_kv_cache


def test_kv4_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g) * torch.rand(2, 3, 50, 1, generator=g) * 10
    x[0, 0, 0] += 40.0  # an all-positive vector: the zero point goes negative
    codes, scale, zero = quantize_kv4(x)
    assert codes.shape == (2, 3, 50, 32) and codes.dtype == torch.uint8
    assert scale.dtype == zero.dtype == torch.float16
    err = (dequantize_kv4(codes, scale, zero) - x).abs()
    # Half a step, plus the step's fp16 rounding over the 15 levels of the range.
    assert (err <= scale.float()[..., None] * 0.5 + 1e-3 * (x.abs() + 1)).all()
    assert err.max() > 0.01  # it is a 4-bit code, not a copy
    # Exactly the simulated KV4's values (one definition of the numerics).
    assert torch.equal(dequantize_kv4(codes, scale, zero), fake_quantize_kv(x, 4))


def test_decode_attention_reference_matches_naive_gqa():
    g = torch.Generator().manual_seed(1)
    b, h, rep, t, d = 2, 2, 3, 37, 64
    k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    q = torch.randn(b, h * rep, d, generator=g)
    kc, vc = quantize_kv4(k), quantize_kv4(v)
    out = kv4_decode_attention_reference(q, *kc, *vc, t, 0.125)
    kd, vd = dequantize_kv4(*kc), dequantize_kv4(*vc)
    for bi in range(b):
        for hq in range(h * rep):
            p = torch.softmax(kd[bi, hq // rep] @ q[bi, hq] * 0.125, 0)
            torch.testing.assert_close(out[bi, hq], p @ vd[bi, hq // rep], rtol=1e-5, atol=1e-5)


def _assert_same_logits(cached, full, tight=1e-4, loose=0.05, share=0.8):
    """Same K/V values; only the GEMMs' token counts and the attention's summation order
    differ. Those move values by float rounding (~1e-7), and the 4-bit activation quantization
    can turn one such difference into a code one step over, which moves that token's logits by
    a few percent (the tiny model: 2 of 36 positions, 2.7% of the largest logit, the same with
    transformers' own DynamicCache). So: most positions equal to float rounding, every position
    within a few percent. A wrong cache (codes, scales, zero points, lengths) misses both."""
    top = float(full.abs().max())
    per_pos = (cached - full).abs().amax(-1).flatten()
    close = (per_pos <= tight * top).float().mean().item()
    assert close >= share, f"only {close:.0%} of positions match: {per_pos.tolist()}"
    assert per_pos.max().item() <= loose * top, per_pos.tolist()


def test_cache_grows_and_matches_simulated_kv4(checkpoint, tiny_model):
    """Prefill + token-by-token decode through the 4-bit cache = the simulated KV4 model."""
    model, tok = load_quantized(checkpoint)
    ids = tok("Children ran along the quay counting boats and arguing about", return_tensors="pt").input_ids
    full = model(ids, use_cache=False).logits  # simulated KV4 over the whole sequence
    cache = new_kv_cache(model)
    assert isinstance(cache, Kv4Cache)
    split = 4
    out = model(ids[:, :split], **{cache_keyword(): cache}, use_cache=True).logits
    steps = [out]
    for i in range(split, ids.shape[1]):
        steps.append(model(ids[:, i:i + 1], **{cache_keyword(): cache}, use_cache=True).logits)
    cached = torch.cat(steps, 1)
    assert cache.get_seq_length() == ids.shape[1]
    _assert_same_logits(cached, full)
    # The cache really is 4-bit: codes + fp16 scale and zero per token and head.
    from comet_quant.bench import _kv_bytes

    layer = cache.layers[0]
    n_kv, d = model.config.num_key_value_heads, model.config.head_dim
    per_token = 2 * n_kv * (d // 2 + 4)
    assert _kv_bytes(cache, ids.shape[1]) == model.config.num_hidden_layers * per_token * ids.shape[1]
    assert layer.k[0].dtype == torch.uint8
    # Growth keeps the data: force a reallocation and compare.
    before = [t[:, :, :layer.length].clone() for t in layer.k]
    layer._ensure(torch.zeros(1, n_kv, 1, d), layer.k[0].shape[2] + 1)
    assert all(torch.equal(a, t[:, :, :layer.length]) for a, t in zip(before, layer.k))


def test_device_positions_need_cuda_and_one_token_steps(checkpoint):
    """CUDA-graph decode mode: refused on a CPU cache (one clear error), and the reference
    paths refuse device-side positions instead of silently ignoring them."""
    import pytest

    from comet_quant.errors import CometError
    from comet_quant.kvcache import kv4_append, kv4_decode_attention

    model, tok = load_quantized(checkpoint)
    cache = new_kv_cache(model, 16)
    with pytest.raises(CometError, match="CUDA cache that already holds the prompt"):
        cache.use_device_positions()
    ids = tok("The harbor town", return_tensors="pt").input_ids
    model(ids, **{cache_keyword(): cache}, use_cache=True)
    with pytest.raises(CometError, match="CUDA cache"):
        cache.use_device_positions()
    layer = cache.layers[0]
    pos = torch.tensor([3], dtype=torch.int32)
    x = torch.randn(1, layer.k[0].shape[1], 1, 2 * layer.k[0].shape[3])
    with pytest.raises(CometError, match="need the CUDA kernels"):
        kv4_append(x, *layer.k, 0, pos)
    with pytest.raises(CometError, match="need the CUDA kernels"):
        kv4_decode_attention(x[:, :, 0], *layer.k, *layer.v, 4, 0.1, pos)
    layer.positions = (pos, pos + 1)  # as use_device_positions sets it on a GPU
    with pytest.raises(CometError, match="one token per forward"):
        layer.append(torch.randn(1, x.shape[1], 2, x.shape[3]), torch.randn(1, x.shape[1], 2, x.shape[3]))


def test_generate_uses_kv4_cache(checkpoint):
    model, tok = load_quantized(checkpoint)
    ids = tok("The harbor town", return_tensors="pt").input_ids
    cache = new_kv_cache(model, ids.shape[1] + 5)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **{cache_keyword(): cache},
                         pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert cache.get_seq_length() >= ids.shape[1] + 4


def test_bench_cli_runs_on_cpu(checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(checkpoint), "--batch", "1,2", "--prompt-len", "8",
                                  "--gen-len", "3", "--repeats", "1", "--device", "cpu",
                                  "--output", str(out)])
    assert r.exit_code == 0, r.output
    import json
    res = json.loads(out.read_text())
    q, f = res["runs"]["quantized"]["rows"], res["runs"]["fp16"]["rows"]
    assert [row["batch"] for row in q] == [1, 2]
    assert all(row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 for row in q + f)
    # 4-bit codes + two fp16 per head vector vs float values: (D/2 + 4) / (4 D) for D = 64.
    ratio = q[1]["kv_cache_bytes"] / f[1]["kv_cache_bytes"]
    assert abs(ratio - (32 + 4) / (64 * 4)) < 1e-6, ratio  # the CPU FP model is float32
    assert "| batch |" in r.output
    bad = CliRunner().invoke(main, ["bench", str(checkpoint), "--batch", "x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output
    missing = CliRunner().invoke(main, ["bench", str(checkpoint), "--device", "cpu", "--reference",
                                        str(tmp_path / "no-such-model")])
    assert missing.exit_code == 2 and missing.output.count("error:") == 1, missing.output
    solo = CliRunner().invoke(main, ["bench", str(checkpoint), "--batch", "1", "--prompt-len", "4",
                                     "--gen-len", "2", "--repeats", "1", "--device", "cpu", "--no-reference"])
    assert solo.exit_code == 0, solo.output
    graphs = CliRunner().invoke(main, ["bench", str(checkpoint), "--device", "cpu", "--cuda-graphs"])
    assert graphs.exit_code == 2 and "--eager" in graphs.output and graphs.output.count("error:") == 1


def test_kv_bytes_counts_per_token_for_every_cache_kind(checkpoint, tiny_model):
    """bench reports bytes per held token x tokens: growing, preallocated and static caches of
    the same model compare on what they hold, not on what they reserved."""
    from transformers import DynamicCache, StaticCache

    from comet_quant.bench import _kv_bytes
    from comet_quant.models import load_model, resolve_model

    fp, _ = load_model(resolve_model(str(tiny_model)), dtype=torch.float32, device="cpu")
    cfg = fp.config
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    per_token = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K+V fp32, batch 2
    for cache in (DynamicCache(config=cfg), StaticCache(config=cfg, max_cache_len=40)):
        fp(ids, **{cache_keyword(): cache}, use_cache=True)
        assert _kv_bytes(cache, 10) == per_token * 10, type(cache).__name__
    model, _ = load_quantized(checkpoint)
    kv4 = new_kv_cache(model, 300)  # capacity rounds up to 512
    model(ids, **{cache_keyword(): kv4}, use_cache=True)
    assert _kv_bytes(kv4, 10) == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.head_dim // 2 + 4) * 10


def test_kv4_attention_reads_either_cache_keyword(checkpoint):
    """transformers 5.24 renamed the cache keyword (`past_key_values` -> `cache`); the 4-bit
    attention takes whichever it is given, so both versions write into the 4-bit cache."""
    model, _ = load_quantized(checkpoint)
    inner = model.model
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    hidden = inner.embed_tokens(ids)
    position_embeddings = inner.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    outs = []
    for keyword in ("cache", "past_key_values"):
        cache = new_kv_cache(model)
        with torch.no_grad():
            out, _ = inner.layers[0].self_attn(hidden_states=hidden, position_embeddings=position_embeddings,
                                               attention_mask=None, **{keyword: cache})
        assert cache.layers[0].get_seq_length() == ids.shape[1], keyword
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert cache_keyword() in ("cache", "past_key_values")


def test_enabling_the_kv4_cache_twice_keeps_one_attention_class(checkpoint):
    from comet_quant.kvcache import enable_kv4_cache

    model, _ = load_quantized(checkpoint)
    first = type(model.model.layers[0].self_attn)
    enable_kv4_cache(model)  # again: the same class, no "unsupported attention" error
    assert type(model.model.layers[0].self_attn) is first
