"""A real 4-bit KV cache for transformers LLaMA models, with its PyTorch reference.

Storage per layer, for K and V alike (kernels/kv4.h): packed asymmetric 4-bit codes
uint8 [B, H_kv, C, head_dim / 2] (even dim in the low nibble) plus one fp16 scale and one
fp16 integer zero point per token and head, C the allocated capacity. K is quantized after
RoPE. Tokens are quantized once, when written; reads dequantize:

- decode (one new token, CUDA): ``comet::kv4_decode_attention`` reads the packed cache
  directly, dequantizing inside the dot products (split over the sequence, flash-decoding);
- prefill, CPU, or padded batches: the cache is dequantized and attended with SDPA.

Numerics (same bits on CPU and GPU): ``scale = fp16_round_up(max((hi - lo) / 15, 1e-4))``,
``zero = clamp(round(-lo / scale), -2048, 2048)``, ``code = clamp(round(x / scale) + zero, 0, 15)``,
value ``(code - zero) * scale``, with ``lo``/``hi`` the min/max of the head vector.
"""
from __future__ import annotations

import functools
import math

import torch

from .errors import CometError
from .primitives import pack_int4, quantize_kv, unpack_int4

KERNEL_HEAD_DIMS = (64, 128, 256)
MAX_HEADS_PER_KV = 16  # GQA ratio the decode kernel takes (kernels/kv4.h kMaxHeadsPerKv)
ALLOC_STEP = 256


# ---------------------------------------------------------------------------------------------
# Reference numerics
# ---------------------------------------------------------------------------------------------

def quantize_kv4(x: torch.Tensor):
    """float [..., D] -> (codes uint8 [..., D/2], scale fp16 [...], zero fp16 [...]).

    The same numerics as the simulated KV4 (:func:`comet_quant.primitives.quantize_kv`), packed.
    """
    codes, scale, zero = quantize_kv(x, 4)
    d = codes.shape[-1]
    packed = pack_int4(codes.to(torch.int8).reshape(-1, d)).reshape(*codes.shape[:-1], d // 2)
    return packed, scale.half()[..., 0], zero.half()[..., 0]


def dequantize_kv4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_kv4`: float32 [..., D]."""
    half = codes.shape[-1]
    q = unpack_int4(codes.reshape(-1, half), signed=False).float().reshape(*codes.shape[:-1], 2 * half)
    return (q - zero.float()[..., None]) * scale.float()[..., None]


def kv4_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                   length: int, scaling: float) -> torch.Tensor:
    """Reference of ``comet::kv4_decode_attention``: q [B, Hq, D] -> [B, Hq, D] in q's dtype."""
    k = dequantize_kv4(k_codes[:, :, :length], k_scale[:, :, :length], k_zero[:, :, :length])
    v = dequantize_kv4(v_codes[:, :, :length], v_scale[:, :, :length], v_zero[:, :, :length])
    b, hq, d = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    att = torch.softmax(torch.einsum("bhd,bhtd->bht", q.float(), k) * scaling, dim=-1)
    return torch.einsum("bht,bhtd->bhd", att, v).to(q.dtype)


def _use_kernels(t: torch.Tensor, head_dim: int) -> bool:
    if not t.is_cuda or head_dim not in KERNEL_HEAD_DIMS:
        return False
    from . import ops
    return ops.kernels_available()


def kv4_append(x: torch.Tensor, codes, scale, zero, start: int, start_tensor=None) -> None:
    """Quantize x [B, H, T, D] into cache rows ``[start, start + T)`` in place.

    ``start_tensor`` (CUDA kernels only): a one-element int32 device tensor holding the start
    instead, so a captured CUDA graph writes where the cache stands at replay time."""
    t = x.shape[2]
    if _use_kernels(codes, x.shape[-1]) and x.dtype in (torch.float16, torch.bfloat16):
        torch.ops.comet.kv4_append(x.contiguous(), codes, scale, zero, start, start_tensor)
        return
    if start_tensor is not None:
        raise CometError("device-side cache positions (CUDA-graph decode) need the CUDA kernels")
    c, s, z = quantize_kv4(x)
    codes[:, :, start:start + t] = c
    scale[:, :, start:start + t] = s
    zero[:, :, start:start + t] = z


def kv4_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length: int,
                         scaling: float, length_tensor=None) -> torch.Tensor:
    """Attention of one query token per sequence over the 4-bit cache (kernel or reference).

    ``length_tensor``: the length as a one-element int32 device tensor (CUDA-graph decode)."""
    rep_ok = q.shape[1] // k_codes.shape[1] <= MAX_HEADS_PER_KV
    if rep_ok and _use_kernels(q, q.shape[-1]) and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.comet.kv4_decode_attention(q.contiguous(), k_codes, k_scale, k_zero, v_codes,
                                                    v_scale, v_zero, length, scaling, length_tensor)
    if length_tensor is not None:
        raise CometError("device-side cache positions (CUDA-graph decode) need the CUDA kernels")
    return kv4_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                          length, scaling)


# ---------------------------------------------------------------------------------------------
# transformers Cache
# ---------------------------------------------------------------------------------------------

from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402  (after the numerics)


class Kv4Layer(DynamicLayer):
    """One decoder layer's 4-bit K and V storage (grows in steps; see module doc)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.length = 0
        self.reserve = capacity
        self.k = self.v = None  # (codes, scale, zero)
        self.positions = None   # CUDA-graph decode: the cache's device (start, length) tensors

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _alloc(self, b: int, h: int, cap: int, d: int, device):
        return (torch.zeros(b, h, cap, d // 2, dtype=torch.uint8, device=device),
                torch.zeros(b, h, cap, dtype=torch.float16, device=device),
                torch.zeros(b, h, cap, dtype=torch.float16, device=device))

    def _ensure(self, key: torch.Tensor, need: int) -> None:
        b, h, _, d = key.shape
        if d % 2:
            raise CometError(f"head_dim {d} is odd; the 4-bit KV cache packs two values per byte")
        cap = 0 if self.k is None else self.k[0].shape[2]
        if need <= cap:
            return
        new_cap = max(need, self.reserve, 2 * cap, ALLOC_STEP)
        new_cap = int(math.ceil(new_cap / ALLOC_STEP) * ALLOC_STEP)
        grown = []
        for old in (self.k, self.v):
            fresh = self._alloc(b, h, new_cap, d, key.device)
            if old is not None:
                for dst, src in zip(fresh, old):
                    dst[:, :, :self.length] = src[:, :, :self.length]
            grown.append(fresh)
        self.k, self.v = grown

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Quantize and store new K/V [B, H_kv, T, D] (K after RoPE)."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        t = key.shape[2]
        if self.positions is not None:  # fixed storage; the kernels read the position
            if t != 1:
                raise CometError("a cache in device-position mode (CUDA-graph decode) takes one token per forward")
            kv4_append(key, *self.k, 0, self.positions[0])
            kv4_append(value, *self.v, 0, self.positions[0])
            return
        self._ensure(key, self.length + t)
        kv4_append(key, *self.k, self.length)
        kv4_append(value, *self.v, self.length)
        self.length += t

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Decode attention of q [B, Hq, D] (one token per sequence) over the cache."""
        if self.positions is not None:
            return kv4_decode_attention(q, *self.k, *self.v, self.k[0].shape[2], scaling, self.positions[1])
        return kv4_decode_attention(q, *self.k, *self.v, self.length, scaling)

    def dequantized(self, dtype: torch.dtype):
        """K, V [B, H_kv, length, D] in ``dtype``."""
        n = self.length
        return tuple(dequantize_kv4(c[:, :, :n], s[:, :, :n], z[:, :, :n]).to(dtype)
                     for c, s, z in (self.k, self.v))

    def update(self, key_states, value_states, *args, **kwargs):
        """The generic Cache API (used by code other than :class:`Kv4Attention`)."""
        self.append(key_states, value_states)
        return self.dequantized(key_states.dtype)

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else kwargs.get("query_length")
        if query_length is None:  # older signature: (cache_position)
            query_length = int(args[0].shape[0])
        return self.length + query_length, 0

    def reset(self) -> None:
        self.length = 0
        self.positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.k is not None:
            self.k = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.k)
            self.v = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.v)


class Kv4Cache(Cache):
    """A transformers ``Cache`` holding every layer's K/V in 4 bits (pass to ``generate``)."""

    def __init__(self, num_layers: int, max_cache_len: int = 0):
        super().__init__(layers=[Kv4Layer(max_cache_len) for _ in range(num_layers)])
        self._mask_memo = (None, False)
        self.positions = None

    def use_device_positions(self) -> torch.Tensor:
        """Switch to device-side positions for CUDA-graph decode and return them.

        Returns int32 ``[2]`` on the cache's device: (write position, length after the write),
        starting from the current length. From here on every layer writes one token per
        forward at the write position and attends over ``length`` tokens, reading both from the
        device, so a captured decode step replays correctly; call :meth:`advance` (also inside
        the graph) after each step. Storage no longer grows: allocate the capacity up front
        (``new_cache(model, max_len)``), and use batches without padding (the attention mask
        is not read on this path). Python-side lengths stop tracking the device.
        """
        first = self.layers[0]
        if first.k is None or not first.k[0].is_cuda:
            raise CometError("device positions need a CUDA cache that already holds the prompt")
        pos = torch.tensor([first.length, first.length + 1], dtype=torch.int32, device=first.k[0].device)
        for layer in self.layers:
            layer.positions = (pos[0:1], pos[1:2])
        self.positions = pos
        return pos

    def advance(self) -> None:
        """After a decode step in device-position mode: one token further (graph-capturable)."""
        self.positions.add_(1)

    def mask_is_trivial(self, mask) -> bool:
        """Whether ``mask`` lets every query see every cached token (no padding)."""
        if mask is None:
            return True
        if self._mask_memo[0] is mask:
            return self._mask_memo[1]
        ok = bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())
        self._mask_memo = (mask, ok)
        return ok


def new_cache(model, max_cache_len: int = 0) -> Kv4Cache:
    """An empty 4-bit cache for ``model`` (optionally preallocated for ``max_cache_len``)."""
    return Kv4Cache(model.config.num_hidden_layers, max_cache_len)


@functools.cache
def cache_keyword() -> str:
    """The forward / generate keyword for a cache in the installed transformers: ``cache`` from
    5.24 on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@functools.cache
def _attention_class():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

    class Kv4Attention(LlamaAttention):
        """LLaMA attention that writes K/V into a :class:`Kv4Cache` and reads them back in 4 bits.

        With any other cache (or none) it behaves exactly like the parent class.
        """

        def forward(self, *args, **kwargs):
            # transformers >= 5.24 passes the cache as `cache` (`past_key_values` before).
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if not isinstance(cache, Kv4Cache):
                return super().forward(*args, **kwargs)
            names = ("hidden_states", "position_embeddings", "attention_mask")
            for name, value in zip(names, args):
                kwargs[name] = value
            hidden = kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, self.head_dim)
            q = self.q_proj(hidden).view(shape).transpose(1, 2)
            k = self.k_proj(hidden).view(shape).transpose(1, 2)
            v = self.v_proj(hidden).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            layer = cache.layers[self.layer_idx]
            layer.append(k, v)
            # Device positions (graph decode) imply an unpadded batch: the mask is not read.
            if q.shape[2] == 1 and (layer.positions is not None or cache.mask_is_trivial(mask)):
                out = layer.attend(q[:, :, 0], self.scaling)[:, None]  # [B, 1, Hq, D]
            else:
                kd, vd = layer.dequantized(q.dtype)
                out, _ = sdpa_attention_forward(self, q, kd, vd, mask, dropout=0.0, scaling=self.scaling)
            out = out.reshape(*hidden.shape[:-1], -1).contiguous()
            return self.o_proj(out), None

    return Kv4Attention


def enable_kv4_cache(model) -> None:
    """Let ``model``'s attention layers use a :class:`Kv4Cache` when one is passed."""
    from .models import decoder_layers

    cls = _attention_class()
    for layer in decoder_layers(model):
        if type(layer.self_attn).__name__ != "LlamaAttention" and not isinstance(layer.self_attn, cls):
            raise CometError(f"the 4-bit KV cache supports LLaMA attention, not "
                             f"{type(layer.self_attn).__name__}")
        layer.self_attn.__class__ = cls
