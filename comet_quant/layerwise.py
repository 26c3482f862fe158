"""Run a decoder stack one layer at a time.

The embeddings run once to capture the first layer's inputs (hidden states plus the keyword
arguments the model passes every layer: rotary embeddings, mask, positions). Then each layer
is moved to the compute device alone, runs every batch, and its outputs become the next
layer's inputs. Only one layer's weights are on the compute device at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import decoder_layers


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Inputs of the current layer, batch by batch (hidden states kept on the host)."""

    hidden: list[torch.Tensor]   # each float [B, T, H] on CPU
    kwargs: list[dict]           # per batch: what the model passes to every decoder layer


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    return obj


@torch.no_grad()
def capture_inputs(model, samples: torch.Tensor, batch_size: int, device: str,
                   dtype: torch.dtype = torch.float32) -> LayerInputs:
    """Embed ``samples`` (int64 [S, T]) and capture what enters the first decoder layer.

    Hidden states and floating-point keyword arguments are cast to ``dtype``, the dtype the
    decoder layers compute in (embeddings may be stored narrower).
    """
    layers = decoder_layers(model)
    inner = model.model
    moved = [inner.embed_tokens, inner.rotary_emb]
    for m in moved:
        m.to(device)
    captured = LayerInputs(hidden=[], kwargs=[])

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach().to("cpu", dtype))
        # The cache's keyword: `cache` from transformers 5.24, `past_key_values` / `past_key_value` before.
        kw = {k: v for k, v in kwargs.items()
              if k not in ("hidden_states", "cache", "past_key_values", "past_key_value")}
        kw["use_cache"] = False
        captured.kwargs.append(_cast(_to(kw, "cpu"), dtype))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(samples[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m in moved:
            m.to("cpu")
    return captured


@torch.no_grad()
def run_layer(layer, inputs: LayerInputs, device: str, update: bool = True) -> None:
    """Run ``layer`` over every batch on ``device``; with ``update`` its outputs replace the inputs."""
    for i, (hidden, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        out = layer(hidden.to(device), **_to(kw, device))
        out = out[0] if isinstance(out, tuple) else out
        if update:
            inputs.hidden[i] = out.to("cpu")
