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


def _site(k=512, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(384, k, generator=g)
    x[:, 64:128] *= 40                 # outliers that matter
    x[:, :64] *= 60                    # larger outliers whose weight columns are ~0
    w = torch.randn(n, k, generator=g)
    w[:, :64] *= 1e-4
    return x, w


def test_measured_gains_match_fake_quant_and_prefer_harmful_outliers():
    from comet_quant.fmpq import measured_gains
    from comet_quant.primitives import fake_quantize_activation, pad_channels

    s = get_scheme("w4ax-kv4", a8_criterion="error", group_size=64)
    x, w = _site()
    plan = plan_input(x.abs().amax(0), s)
    gains = measured_gains(x, [w[:40], w[40:]], plan, s)
    assert gains.shape == (plan.n_groups,) and (gains >= 0).all()
    # Independent check with the kernels' reference numerics: output error of all-4-bit
    # minus all-8-bit activations, restricted to one group at a time.
    perm = plan.perm.long()
    xp = pad_channels(x, plan.k_padded)[:, perm]
    wp = pad_channels(w, plan.k_padded)[:, perm]
    d = {g8: fake_quantize_activation(x, plan.perm, g8, 64, 4, 8) - xp for g8 in (0, plan.n_groups)}
    ref = (xp @ wp.t()).square().sum()
    for j in range(plan.n_groups):
        sl = slice(64 * j, 64 * (j + 1))
        e4 = (d[0][:, sl] @ wp[:, sl].t()).square().sum()
        e8 = (d[plan.n_groups][:, sl] @ wp[:, sl].t()).square().sum()
        assert math.isclose(float(gains[j]), max(0.0, float((e4 - e8) / ref)), rel_tol=1e-3, abs_tol=1e-9)
    # Absmax ranks the harmless (zero-weight) outliers first; the measured gain does not.
    assert gains[0] < gains[1] and plan.scores[0] >= plan.scores[1]


def test_error_criterion_lowers_output_error_at_equal_budget():
    from dataclasses import replace

    from comet_quant.fmpq import measured_gains
    from comet_quant.primitives import fake_quantize_activation, pad_channels

    s_abs = get_scheme("w4ax-kv4", a8_budget=0.125, group_size=64)
    s_err = s_abs.replace(a8_criterion="error")
    sites = {str(i): _site(seed=i) for i in range(2)}
    plans = {}
    for name, (x, w) in sites.items():
        p = plan_input(x.abs().amax(0), s_err)
        plans[name] = replace(p, gains=measured_gains(x, [w], p, s_err))

    def total_error(chosen):
        tot = 0.0
        for name, (x, w) in sites.items():
            p = chosen[name]
            xq = fake_quantize_activation(x, p.perm, p.groups8, 64, 4, 8)
            wp = pad_channels(w, p.k_padded)[:, p.perm.long()]
            tot += float((xq @ wp.t() - x @ w.t()).square().sum() / (x @ w.t()).square().sum())
        return tot

    by_abs, by_err = select_groups8(plans, s_abs), select_groups8(plans, s_err)
    assert sum(p.groups8 for p in by_err.values()) == sum(p.groups8 for p in by_abs.values()) == 2
    assert total_error(by_err) < 0.9 * total_error(by_abs)


def test_prefix_slopes_are_the_concave_majorant():
    from comet_quant.fmpq import _prefix_slopes

    gains = [1.0, 5.0, 0.5, 0.5, 3.0, 0.0]
    slopes = _prefix_slopes(gains)
    assert slopes == [3.0, 3.0, 4.0 / 3, 4.0 / 3, 4.0 / 3, 0.0]
    assert all(a >= b for a, b in zip(slopes, slopes[1:]))
    assert math.isclose(sum(slopes), sum(gains))


@pytest.mark.parametrize("criterion", ["absmax", "error"])
def test_layer_cap_under_global_budget(criterion):
    from dataclasses import replace

    s = get_scheme("w4ax-kv4", a8_budget=0.25, a8_layer_cap=0.25, a8_criterion=criterion)
    plans = {"wild": plan_input(absmax(2048, n_outliers=1000), s),
             "calm": plan_input(absmax(2048, seed=1, n_outliers=0), s)}
    plans = {n: replace(p, gains=p.scores / 1000) for n, p in plans.items()}
    chosen = select_groups8(plans, s)
    assert chosen["wild"].groups8 == 4 and chosen["calm"].groups8 == 4  # 16 groups each, cap 4
    uncapped = select_groups8(plans, s.replace(a8_layer_cap=1.0))
    assert uncapped["wild"].groups8 > 4
    assert sum(p.groups8 for p in uncapped.values()) == 8


def test_error_criterion_needs_gains_and_budget_mode():
    s = get_scheme("w4ax-kv4", a8_criterion="error")
    with pytest.raises(CometError, match="needs measured gains"):
        select_groups8({"a": plan_input(absmax(512), s)}, s)
    with pytest.raises(CometError, match="a8_select='budget' only"):
        get_scheme("w4ax-kv4", a8_criterion="error", a8_select="threshold")
    with pytest.raises(CometError, match="a8_layer_cap"):
        get_scheme("w4ax-kv4", a8_layer_cap=0.0)
