"""The no-search global-ranking baseline: meets the budget tightly, removes the globally least
important channels, honours rounding, refuses unreachable budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casd_ray import errors
from casd_ray.models.family import build_model, group_widths, spec_for, with_group_widths
from casd_ray.models.resnet_family import wiring
from casd_ray.widths import space
from casd_ray.widths.baselines import global_order, global_ranking_spec
from casd_ray.widths.inherit import inherit

SPEC = spec_for("resnet20", width=8)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = build_model(SPEC)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    return model.eval()


@pytest.mark.parametrize("criterion", ["bn_gamma", "l1"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_budget_met_tightly_by_the_globally_least_important(teacher, criterion, target):
    student = global_ranking_spec(teacher, SPEC, target=target, criterion=criterion)
    assert space.cost_ratio(student, SPEC, "flops") <= target
    names, owner = global_order(teacher, SPEC, criterion)
    full, got = group_widths(SPEC), group_widths(student)
    removed = np.array([full[n] - got[n] for n in names])
    k = int(removed.sum())
    assert (removed == np.bincount(owner[:k], minlength=len(names))).all()
    one_fewer = np.bincount(owner[: k - 1], minlength=len(names))
    wider = {n: full[n] - int(r) for n, r in zip(names, one_fewer, strict=True)}
    assert space.cost_ratio(with_group_widths(SPEC, wider), SPEC, "flops") > target


def test_unimportant_group_is_pruned_first(teacher):
    model = build_model(SPEC)
    model.load_state_dict(teacher.state_dict())
    for bn in wiring(SPEC).readers["stage1"]:  # every BN reading stage 1's stream
        dict(model.named_modules())[bn].weight.data.mul_(1e-3)
    student = global_ranking_spec(model, SPEC, target=0.7, criterion="bn_gamma")
    widths = group_widths(student)
    assert widths["stage1"] == 1  # the whole stream first (min_channels=1)
    assert widths["stage0"] == SPEC.stages[0]  # the important rest untouched at this budget


def test_rounding_and_the_student_builds(teacher):
    student = global_ranking_spec(teacher, SPEC, target=0.5, divisible_by=4, min_channels=4)
    full = group_widths(SPEC)
    for name, w in group_widths(student).items():
        assert w == full[name] or (w % 4 == 0 and w >= 4), (name, w)
    out = inherit(teacher, SPEC, student, criterion="bn_gamma")(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_unreachable_budget(teacher):
    with pytest.raises(errors.BudgetError, match="space.budget.target"):
        global_ranking_spec(teacher, SPEC, target=1e-4)


def test_a_cost_ratio_of_its_own_ranks_alike(teacher):
    """``ratio_fn`` (a latency model's prediction) replaces the analytic cost: given the
    analytic FLOPs ratio itself it finds the same network, and it refuses a target below
    the smallest network's ratio in one line."""
    flops = lambda s: space.cost_ratio(s, SPEC, "flops")  # noqa: E731
    for target in (0.3, 0.6):
        assert global_ranking_spec(teacher, SPEC, target=target, ratio_fn=flops) == (
            global_ranking_spec(teacher, SPEC, target=target)
        )
    with pytest.raises(errors.BudgetError) as err:
        global_ranking_spec(teacher, SPEC, target=1e-4, metric="latency", ratio_fn=flops)
    assert str(err.value).startswith("space.budget.target: ") and "\n" not in str(err.value)
