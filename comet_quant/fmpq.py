"""FMPQ: channel permutation and per-group activation precision, as pure functions.

For each linear input site the channels are sorted by calibration absmax, largest first, so
outlier channels gather in the leading groups of ``group_size`` channels; those leading
groups may get 8-bit activations, all others 4-bit. Because groups are sorted, an input's
groups are ranked by outlier score and a selection is always a prefix: ``groups8`` leading
groups, one boundary at a multiple of the group size, as the GEMM expects.

Selection across a model (:func:`select_groups8`):
- ``budget``: the ``a8_budget`` fraction of all groups of the model (rounded down) goes to
  the groups with the highest outlier scores, wherever they are; an input may get none.
- ``threshold``: every group whose score exceeds ``a8_threshold`` gets 8 bits, highest
  scores first, still capped by ``a8_budget``.
The outlier score of a group is ``(max channel absmax in the group / median channel absmax of
the input) ** 2``: the factor by which its 4-bit quantization step (and so the error
variance) exceeds that of a typical group.

With ``a8_criterion='error'`` budget selection ranks groups by measured gain instead
(:func:`measured_gains`): on calibration rows of the input, the drop of the layer's squared
output error ``||(Q(x) - x) W^T||^2``, relative to its output energy ``||x W^T||^2``, when the
group's activations go from 4 to 8 bits. Because a selection must be a prefix, each input's
gains are replaced by the slopes of the least concave majorant of their running sum (pool
adjacent violators): taking groups in that order is exactly optimal for a prefix-constrained
budget, and ties keep position order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import CometError
from .scheme import QuantScheme


@dataclass(frozen=True)
class InputPlan:
    """The FMPQ plan of one linear input site.

    perm: int32 [k_padded]; permuted channel j reads padded input channel perm[j].
    scores: float32 [k_padded / group_size], non-increasing outlier scores of the groups.
    groups8: the number of leading groups with high-precision activations.
    """

    k: int
    k_padded: int
    perm: torch.Tensor
    scores: torch.Tensor
    groups8: int = 0
    #: float32 [n_groups] measured output-error gains (``a8_criterion='error'``), else None.
    gains: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.scores.numel()


def padded_k(k: int, scheme: QuantScheme, what: str) -> int:
    """``k`` rounded up to the group size, or an error under ``k_policy='error'``."""
    g = scheme.group_size
    if k % g == 0:
        return k
    if scheme.k_policy == "error":
        raise CometError(f"{what} has {k} input channels, not a multiple of the group size {g}; "
                         "use a group size that divides it, or k_policy='pad'")
    return math.ceil(k / g) * g


def plan_input(absmax: torch.Tensor, scheme: QuantScheme, what: str = "input") -> InputPlan:
    """Permutation and group scores for one input from its per-channel absmax (float [K])."""
    k = absmax.numel()
    kp = padded_k(k, scheme, what)
    amax = torch.cat((absmax.float(), absmax.new_zeros(kp - k, dtype=torch.float32)))
    if not torch.isfinite(amax).all():
        raise CometError(f"calibration statistics of {what} contain NaN/inf; re-run calibrate")
    if scheme.permute:
        perm = torch.sort(amax, descending=True, stable=True).indices
    else:
        perm = torch.arange(kp)
    g = scheme.group_size
    group_max = amax[perm].reshape(kp // g, g).amax(-1)
    median = amax[:k].median().clamp_min(1e-12)
    # Sorted channels make scores non-increasing already; without a permutation the running
    # minimum keeps every selection a prefix of leading groups.
    scores = torch.cummin((group_max / median).square(), dim=0).values
    return InputPlan(k=k, k_padded=kp, perm=perm.to(torch.int32), scores=scores)


@torch.no_grad()
def measured_gains(sample: torch.Tensor, weights: list[torch.Tensor], plan: InputPlan,
                   scheme: QuantScheme) -> torch.Tensor:
    """Per-group relative output-error reduction of 8-bit over 4-bit activations.

    Args:
        sample: float [S, K] calibration rows of the input (original channel order).
        weights: the float [N_i, K] weights of every linear reading this input.
    Returns:
        float32 [n_groups], >= 0, in permuted group order.
    """
    from .primitives import dequantize_symmetric, pad_channels, quantize_symmetric, rotate_groups

    g, perm = scheme.group_size, plan.perm.long()
    x = pad_channels(sample.float(), plan.k_padded)[:, perm]
    w = torch.cat([pad_channels(wi.float(), plan.k_padded)[:, perm] for wi in weights])
    if scheme.rotate:
        x, w = rotate_groups(x, g), rotate_groups(w, g)
    ref = (x @ w.t()).square().sum().clamp_min(1e-30)
    errs = []
    for bits in (scheme.a_bits, scheme.a_high_bits):
        int_scales = scheme.int_group_scales and bits == scheme.a_bits
        d = dequantize_symmetric(*quantize_symmetric(x, bits, g, int_scales), g) - x
        errs.append(torch.stack([(d[:, j:j + g] @ w[:, j:j + g].t()).square().sum()
                                 for j in range(0, plan.k_padded, g)]))
    return ((errs[0] - errs[1]).clamp_min(0) / ref).float()


def _prefix_slopes(gains: list[float]) -> list[float]:
    """Slopes of the least concave majorant of ``cumsum(gains)`` (non-increasing)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in gains:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return [s / c for s, c in blocks for _ in range(c)]


def select_groups8(plans: dict[str, InputPlan], scheme: QuantScheme) -> dict[str, InputPlan]:
    """Assign ``groups8`` to every plan under the scheme's global budget (see module doc)."""
    from dataclasses import replace

    if scheme.a_bits >= scheme.a_high_bits:
        return plans
    if scheme.a8_select == "fixed":
        return {name: replace(p, groups8=min(scheme.a8_groups, p.n_groups)) for name, p in plans.items()}
    total = sum(p.n_groups for p in plans.values())
    budget = int(math.floor(scheme.a8_budget * total + 1e-9))
    if scheme.a8_criterion == "error":
        missing = [name for name, p in plans.items() if p.gains is None]
        if missing:
            raise CometError(f"a8_criterion='error' needs measured gains; input {missing[0]} has none")
        ranked = {name: _prefix_slopes(p.gains.tolist()) for name, p in plans.items()}
    else:
        ranked = {name: p.scores.tolist() for name, p in plans.items()}
    cands = [(float(s), name, j) for name, r in ranked.items() for j, s in enumerate(r)]
    if scheme.a8_select == "threshold":
        cands = [c for c in cands if c[0] > scheme.a8_threshold]
    # Highest score first; ties broken by position so each input's choice stays a prefix.
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    cap = {name: int(math.floor(scheme.a8_layer_cap * p.n_groups + 1e-9)) for name, p in plans.items()}
    counts = dict.fromkeys(plans, 0)
    taken = 0
    for _, name, _ in cands:
        if taken == budget:
            break
        if counts[name] < cap[name]:
            counts[name] += 1
            taken += 1
    return {name: replace(p, groups8=counts[name]) for name, p in plans.items()}
