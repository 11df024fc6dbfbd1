"""Property-based tests: random inputs the hand-written tests never try.

The search feeds the library genomes and budgets it has never seen, and users feed it
configs with every kind of mistake. Example-based tests pin a few known points; these
properties (hypothesis) sweep the space around them:

- any genome with genes in (0, 1] at any budget in (0, 1] either is refused with a
  ``BudgetError`` exactly when the budget is unreachable, or repairs to a student that meets
  the budget, respects the width rules, builds, runs, and inherits the teacher's weights
  with matching shapes (and at ratio 1.0 reproduces the teacher bit for bit);
- any config dict either validates or raises a one-line ``ConfigError`` that names a field
  the user can find (a real key, an unknown key they wrote, or ``config``).

Settings are derandomized with no example database, so CI sees the same examples every run,
and example counts are kept small so the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from torch import nn

from casd_ray import errors
from casd_ray.config import ExperimentConfig
from casd_ray.config_file import validate_config
from casd_ray.errors import ConfigError
from casd_ray.models.family import build_model, flops, params, spec_for
from casd_ray.widths import inherit, space

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
METRIC_FNS = {"flops": flops, "params": params}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- width genomes

# Genes and targets anywhere in (0, 1]. Subnormal floats are left out: they are valid
# ratios, but 1/r overflows inside repair's breakpoint maths (a harmless RuntimeWarning).
RATIO = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=False)


@st.composite
def candidates(draw, archs):
    """A teacher shape, a genome for it, and repair/inherit settings."""
    arch = draw(st.sampled_from(archs))
    spec = spec_for(
        arch,
        in_channels=draw(st.integers(1, 3)),
        num_classes=draw(st.integers(1, 10)),
        image_size=(draw(st.integers(4, 16)), draw(st.integers(4, 16))),
        width=draw(st.integers(4, 8)),
    )
    granularity = draw(st.sampled_from(space.GRANULARITIES))
    genes = space.gene_names(spec, granularity)
    genome = {g: draw(RATIO) for g in genes}
    metric = draw(st.sampled_from(sorted(METRIC_FNS)))
    min_channels = draw(st.integers(1, 4))
    divisible_by = draw(st.integers(1, 4))
    # Targets anywhere in (0, 1], but also on both sides of the smallest reachable ratio
    # and spread over the reachable range, where a bare float draw rarely lands.
    low = space.smallest_ratio(spec, metric, min_channels=min_channels, divisible_by=divisible_by)
    target = draw(
        st.one_of(
            RATIO,
            st.floats(0.0, 1.0).map(lambda u: min(1.0, low + u * (1.0 - low))),
            st.sampled_from([low, math.nextafter(low, 0.0)]),
        )
    )
    return {
        "spec": spec,
        "granularity": granularity,
        "genome": genome,
        "target": target,
        "metric": metric,
        "min_channels": min_channels,
        "divisible_by": divisible_by,
        "criterion": draw(st.sampled_from(["l1", "bn_gamma"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _teacher(spec, seed):
    """The teacher network with random BN affine/statistics, so no importance ties."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batch(spec, n=2):
    return torch.randn(n, spec.in_channels, *spec.image_size)


def _widths(spec):
    """Every searched width (streams and inner convs), in a fixed order."""
    return [*spec.stages, *(w for stage in spec.blocks for blk in stage for w in blk)]


def _repair(case, **overrides):
    kw = {k: case[k] for k in ("target", "metric", "min_channels", "divisible_by")}
    kw.update(overrides)
    return space.repair(case["spec"], case["granularity"], case["genome"], **kw)


def _check_candidate(case):
    teacher_spec = case["spec"]
    metric, target = case["metric"], case["target"]
    m, d = case["min_channels"], case["divisible_by"]
    low = space.smallest_ratio(teacher_spec, metric, min_channels=m, divisible_by=d)
    try:
        student, scale = _repair(case)
    except errors.BudgetError as err:
        assert str(err).startswith("space.budget.target")
        assert target < low
        return
    assert target >= low, "repair met a budget below the smallest reachable ratio"

    # the budget is met, by the library's own ratio and by the cost model directly
    fn = METRIC_FNS[metric]
    assert space.cost_ratio(student, teacher_spec, metric) <= target
    assert fn(student) / fn(teacher_spec) <= target

    # width rules: within [1, teacher], multiples of divisible_by unless kept whole
    for w, tw in zip(_widths(student), _widths(teacher_spec), strict=True):
        assert 1 <= w <= tw
        assert w >= min(m, tw)
        assert w == tw or w % d == 0, (w, tw, d)
    assert len(student.blocks) == len(teacher_spec.blocks)
    assert [len(s) for s in student.blocks] == [len(s) for s in teacher_spec.blocks]
    if teacher_spec.block == "bottleneck":
        assert student.stem == teacher_spec.stem
    else:
        assert student.stem == student.stages[0]

    # the scale it reports rebuilds the same student
    ratios = space.ratios_from_genome(teacher_spec, case["granularity"], case["genome"])
    rebuilt = space.widths_from_ratios(
        teacher_spec, space.scaled_ratios(ratios, scale), min_channels=m, divisible_by=d
    )
    assert rebuilt == student

    # a fresh student builds and runs
    torch.manual_seed(case["seed"])
    x = _batch(teacher_spec)
    fresh = build_model(student).eval()
    with torch.no_grad():
        y = fresh(x)
    assert y.shape == (2, teacher_spec.num_classes)
    assert torch.isfinite(y).all()

    # an inherited student has the built student's exact tensor shapes and runs
    teacher = _teacher(teacher_spec, case["seed"])
    inherited = inherit.inherit(teacher, teacher_spec, student, criterion=case["criterion"])
    assert inherited.training == teacher.training
    got = {k: tuple(v.shape) for k, v in inherited.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    assert got == want
    with torch.no_grad():
        y = inherited(x)
    assert y.shape == (2, teacher_spec.num_classes)
    assert torch.isfinite(y).all()

    # the classifier keeps a subset of the teacher's input columns, in the original order
    t_fc, s_fc = teacher.fc.weight.detach(), inherited.fc.weight.detach()
    cols = []
    for j in range(s_fc.shape[1]):
        hits = [i for i in range(t_fc.shape[1]) if torch.equal(t_fc[:, i], s_fc[:, j])]
        assert hits, f"fc column {j} is no teacher column"
        cols.append(hits[0])
    assert cols == sorted(set(cols))
    assert torch.equal(inherited.fc.bias, teacher.fc.bias)


@SETTINGS
@given(case=candidates(["resnet8", "resnet20"]))
def test_random_genome_repairs_builds_and_inherits(case):
    _check_candidate(case)


@settings(SETTINGS, max_examples=8)
@given(case=candidates(["resnet164"]))
def test_random_genome_repairs_builds_and_inherits_resnet164(case):
    _check_candidate(case)


@settings(SETTINGS, max_examples=20)
@given(case=candidates(["resnet8", "resnet20", "resnet20", "resnet164"]))
def test_full_budget_is_the_teacher_and_inherit_reproduces_it(case):
    spec = case["spec"]
    # target 1.0 keeps the whole teacher whatever the genome's shape ...
    student, _ = _repair(case, target=1.0)
    assert student == spec
    # ... and so does the all-ones genome
    ones = space.uniform_genome(spec, case["granularity"], 1.0)
    student, _ = space.repair(
        spec,
        case["granularity"],
        ones,
        target=1.0,
        metric=case["metric"],
        min_channels=case["min_channels"],
        divisible_by=case["divisible_by"],
    )
    assert student == spec
    teacher = _teacher(spec, case["seed"])
    inherited = inherit.inherit(teacher, spec, student, criterion=case["criterion"]).eval()
    x = _batch(spec)
    with torch.no_grad():
        assert torch.equal(inherited(x), teacher(x))


@settings(SETTINGS, max_examples=60)
@given(case=candidates(["resnet8", "resnet20"]), other=RATIO)
def test_larger_budget_never_gives_a_cheaper_student(case, other):
    low_t, high_t = sorted((case["target"], other))
    low = space.smallest_ratio(
        case["spec"],
        case["metric"],
        min_channels=case["min_channels"],
        divisible_by=case["divisible_by"],
    )
    if low_t < low:  # unreachable: refused (checked in the tests above)
        low_t = low
    small, _ = _repair(case, target=low_t)
    large, _ = _repair(case, target=max(high_t, low_t))
    metric = case["metric"]
    small_r = space.cost_ratio(small, case["spec"], metric)
    large_r = space.cost_ratio(large, case["spec"], metric)
    assert small_r <= large_r <= max(high_t, low_t)
    # one global scale per genome: every group only grows with the budget
    assert all(a <= b for a, b in zip(_widths(small), _widths(large), strict=True))


@settings(SETTINGS, max_examples=60)
@given(data=st.data(), min_channels=st.integers(1, 6), divisible_by=st.integers(1, 6))
def test_widths_from_ratios_respects_the_width_rules(data, min_channels, divisible_by):
    spec = spec_for(data.draw(st.sampled_from(["resnet8", "resnet20"])), width=8)
    names = space.group_names(spec)
    ratios = {n: data.draw(RATIO, label=n) for n in names}
    student = space.widths_from_ratios(
        spec, ratios, min_channels=min_channels, divisible_by=divisible_by
    )
    lowest = -(-min_channels // divisible_by) * divisible_by
    teacher_w = dict(zip(names, _widths(spec), strict=True))
    for name, w in zip(names, _widths(student), strict=True):
        tw = teacher_w[name]
        assert 1 <= w <= tw
        if ratios[name] == 1.0:
            assert w == tw
        else:
            assert w == tw or w % divisible_by == 0
            assert w >= min(lowest, tw)
            # round half up to the multiple of divisible_by nearest ratio * width
            nearest = math.floor(ratios[name] * tw / divisible_by + 0.5) * divisible_by
            assert w == min(max(nearest, lowest), tw)


# --------------------------------------------------------------------------- configs

# Vocabulary read from casd_ray/config.py: real sections, their fields, and a few values
# that are valid for each field on their own and together (no cross-field conflicts).
GOOD = {
    "data": {
        "dataset": ["cifar10", "cifar100", "fashion_mnist", "imagefolder"],
        "root": [None, "/tmp/data"],
        "download": [False, True],
        "val_size": [10, 500],
        "train_subset": [None, 1000],
        "test_subset": [None, 100],
    },
    "model": {"arch": ["resnet8", "resnet20", "resnet164"], "width": [4, 16]},
    "teacher": {
        "checkpoint": [None],
        "epochs": [1, 30],
        "batch_size": [32, 128],
        "lr": [0.1, 0.01],
        "momentum": [0.0, 0.9],
        "nesterov": [True, False],
        "weight_decay": [0.0, 5e-4],
        "warmup_epochs": [0],
        "label_smoothing": [0.0, 0.1],
    },
    "space": {
        "granularity": ["stage", "block", "layer"],
        "min_ratio": [0.1, 0.25],
        "max_ratio": [0.5, 1.0],
        "min_channels": [1, 4],
        "divisible_by": [1, 8],
        "importance": ["l1", "bn_gamma"],
        "repair": [True, False],
        "budget": [{"metric": "flops", "target": 0.5}, {"metric": "params", "target": 1.0}],
    },
    "distill": {
        "temperature": [1.0, 4.0],
        "alpha": [0.0, 0.9, 1.0],
        "bn_recalibration_batches": [0, 4],
    },
    "search": {
        "algorithm": ["optuna-tpe", "optuna-nsga2", "evolution", "random"],
        "num_samples": [1, 16],
        "max_epochs": [1, 4],
        "train_subset": [None, 1000],
        "batch_size": [32, 128],
        "lr": [0.05],
        "momentum": [0.9],
        "weight_decay": [5e-4],
        "scheduler": ["asha", "fifo"],
        "grace_period": [1],
        "reduction_factor": [2.0, 3.0],
        "cpus_per_trial": [1.0, 0.5],
        "gpus_per_trial": [0.0, 1.0],
        "max_concurrent": [1, 2],
        "max_failures": [0, 2],
        "population": [8, 16],
        "sample_size": [1, 3],
        "mutation_genes": [1, 2],
        "amp": [True, False],
    },
    "finetune": {
        "epochs": [1, 10],
        "batch_size": [32, 128],
        "lr": [0.05],
        "momentum": [0.9],
        "weight_decay": [5e-4],
        "warmup_epochs": [0],
    },
}
GOOD_BUDGET = {"metric": ["flops", "params"], "target": [0.25, 0.5, 1.0]}
GOOD_TOP = {"name": ["quick", "run-1"], "seed": [0, 7], "output_dir": ["runs", "/tmp/out"]}

# Unknown keys: identifier-like, as YAML configs write them (no ':' or '.', which would make
# the "field: message" format ambiguous to parse), or non-string keys YAML can produce.
KEY = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz_0123456789-", min_size=1, max_size=8),
    st.sampled_from(sorted({k for fields in GOOD.values() for k in fields} | set(GOOD))),
    st.integers(-3, 3),
    st.none(),
)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**64, -(2**64), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.5, math.nan, math.inf, -math.inf, 1e-300]),
    st.text(max_size=12),
    st.sampled_from(["", "resnet20", "flops", "stage", "1", "0.5", "yes", "../x", "a/b"]),
)
# mostly scalars, sometimes a (nested) list or mapping where a scalar or section belongs
JUNK = st.one_of(
    SCALAR,
    st.recursive(
        SCALAR,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(KEY, inner, max_size=3)
        ),
        max_leaves=6,
    ),
)


def _mostly(good, bad, one_in):
    """``bad`` one time in ``one_in``, else ``good`` (st.one_of would weigh them by branch
    count), so a config usually holds a mistake or two and sometimes none."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


def _value(good):
    return _mostly(st.sampled_from(good), JUNK, 8)


def _section(name):
    fields = {}
    for key, good in GOOD[name].items():
        if name == "space" and key == "budget":
            budget = st.fixed_dictionaries(
                {}, optional={k: _value(v) for k, v in GOOD_BUDGET.items()}
            )
            fields[key] = _mostly(budget, JUNK, 8)
        else:
            fields[key] = _value(good)
    body = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(KEY, JUNK, min_size=1, max_size=1)
    with_extra = st.builds(lambda b, e: {**b, **e}, body, extra)
    return _mostly(_mostly(body, with_extra, 6), JUNK, 10)


RAW_CONFIG = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {},
        optional={
            **{k: _value(v) for k, v in GOOD_TOP.items()},
            **{name: _section(name) for name in GOOD},
        },
    ),
    _mostly(st.just({}), st.dictionaries(KEY, JUNK, min_size=1, max_size=2), 6),
)


def _good_section(name, fields):
    return st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in fields.items()})


GOOD_CONFIG = st.fixed_dictionaries(
    {},
    optional={
        **{k: st.sampled_from(v) for k, v in GOOD_TOP.items()},
        **{name: _good_section(name, fields) for name, fields in GOOD.items()},
    },
)


def _section_fields(top):
    """Field names of the section model behind top-level key ``top`` (empty if none)."""
    field = ExperimentConfig.model_fields.get(top)
    ann = getattr(field, "annotation", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return set(ann.model_fields)
    return set()


@settings(SETTINGS, max_examples=300)
@given(raw=RAW_CONFIG)
def test_random_config_validates_or_names_a_field(raw):
    try:
        cfg = validate_config(raw)
    except ConfigError as err:
        msg = str(err)
        assert len(msg.splitlines()) == 1, msg
        path, sep, _ = msg.partition(":")
        assert sep and path, msg
        parts = path.split(".")
        tops = set(ExperimentConfig.model_fields) | {str(k) for k in raw} | {"config"}
        assert parts[0] in tops, msg
        # below a real section, the next part is one of its fields or a key the user wrote
        section = raw.get(parts[0])
        if len(parts) > 1 and isinstance(section, dict) and _section_fields(parts[0]):
            assert parts[1] in _section_fields(parts[0]) | {str(k) for k in section}, msg
    else:
        assert isinstance(cfg, ExperimentConfig)
        assert validate_config(cfg.model_dump()) == cfg


@settings(SETTINGS, max_examples=60)
@given(raw=GOOD_CONFIG)
def test_valid_config_validates_and_round_trips(raw):
    cfg = validate_config(raw)
    for key, value in raw.items():
        if isinstance(value, dict):
            section = getattr(cfg, key)
            for field, v in value.items():
                got = getattr(section, field)
                got = got.model_dump() if isinstance(got, BaseModel) else got
                assert _as_written(got, v) == v
        else:
            assert getattr(cfg, key) == value
    assert validate_config(cfg.model_dump()) == cfg


def _as_written(got, written):
    """``got`` restricted to the keys the user wrote (a sub-section keeps its defaults)."""
    if isinstance(got, dict) and isinstance(written, dict):
        return {k: _as_written(got.get(k), w) for k, w in written.items()}
    return got
