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


def select_groups8(plans: dict[str, InputPlan], scheme: QuantScheme) -> dict[str, InputPlan]:
    """Assign ``groups8`` to every plan under the scheme's global budget (see module doc)."""
    from dataclasses import replace

    if scheme.a_bits >= scheme.a_high_bits:
        return plans
    if scheme.a8_select == "fixed":
        return {name: replace(p, groups8=min(scheme.a8_groups, p.n_groups)) for name, p in plans.items()}
    total = sum(p.n_groups for p in plans.values())
    budget = int(math.floor(scheme.a8_budget * total + 1e-9))
    cands = [(float(s), name, j) for name, p in plans.items() for j, s in enumerate(p.scores.tolist())]
    if scheme.a8_select == "threshold":
        cands = [c for c in cands if c[0] > scheme.a8_threshold]
    # Highest score first; ties broken by position so each input's choice stays a prefix.
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    counts = dict.fromkeys(plans, 0)
    for _, name, _ in cands[:budget]:
        counts[name] += 1
    return {name: replace(p, groups8=counts[name]) for name, p in plans.items()}
