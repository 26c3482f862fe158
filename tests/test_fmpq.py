import math

import pytest
import torch

from comet_quant.errors import CometError
from comet_quant.fmpq import padded_k, plan_input, select_groups8
from comet_quant.scheme import get_scheme


def absmax(k, seed=0, n_outliers=10):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(k, generator=g) + 0.5
    a[torch.randperm(k, generator=g)[:n_outliers]] *= 50
    return a


def test_plan_is_sorted_permutation_with_padding_last():
    s = get_scheme("w4ax-kv4")
    a = absmax(576)
    plan = plan_input(a, s)
    assert plan.k == 576 and plan.k_padded == 640 and plan.n_groups == 5
    perm = plan.perm.long()
    assert torch.equal(torch.sort(perm).values, torch.arange(640))
    padded = torch.cat((a, torch.zeros(64)))
    assert (padded[perm][:-1] >= padded[perm][1:]).all()
    assert (perm[-64:] >= 576).all()  # zero padding channels land in the last group
    assert (plan.scores[:-1] >= plan.scores[1:]).all()
    assert plan.scores[0] > 100  # the outlier group stands out


def test_k_policy_error():
    s = get_scheme("w4ax-kv4", k_policy="error")
    with pytest.raises(CometError, match="not a multiple of the group size 128"):
        padded_k(576, s, "layer 0 attn_in")
    assert padded_k(1536, s, "x") == 1536


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.1, 0.25, 1.0])
def test_budget_is_met_exactly(budget):
    s = get_scheme("w4ax-kv4", a8_budget=budget)
    plans = {f"{i}": plan_input(absmax(k, seed=i, n_outliers=i), s)
             for i, k in enumerate([576, 576, 1536, 640, 4096])}
    total = sum(p.n_groups for p in plans.values())
    chosen = select_groups8(plans, s)
    assert sum(p.groups8 for p in chosen.values()) == math.floor(budget * total + 1e-9)
    assert all(0 <= p.groups8 <= p.n_groups for p in chosen.values())


def test_budget_goes_to_strongest_outliers():
    s = get_scheme("w4ax-kv4", a8_budget=0.1)
    plans = {"calm": plan_input(absmax(1024, n_outliers=0), s),
             "wild": plan_input(absmax(1024, n_outliers=40), s)}
    chosen = select_groups8(plans, s)
    assert chosen["wild"].groups8 == 1 and chosen["calm"].groups8 == 0


def test_threshold_mode_respects_threshold_and_cap():
    s = get_scheme("w4ax-kv4", a8_select="threshold", a8_threshold=50.0, a8_budget=1.0)
    plans = {"a": plan_input(absmax(1024, n_outliers=200), s),
             "b": plan_input(absmax(1024, n_outliers=0), s)}
    chosen = select_groups8(plans, s)
    for name, p in chosen.items():
        assert all(float(sc) > 50 for sc in p.scores[: p.groups8])
        assert all(float(sc) <= 50 for sc in p.scores[p.groups8:])
    assert chosen["a"].groups8 >= 1 and chosen["b"].groups8 == 0
    capped = select_groups8(plans, s.replace(a8_budget=0.0))
    assert sum(p.groups8 for p in capped.values()) == 0


def test_no_permute_keeps_identity_and_prefix_selection():
    s = get_scheme("w4ax-kv4", permute=False, a8_budget=0.5)
    plan = plan_input(absmax(512), s)
    assert torch.equal(plan.perm.long(), torch.arange(512))
    assert (plan.scores[:-1] >= plan.scores[1:]).all()
