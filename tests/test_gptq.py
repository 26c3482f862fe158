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
