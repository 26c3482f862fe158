"""The quantization scheme as data: a frozen, validated dataclass with named presets.

The scheme is written into a checkpoint's ``config.json`` under ``quantization_config.scheme``
and read back with :meth:`QuantScheme.from_dict`, which rejects unknown keys and bad values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import CometError

#: Bumped whenever the checkpoint layout or the meaning of a scheme field changes.
FORMAT_VERSION = 1

#: The kernels' K tile: activation and weight groups of this many channels.
DEFAULT_GROUP_SIZE = 128

WEIGHT_METHODS = ("rtn", "gptq")
SELECT_MODES = ("budget", "threshold", "fixed")
CRITERIA = ("absmax", "error")
K_POLICIES = ("pad", "error")


@dataclass(frozen=True)
class QuantScheme:
    """How every linear layer and the KV cache are quantized.

    Attributes:
        name: preset name or a user label.
        group_size: channels per group along K, shared by weights (one scale per output row
            and group) and activations (one scale per token and group). The kernels' K tile.
        w_bits: weight bits; the format stores int4 weights, so 4.
        w_symmetric: symmetric int4 weights (two's complement nibbles, no zero point); else
            asymmetric with a uint4 zero point per group.
        w_method: ``rtn`` (round to nearest) or ``gptq`` (needs calibration Hessians).
        gptq_damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        gptq_block: GPTQ columns processed per lazy-update block.
        gptq_act_order: GPTQ visits columns by decreasing Hessian diagonal (static groups).
        w_clip: choose each weight group's range by a clipping search that minimizes the
            input-energy-weighted rounding error (RTN and GPTQ), instead of min/max.
        a_bits: activation bits of the ordinary groups: 4, 8, or 16 (activations unquantized).
        a_high_bits: activation bits of the outlier groups chosen by FMPQ (8; kernels take int8).
        a8_select: ``budget`` (the ``a8_budget`` fraction of all groups, given to the groups
            with the highest outlier scores model-wide), ``threshold`` (groups whose outlier
            score exceeds ``a8_threshold``, capped by ``a8_budget``) or ``fixed``
            (``a8_groups`` leading groups in every linear input, as Atom keeps 128 channels).
        a8_budget: the largest fraction of groups in ``a_high_bits`` (0 to 1).
        a8_threshold: outlier ratio for ``threshold`` selection.
        a8_groups: 8-bit groups per linear input for ``fixed`` selection.
        a8_criterion: what ranks groups for ``budget`` selection: ``absmax`` (the outlier
            score from calibration absmax) or ``error`` (the measured reduction of the layer's
            relative output error when the group goes from 4 to 8 bits, on calibration rows;
            see docs/SCHEME.md).
        a8_layer_cap: the largest fraction of one input's groups that may be 8-bit (a
            per-layer budget under the global one; 1 = no cap).
        permute: reorder input channels so outlier channels share groups (FMPQ); when False
            the identity order is kept (8-bit groups are then the leading groups by position).
        rotate: rotate every group of activations and weight columns by a 128-point Hadamard
            matrix before quantizing (QuaRot-like; spreads outliers within the group; the
            activation-quantization kernel applies it in registers).
        int_group_scales: the group scales of a weight row, and of a token's 4-bit activation
            groups, are one scale of the row (token) times an integer in [1, 16] instead of
            free values (docs/SCHEME.md, "Integer group scales"): on Hopper the GEMM can then
            sum the 4-bit groups of a row in integer, without a float rescale per group.
            Needs symmetric weights.
        a8_span_scales: with ``int_group_scales``, the 8-bit activation groups of each span of
            16 groups of a token share one scale (their largest absmax / 127) instead of one
            each, so that the Hopper GEMM sums them in int32 too (docs/SCHEME.md).
        kv_bits: KV-cache bits: 4, 8, or 16 (unquantized); asymmetric per token per head.
        k_policy: what to do when a linear's K is not a multiple of ``group_size``: ``pad``
            with zero channels up to the next multiple (stated in the export log and recorded
            per layer), or ``error``.
    """

    name: str = "custom"
    group_size: int = DEFAULT_GROUP_SIZE
    w_bits: int = 4
    w_symmetric: bool = True
    w_method: str = "gptq"
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = True
    w_clip: bool = True
    a_bits: int = 4
    a_high_bits: int = 8
    a8_select: str = "budget"
    a8_budget: float = 0.10
    a8_threshold: float = 8.0
    a8_groups: int = 1
    a8_criterion: str = "absmax"
    a8_layer_cap: float = 1.0
    permute: bool = True
    rotate: bool = False
    int_group_scales: bool = False
    a8_span_scales: bool = False
    kv_bits: int = 4
    k_policy: str = "pad"

    def __post_init__(self) -> None:
        def bad(msg: str) -> CometError:
            return CometError(f"invalid quantization scheme '{self.name}': {msg}")

        gs = self.group_size
        if not isinstance(gs, int) or gs < 16 or gs % 16 != 0:
            raise bad(f"group_size must be a positive multiple of 16 (got {gs!r}); use 128")
        if self.w_bits != 4:
            raise bad(f"w_bits must be 4 (got {self.w_bits!r}); the format stores int4 weights")
        if self.w_method not in WEIGHT_METHODS:
            raise bad(f"w_method must be one of {WEIGHT_METHODS} (got {self.w_method!r})")
        if not 0.0 < self.gptq_damp < 1.0:
            raise bad(f"gptq_damp must be in (0, 1) (got {self.gptq_damp!r})")
        if self.gptq_block < 1:
            raise bad(f"gptq_block must be positive (got {self.gptq_block!r})")
        if self.a_bits not in (4, 8, 16) or self.a_high_bits != 8:
            raise bad("a_bits must be 4, 8 or 16, and a_high_bits 8")
        if self.a8_select not in SELECT_MODES:
            raise bad(f"a8_select must be one of {SELECT_MODES} (got {self.a8_select!r})")
        if not 0.0 <= self.a8_budget <= 1.0:
            raise bad(f"a8_budget is a fraction of groups in [0, 1] (got {self.a8_budget!r})")
        if not self.a8_threshold > 1.0:
            raise bad(f"a8_threshold must be > 1 (got {self.a8_threshold!r})")
        if not isinstance(self.a8_groups, int) or self.a8_groups < 0:
            raise bad(f"a8_groups must be a non-negative integer (got {self.a8_groups!r})")
        if self.a8_criterion not in CRITERIA:
            raise bad(f"a8_criterion must be one of {CRITERIA} (got {self.a8_criterion!r})")
        if self.a8_criterion == "error" and self.a8_select != "budget":
            raise bad("a8_criterion='error' ranks groups for a8_select='budget' only")
        if not 0.0 < self.a8_layer_cap <= 1.0:
            raise bad(f"a8_layer_cap is a fraction in (0, 1] (got {self.a8_layer_cap!r})")
        if self.rotate and gs & (gs - 1):
            raise bad(f"rotate needs a power-of-two group_size (got {gs})")
        if self.int_group_scales and not self.w_symmetric:
            raise bad("int_group_scales needs symmetric weights (w_symmetric=true)")
        if self.int_group_scales and self.a_bits == 8:
            raise bad("int_group_scales applies to 4-bit activation groups; with a_bits=8 "
                      "leave it off")
        if self.a8_span_scales and not self.int_group_scales:
            raise bad("a8_span_scales shares the 8-bit groups' scales for the integer-scale GEMM; "
                      "it needs int_group_scales=true")
        if self.kv_bits not in (4, 8, 16):
            raise bad(f"kv_bits must be 4, 8 or 16 (got {self.kv_bits!r})")
        if self.k_policy not in K_POLICIES:
            raise bad(f"k_policy must be one of {K_POLICIES} (got {self.k_policy!r})")

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < 16

    def kernel_gap(self) -> str | None:
        """Why the W4Ax CUDA kernels cannot run this scheme, or None if they can."""
        if self.group_size != DEFAULT_GROUP_SIZE or not self.w_symmetric or self.a_bits not in (4, 8):
            return (f"the W4Ax kernels take group size {DEFAULT_GROUP_SIZE}, symmetric weights and "
                    f"4/8-bit activations; scheme '{self.name}' runs on the reference path only")
        return None

    @property
    def needs_hessians(self) -> bool:
        return self.w_method == "gptq"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantScheme":
        """Build a scheme from a dict, refusing unknown keys (a newer or edited config)."""
        if not isinstance(data, dict):
            raise CometError("quantization scheme must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CometError(
                f"unknown quantization scheme field(s) {unknown}: the checkpoint was written by "
                "a newer comet-quant or edited by hand; upgrade comet-quant or re-export"
            )
        for f in dataclasses.fields(cls):
            if f.name in data and f.type in ("int", "float", "bool"):
                v = data[f.name]
                ok = {"int": isinstance(v, int) and not isinstance(v, bool),
                      "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                      "bool": isinstance(v, bool)}[f.type]
                if not ok:
                    raise CometError(f"scheme field '{f.name}' must be {f.type} (got {v!r})")
        return cls(**data)

    def replace(self, **changes: Any) -> "QuantScheme":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, QuantScheme] = {}


def register_preset(scheme: QuantScheme) -> QuantScheme:
    PRESETS[scheme.name] = scheme
    return scheme


register_preset(QuantScheme(name="w4ax-kv4"))
register_preset(QuantScheme(name="w4ax-kv4-5", a8_budget=0.05))
register_preset(QuantScheme(name="w4ax-kv4-25", a8_budget=0.25))
register_preset(QuantScheme(name="w4ax-kv4-rtn", w_method="rtn"))
register_preset(QuantScheme(name="w4a8-kv4", a_bits=8, a8_budget=0.0, permute=False))
register_preset(QuantScheme(name="w4a4-rtn", w_method="rtn", a8_budget=0.0, permute=False))
# Baselines in the same harness: Atom keeps a fixed 128 outlier channels per input in 8 bit;
# QuaRot rotates activations (Hadamard) and keeps every group in 4 bit.
register_preset(QuantScheme(name="atom-like", a8_select="fixed", a8_groups=1))
register_preset(QuantScheme(name="quarot-like", rotate=True, permute=False, a8_budget=0.0))
# FMPQ's outlier groups plus the rotation inside every group.
register_preset(QuantScheme(name="w4ax-rot-kv4", rotate=True))
register_preset(QuantScheme(name="w4ax-rot-kv4-25", rotate=True, a8_budget=0.25))
# The fast Hopper path: rotation and integer group scales (the GEMM sums each span of 16 groups
# in int32; with the rotation its accuracy cost was 0.1-1.3% perplexity on SmolLM2, docs/SCHEME.md).
register_preset(QuantScheme(name="w4ax-rot-kv4-int", rotate=True, int_group_scales=True))
# ... and its 8-bit groups summed in int32 too: one scale per span of them (docs/SCHEME.md).
register_preset(QuantScheme(name="w4ax-rot-kv4-int-a8span", rotate=True, int_group_scales=True,
                            a8_span_scales=True))
register_preset(QuantScheme(name="w4a16", a_bits=16, a8_budget=0.0, permute=False, kv_bits=16))
register_preset(QuantScheme(name="w4a16-rtn", w_method="rtn", a_bits=16, a8_budget=0.0,
                            permute=False, kv_bits=16))

DEFAULT_PRESET = "w4ax-kv4"


def get_scheme(name: str, **overrides: Any) -> QuantScheme:
    """The preset called ``name`` with ``overrides`` applied (None values are ignored)."""
    if name not in PRESETS:
        raise CometError(f"unknown scheme '{name}'; choose one of: {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
