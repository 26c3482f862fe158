"""nn.Module glue: a transformers LLaMA whose linears and KV cache follow a checkpoint.

Two backends with the same numerics: ``simulated`` runs every quantization step in PyTorch
(:mod:`comet_quant.primitives`, any device); ``kernels`` runs the linears through the CUDA W4Ax
ops (activation quantization fused with the permutation, then the mixed GEMM).
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import QuantizedCheckpoint, open_checkpoint
from .errors import CometError
from .models import LINEAR_SITE, SITES, decoder_layers
from .primitives import (SCALE_MULT_MAX, dequantize_weight, fake_quantize_activation, fake_quantize_kv, pad_channels,
                         rotate_groups, unpack_int4)
from .scheme import QuantScheme

KV_ATTENTION = "comet_kv_quant"
BACKENDS = ("auto", "simulated", "kernels")


def check_int_scales(wscale: torch.Tensor, wscale_row: torch.Tensor | None) -> None:
    """A checkpoint of integer group scales: every wscale[n, g] is wscale_row[n] x an integer in
    [1, 16] (the kernels take the multipliers from that quotient)."""
    if wscale_row is None or wscale_row.shape != wscale.shape[:1]:
        raise CometError("integer group scales need a wscale_row tensor of shape [N]; the checkpoint "
                         "is corrupt or mismatched, re-export it")
    m = wscale.float() / wscale_row.float()[:, None]
    if not (torch.equal(m, m.round()) and bool((m >= 1).all()) and bool((m <= SCALE_MULT_MAX).all())):
        raise CometError("wscale is not wscale_row times integers in [1, 16]: the checkpoint of integer "
                         "group scales is corrupt or mismatched, re-export it")


class W4AxLinear(nn.Module):
    """A linear layer with packed int4 weights and FMPQ-quantized activations (simulated).

    Buffers (see docs/FORMAT.md): qweight uint8 [N, K_pad/2], wscale fp16 [N, K_pad/g],
    wzero uint8 [N, K_pad/g] (asymmetric only), act_perm int32 [K_pad], bias [N] (optional).
    Input float [..., K] in the original channel order; output [..., N] in the input dtype.
    """

    def __init__(self, in_features: int, tensors: dict[str, torch.Tensor], scheme: QuantScheme,
                 use_kernels: bool = False):
        super().__init__()
        self.use_kernels = use_kernels
        self.in_features = in_features
        self.out_features = tensors["qweight"].shape[0]
        self.group_size = scheme.group_size
        self.a_bits, self.a_high_bits = scheme.a_bits, scheme.a_high_bits
        self.rotate = scheme.rotate
        self.int_scales = scheme.int_group_scales
        self.a8_spans = scheme.a8_span_scales
        self.groups8 = int(tensors["act_groups8"][0])
        for key in ("qweight", "wscale", "wscale_row", "wzero", "act_perm", "bias"):
            self.register_buffer(key, tensors.get(key))
        if self.int_scales:
            check_int_scales(self.wscale, self.wscale_row)
        self._weight_cache: torch.Tensor | None = None
        self._group: SharedInputGroup | None = None  # set by fuse_shared_inputs

    @property
    def k_padded(self) -> int:
        return self.act_perm.numel()

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [N, K_pad] weight in permuted column order (cached after the first call)."""
        if self._weight_cache is None or self._weight_cache.device != self.qweight.device:
            q = unpack_int4(self.qweight, signed=self.wzero is None)
            self._weight_cache = dequantize_weight(q, self.wscale, self.wzero, self.group_size)
        return self._weight_cache

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation the GEMM sees: padded, permuted, fake-quantized, float32 [M, K_pad]."""
        x = x.reshape(-1, self.in_features).float()
        if self.a_bits >= 16:
            xp = pad_channels(x, self.k_padded).index_select(-1, self.act_perm.long())
            return rotate_groups(xp, self.group_size) if self.rotate else xp
        return fake_quantize_activation(x, self.act_perm, self.groups8, self.group_size,
                                        self.a_bits, self.a_high_bits, self.rotate, self.int_scales, self.a8_spans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.is_cuda:
            return self._forward_kernels(x)
        y = self.quantized_input(x) @ self.dequantized_weight().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def kernel_wscale_row(self) -> torch.Tensor | None:
        """The row scales the kernels take: ``wscale_row`` under integer group scales, else None."""
        return self.wscale_row if self.int_scales else None

    @property
    def kernel_groups8(self) -> int:
        """The leading 8-bit groups the kernels take (all of them for 8-bit activations)."""
        return self.k_padded // self.group_size if self.a_bits == 8 else self.groups8

    def _forward_kernels(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops

        y = self._group.output(self, x) if self._group is not None else None
        if y is None:
            x2 = x.reshape(-1, self.in_features)
            if x2.dtype not in (torch.float16, torch.bfloat16):
                x2 = x2.to(torch.float16)
            y = ops.w4ax_linear(x2.contiguous(), self.act_perm, self.kernel_groups8, self.qweight, self.wscale,
                                x.dtype, self.rotate, self.kernel_wscale_row, self.a8_spans)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, K_pad={self.k_padded}, "
                f"groups8={self.groups8}, a_bits={self.a_bits}")


#: Up to this many tokens a :class:`SharedInputGroup` runs one GEMM over its members'
#: concatenated weights (decode batches: fewer, fuller launches); above, each member runs its own
#: GEMM on the shared quantized activations, so that no [M, N_all] output waits for the last
#: member to take its slice (+1.9 GiB at a 64K-token LLaMA-3-8B prefill).
FUSED_GEMM_MAX_TOKENS = 256


class SharedInputGroup:
    """Linears of one layer that read the same input (q / k / v, gate / up) run as one.

    FMPQ gives them one permutation and one set of 8-bit groups, so their activations are
    quantized once, and up to :data:`FUSED_GEMM_MAX_TOKENS` tokens multiplied in one W4Ax GEMM
    over their concatenated weights, each member taking its slice of the output. The members'
    ``qweight`` / ``wscale`` (and ``wscale_row`` under integer group scales) become views of the
    concatenated tensors (no extra memory). The first
    member called with an input does the shared work and keeps the rest until the others ask for
    it with that same tensor (as LLaMA's attention and MLP do, one after the other); a member
    called with any other input, or once a member's buffers were replaced (``.to()`` to another
    device, ``.float()``), runs on its own.
    """

    _KEYS = ("qweight", "wscale")  # the weight tensors concatenated along N (+ wscale_row)

    def __init__(self, members: list[W4AxLinear]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.keys = self._KEYS + (("wscale_row",) if members[0].int_scales else ())
        whole = {key: torch.cat([getattr(m, key) for m in members]) for key in self.keys}
        start = 0
        for m, n in zip(members, self.sizes):
            for key in self.keys:
                setattr(m, key, whole[key][start:start + n])
            m._group = self
            start += n
        self._input: torch.Tensor | None = None
        self._x2: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor | None] = {}
        self._quantized: dict[bool, tuple] = {}

    @staticmethod
    def same_input(members: list) -> bool:
        """Whether ``members`` quantize their input alike (one permutation, the same 8-bit groups,
        rotation, group size and kind of scales: free, integer, integer with shared 8-bit span
        scales) with symmetric weights, so that one GEMM can serve them all."""
        first = members[0]
        return len(members) > 1 and all(
            isinstance(m, W4AxLinear) and m.wzero is None
            and m.int_scales == first.int_scales and m.a8_spans == first.a8_spans
            and m.in_features == first.in_features
            and m.kernel_groups8 == first.kernel_groups8 and m.rotate == first.rotate
            and m.group_size == first.group_size and torch.equal(m.act_perm, first.act_perm) for m in members)

    @staticmethod
    def compatible(members: list) -> bool:
        """:meth:`same_input`, and all on the CUDA kernels (the only backend the grouping serves)."""
        return SharedInputGroup.same_input(members) and all(m.use_kernels and m.qweight.is_cuda for m in members)

    def concatenated(self) -> tuple[torch.Tensor, ...] | None:
        """(qweight, wscale) of all members, with wscale_row under integer group scales, or None
        once a member's buffers were replaced. The group holds them only through the members'
        views, so replaced buffers free them."""
        whole = tuple(getattr(self.members[0], key)._base for key in self.keys)
        if any(t is None for t in whole) or any(
                getattr(m, key)._base is not t for m in self.members for key, t in zip(self.keys, whole)):
            return None
        return whole

    def output(self, member: W4AxLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x`` [..., K] (None: let the member run alone)."""
        from . import ops

        i = self.members.index(member)
        if self._input is not x or i not in self._pending:
            weights = self.concatenated()
            if weights is None or x.device != weights[0].device or x.dtype not in (torch.float16, torch.bfloat16):
                return None
            x2 = x.reshape(-1, member.in_features).contiguous()
            self._input, self._x2, self._quantized = x, x2, {}
            if x2.shape[0] <= FUSED_GEMM_MAX_TOKENS:
                qweight, wscale, *row = weights
                y = ops.w4ax_linear(x2, member.act_perm, member.kernel_groups8, qweight, wscale, x.dtype,
                                    member.rotate, wscale_row=row[0] if row else None, a8_spans=member.a8_spans)
                self._pending = dict(enumerate(y.reshape(*x.shape[:-1], -1).split(self.sizes, dim=-1)))
            else:
                self._pending = dict.fromkeys(range(len(self.members)))
        y = self._pending.pop(i)
        if y is None:  # its own GEMM on the shared quantized activations
            wide = ops.uses_wide_gemm(self._x2, member.qweight)
            if wide not in self._quantized:
                self._quantized[wide] = ops.quantize_linear_input(self._x2, member.act_perm, member.kernel_groups8,
                                                                  member.rotate, wide, member.int_scales,
                                                                  member.a8_spans)
            y = ops.w4ax_linear_quantized(self._quantized[wide], member.kernel_groups8, member.qweight,
                                          member.wscale, x.dtype, member.kernel_wscale_row,
                                          member.a8_spans).reshape(*x.shape[:-1], -1)
        if not self._pending:  # every member served: hold no references
            self._input = self._x2 = None
            self._quantized = {}
        return y


def fuse_shared_inputs(model) -> int:
    """Group each decoder layer's kernel linears that share an input (:class:`SharedInputGroup`);
    returns the number of groups. Call it once the model is on its device."""
    n = 0
    for layer in decoder_layers(model):
        for lins in SITES.values():
            members = [layer.get_submodule(lin) for lin in lins]
            if SharedInputGroup.compatible(members):
                SharedInputGroup(members)
                n += 1
    return n


def kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over K/V after ``module.comet_kv_bits`` asymmetric per-token per-head quantization.

    ``key``/``value``: [B, H_kv, T, head_dim], after RoPE (and after any cache update).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bits = getattr(module, "comet_kv_bits", 16)
    return sdpa_attention_forward(module, query, fake_quantize_kv(key, bits),
                                  fake_quantize_kv(value, bits), attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KV_ATTENTION, kv_quant_attention)
    AttentionMaskInterface.register(KV_ATTENTION, sdpa_mask)


def enable_kv_quant(model, bits: int) -> None:
    """Quantize K/V (after RoPE) to ``bits`` in every attention layer of ``model``."""
    if bits >= 16:
        return
    _register_attention()
    for layer in decoder_layers(model):
        layer.self_attn.comet_kv_bits = bits
    model.set_attn_implementation(KV_ATTENTION)


def resolve_backend(ckpt: QuantizedCheckpoint, backend: str, device: str) -> bool:
    """Whether the linears use the CUDA kernels; ``auto`` uses them where they can run."""
    if backend not in BACKENDS:
        raise CometError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "simulated":
        return False
    gap = ckpt.scheme.kernel_gap()
    supported = gap is None
    if backend == "auto":
        from . import ops
        return supported and device.startswith("cuda") and ops.kernels_available()
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise CometError("--backend kernels needs a CUDA GPU (use --device cuda on a GPU machine, "
                         "or --backend simulated)")
    if not supported:
        raise CometError(f"{gap}: use --backend simulated")
    from . import ops
    ops.build()
    return True


def build_quantized_model(ckpt: QuantizedCheckpoint, device: str = "cpu",
                          dtype: torch.dtype = torch.float32, backend: str = "simulated"):
    """A ``LlamaForCausalLM`` running ``ckpt`` (``backend``: simulated, kernels or auto)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    use_kernels = resolve_backend(ckpt, backend, device)
    config = ckpt.hf_config()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = ckpt.tensors()
    for i, layer in enumerate(decoder_layers(model)):
        for lin in LINEAR_SITE:
            prefix = f"model.layers.{i}.{lin}."
            parts = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
            old = layer.get_submodule(lin)
            parent_name, _, child = lin.rpartition(".")
            setattr(layer.get_submodule(parent_name), child,
                    W4AxLinear(old.in_features, parts, ckpt.scheme, use_kernels))
    state = {k: v.to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected or any(".layers." not in m or "layernorm" in m for m in missing):
        raise CometError(f"checkpoint {ckpt.path} does not match its config (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); re-export it")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    enable_kv_quant(model, ckpt.scheme.kv_bits)
    if ckpt.scheme.kv_bits == 4:
        from .kvcache import enable_kv4_cache
        enable_kv4_cache(model)
    model.comet_kv_bits = ckpt.scheme.kv_bits
    model = model.eval().requires_grad_(False).to(device)
    if use_kernels:
        fuse_shared_inputs(model)
    return model


def new_kv_cache(model, max_len: int = 0):
    """The cache ``generate`` should use: a 4-bit :class:`~comet_quant.kvcache.Kv4Cache` for a
    KV4 checkpoint, else None (transformers' default)."""
    if getattr(model, "comet_kv_bits", 16) != 4:
        return None
    from .kvcache import new_cache
    return new_cache(model, max_len)


def load_quantized(path, device: str = "cpu", dtype: torch.dtype | None = None, backend: str = "auto"):
    """Load an exported checkpoint as a transformers model plus its tokenizer.

    On CUDA the linears run the W4Ax kernels (``backend='auto'``) in float16 by default; on CPU
    the simulated backend runs in float32. For a KV4 scheme, pass
    ``past_key_values=new_kv_cache(model)`` (``cache=`` from transformers 5.24 on; see
    :func:`comet_quant.kvcache.cache_keyword`) to ``generate`` (or a forward) to keep the cache in
    4 bits; without it attention quantizes K/V on the fly (simulated KV4).
    """
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(path)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = build_quantized_model(ckpt, device, dtype, backend)
    return model, AutoTokenizer.from_pretrained(str(ckpt.path))
