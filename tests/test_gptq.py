import pytest
import torch

from comet_quant.gptq import gptq_quantize
from comet_quant.primitives import dequantize_weight, quantize_weight_rtn


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k // 8, generator=g)
    mix = torch.randn(k // 8, k, generator=g)
    x = base @ mix + 0.1 * torch.randn(n, k, generator=g)
    x[:, :4] *= 10  # a few outlier channels
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_layer_output(symmetric):
    k, n_out = 256, 64
    x = correlated_inputs(2048, k)
    w = torch.randn(n_out, k, generator=torch.Generator().manual_seed(1))
    h = x.t() @ x / x.shape[0]
    q, s, z = gptq_quantize(w, h, 128, symmetric, damp=0.01, block=128)
    assert q.shape == w.shape and s.shape == (n_out, 2)
    if symmetric:
        assert z is None and q.min() >= -8 and q.max() <= 7
    else:
        assert q.min() >= 0 and q.max() <= 15
    w_gptq = dequantize_weight(q, s, z, 128)
    w_rtn = dequantize_weight(*quantize_weight_rtn(w, 128, symmetric), 128)
    ref = x @ w.t()
    err_gptq = (x @ w_gptq.t() - ref).norm() / ref.norm()
    err_rtn = (x @ w_rtn.t() - ref).norm() / ref.norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_handles_dead_padding_channels():
    k = 256
    x = correlated_inputs(512, k)
    x[:, 200:] = 0  # zero padding channels give a singular Hessian
    w = torch.randn(16, k)
    w[:, 200:] = 0
    q, s, _ = gptq_quantize(w, x.t() @ x / 512, 128, True)
    assert torch.isfinite(s).all()
    assert (q[:, 200:] == 0).all()


def _layer_error(x, w, q, s, z):
    ref = x @ w.t()
    return float((x @ dequantize_weight(q, s, z, 128).t() - ref).norm() / ref.norm())


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_and_clip_gptq_beat_rtn_and_keep_static_groups(symmetric):
    k = 384
    x = correlated_inputs(2048, k, seed=3)
    x[:, 300:310] *= 8  # outlier channels far from the front: act-order visits them first
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(4))
    h = x.t() @ x / x.shape[0]
    err_rtn = _layer_error(x, w, *quantize_weight_rtn(w, 128, symmetric))
    for act_order, clip in [(True, False), (False, True), (True, True)]:
        q, s, z = gptq_quantize(w, h, 128, symmetric, act_order=act_order, clip=clip)
        assert s.shape == (48, 3)
        assert q.min() >= (-8 if symmetric else 0) and q.max() <= (7 if symmetric else 15)
        err = _layer_error(x, w, q, s, z)
        assert err < 0.8 * err_rtn, (act_order, clip, err, err_rtn)
    # Static groups: the codes dequantize with one scale per (row, group of 128 columns), so
    # the result is a valid checkpoint tensor; re-quantizing the dequantized weight with the
    # same scales reproduces the codes exactly.
    q, s, z = gptq_quantize(w, h, 128, symmetric, act_order=True)
    from comet_quant.primitives import quantize_weight_with
    assert torch.equal(quantize_weight_with(dequantize_weight(q, s, z, 128), s, z, 128), q)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_and_usually_better(symmetric):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 512, generator=g) * (torch.rand(64, 512, generator=g) < 0.02).float().mul(6).add(1)
    cw = torch.rand(512, generator=g) + 0.1
    def err(q, s, z):
        return ((dequantize_weight(q, s, z, 128) - w).square() * cw).reshape(64, 4, 128).sum(-1)
    base = err(*quantize_weight_rtn(w, 128, symmetric))
    clipped = err(*quantize_weight_rtn(w, 128, symmetric, clip=True, col_weight=cw))
    assert (clipped <= base * (1 + 1e-5)).all()
    assert clipped.sum() < 0.95 * base.sum()
