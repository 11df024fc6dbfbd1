"""Weight inheritance: exact at ratio 1.0, consistent slicing at any widths, useful when pruned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from casd_ray.models.family import build_model, group_widths, spec_for
from casd_ray.train.bn import recalibrate_bn
from casd_ray.widths import inherit, space

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(arch: str, image: int = 16, seed: int = 0, width: int = 16):
    """A teacher with random BN affine and running stats, so identity checks are not trivial."""
    torch.manual_seed(seed)
    spec = spec_for(arch, image_size=(image, image), width=width)
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.fc.bias.data.normal_(0, 0.1)
    return model.eval(), spec


@pytest.mark.parametrize("arch", ["resnet20", "resnet164"])
@pytest.mark.parametrize("criterion", ["l1", "bn_gamma"])
def test_ratio_one_reproduces_teacher(arch, criterion):
    teacher, spec = _teacher(arch)
    ones = space.ratios_from_genome(spec, "layer", space.uniform_genome(spec, "layer", 1.0))
    student_spec = space.widths_from_ratios(spec, ones)
    assert student_spec == spec
    student = inherit.inherit(teacher, spec, student_spec, criterion)
    assert not student.training
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (student(x) - teacher(x)).abs().max().item() <= 1e-5
    mine, theirs = student.state_dict(), teacher.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("arch", ["resnet20", "resnet164"])
@pytest.mark.parametrize("granularity", space.GRANULARITIES)
def test_pruned_student_has_right_shapes_and_runs(arch, granularity):
    teacher, spec = _teacher(arch)
    genome = {
        n: 0.3 + 0.7 * ((i * 37) % 11) / 10
        for i, n in enumerate(space.gene_names(spec, granularity))
    }
    student_spec, _ = space.repair(spec, granularity, genome, target=0.5)
    assert student_spec != spec
    student = inherit.inherit(teacher, spec, student_spec)
    fresh = build_model(student_spec).state_dict()
    for key, t in student.state_dict().items():
        assert t.shape == fresh[key].shape, key
    # the inherited tensors are exactly the teacher's rows/columns at the kept indices
    keep = inherit.kept_indices(teacher, spec, student_spec)
    w_teacher = teacher.stages[1][0].conv1.weight
    w_student = student.stages[1][0].conv1.weight
    cin = keep["stage0"]
    cout = keep["stage1.block0.conv1"]
    assert torch.equal(w_student, w_teacher[cout][:, cin])
    assert torch.equal(student.fc.weight, teacher.fc.weight[:, keep["stage2"]])
    assert torch.equal(student.bn.running_var, teacher.bn.running_var[keep["stage2"]])
    out = student(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["resnet20", "resnet164"])
def test_one_channel_everywhere_builds_inherits_and_runs(arch):
    teacher, spec = _teacher(arch)
    thin = space.widths_from_ratios(spec, dict.fromkeys(group_widths(spec), 1e-9))
    assert set(group_widths(thin).values()) == {1}
    student = inherit.inherit(teacher, spec, thin, "bn_gamma")
    out = student(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_kept_channels_are_the_most_important_in_original_order():
    teacher, spec = _teacher("resnet20")
    # Make channels 13, 2, 7 of stage1.block1.conv1 clearly the largest filters.
    conv = teacher.stages[1][1].conv1
    with torch.no_grad():
        conv.weight.mul_(0.01)
        for rank, c in enumerate((13, 2, 7)):
            conv.weight[c] = 10.0 + rank
    student_spec = space.widths_from_ratios(spec, {"stage1.block1.conv1": 3 / 32})
    assert student_spec.blocks[1][1] == (3,)
    keep = inherit.kept_indices(teacher, spec, student_spec, "l1")
    assert keep["stage1.block1.conv1"].tolist() == [2, 7, 13]
    student = inherit.inherit(teacher, spec, student_spec)
    assert torch.equal(student.stages[1][1].conv1.weight, conv.weight[[2, 7, 13]])
    assert torch.equal(student.stages[1][1].bn2.weight, teacher.stages[1][1].bn2.weight[[2, 7, 13]])
    # bn_gamma reads the BN after the conv instead
    with torch.no_grad():
        teacher.stages[1][1].bn2.weight.fill_(0.1)
        teacher.stages[1][1].bn2.weight[[30, 0, 4]] = 5.0
    keep = inherit.kept_indices(teacher, spec, student_spec, "bn_gamma")
    assert keep["stage1.block1.conv1"].tolist() == [0, 4, 30]


def test_stream_importance_sums_every_writer():
    teacher, spec = _teacher("resnet164")
    imp = inherit.channel_importance(teacher, spec, "l1")
    stage1 = teacher.stages[1]
    writers = [stage1[0].shortcut] + [blk.conv3 for blk in stage1]
    expected = sum(m.weight.detach().abs().sum(dim=(1, 2, 3)) for m in writers)
    assert torch.allclose(imp["stage1"], expected)
    assert len(imp) == 111 and all(
        v.shape == (w,) for v, w in zip(imp.values(), group_widths(spec).values(), strict=True)
    )
    gamma = inherit.channel_importance(teacher, spec, "bn_gamma")
    readers = [blk.bn1 for blk in stage1[1:]] + [teacher.stages[2][0].bn1]
    assert torch.allclose(gamma["stage1"], sum(m.weight.detach().abs() for m in readers))
    last = [blk.bn1 for blk in teacher.stages[2][1:]] + [teacher.bn]
    assert torch.allclose(gamma["stage2"], sum(m.weight.detach().abs() for m in last))
    inner = teacher.stages[0][3].bn3.weight.detach().abs()
    assert torch.equal(gamma["stage0.block3.conv2"], inner)
    with pytest.raises(ValueError, match="importance"):
        inherit.channel_importance(teacher, spec, "random")


def test_incompatible_student_is_refused():
    teacher, spec = _teacher("resnet20")
    with pytest.raises(ValueError, match="depth"):
        inherit.inherit(teacher, spec, spec_for("resnet32", image_size=(16, 16)))
    with pytest.raises(ValueError, match="wider"):
        inherit.inherit(teacher, spec, spec_for("resnet20", image_size=(16, 16), width=32))


def test_recalibrate_bn_matches_batch_statistics_and_restores_state():
    teacher, _ = _teacher("resnet20")
    bn = teacher.stages[0][0].bn1  # reads the stem output
    momentum = bn.momentum
    batches = [torch.randn(32, 3, 16, 16) + i for i in range(3)]
    recalibrate_bn(teacher, ((x, None) for x in batches), num_batches=2)
    with torch.no_grad():
        feats = [teacher.stem(x) for x in batches[:2]]
    # momentum None = exact average of the per-batch means (unbiased var likewise)
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-4)
    assert bn.momentum == momentum and not teacher.training
    assert all(not m.training for m in teacher.modules())
    # no batches: statistics untouched (never reset to empty)
    before = bn.running_mean.clone()
    recalibrate_bn(teacher, [], num_batches=4)
    assert torch.equal(bn.running_mean, before)


def _synthetic(n: int, seed: int, templates: torch.Tensor):
    """Ten classes, each a fixed random 3x8x8 pattern plus heavy pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, templates.shape[0], (n,), generator=g)
    return templates[y] + torch.randn(n, *templates.shape[1:], generator=g), y


def test_inherited_student_beats_random_init_on_a_trained_teacher():
    templates = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_train, y_train = _synthetic(4096, 1, templates)
    x_test, y_test = _synthetic(1024, 2, templates)
    torch.manual_seed(0)
    spec = spec_for("resnet8", image_size=(8, 8), width=8)
    teacher = build_model(spec)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(200):
        i = torch.randint(0, len(x_train), (64,))
        loss = nn.functional.cross_entropy(teacher(x_train[i]), y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()

    @torch.no_grad()
    def accuracy(model):
        return (model(x_test).argmax(1) == y_test).float().mean().item()

    assert accuracy(teacher) > 0.9
    student_spec, _ = space.repair(spec, "layer", space.uniform_genome(spec, "layer"), target=0.5)
    assert 0.4 < space.cost_ratio(student_spec, spec, "flops") <= 0.5
    batches = [x_train[k : k + 128] for k in range(0, 1024, 128)]
    for criterion in ("l1", "bn_gamma"):
        inherited = inherit.inherit(teacher, spec, student_spec, criterion)
        recalibrate_bn(inherited, batches, num_batches=8)
        random_init = build_model(student_spec).eval()
        recalibrate_bn(random_init, batches, num_batches=8)
        assert accuracy(inherited) > accuracy(random_init) + 0.3, criterion


@pytest.mark.cuda
def test_inherit_on_cuda_keeps_device_and_identity():
    teacher, spec = _teacher("resnet20")
    teacher = teacher.cuda()
    student = inherit.inherit(teacher, spec, spec)
    assert next(student.parameters()).is_cuda
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.no_grad():
        assert (student(x) - teacher(x)).abs().max().item() <= 1e-5
    half, _ = space.repair(spec, "stage", space.uniform_genome(spec, "stage"), target=0.5)
    pruned = inherit.inherit(teacher, spec, half)
    recalibrate_bn(pruned, [x], num_batches=1)
    assert pruned(x).shape == (4, 10)
