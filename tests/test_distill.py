"""Distillation loss, optimiser/schedule and the shared training loop, on tiny real models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from casd_ray.data.batches import Batching
from casd_ray.models.family import build_model, spec_for
from casd_ray.train.kd import KD, SoftTargets, distillation_loss
from casd_ray.train.loop import evaluate, train_one_epoch
from casd_ray.train.recipe import make_optimizer, make_scheduler

MEAN, STD = (0.5,), (0.25,)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the suite shares two cores, where a second thread mostly spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(seed: int, n: int = 16, k: int = 10) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_cross_entropy():
    s, t = _logits(0), _logits(1)
    y = torch.arange(16) % 10
    got = distillation_loss(s, t, y, temperature=4.0, alpha=0.0)
    assert torch.allclose(got, F.cross_entropy(s, y))


def test_identical_logits_have_no_soft_loss():
    s = _logits(0)
    y = torch.arange(16) % 10
    assert distillation_loss(s, s.clone(), y, temperature=3.0, alpha=1.0).abs() < 1e-6
    mixed = distillation_loss(s, s.clone(), y, temperature=3.0, alpha=0.25)
    assert torch.allclose(mixed, 0.75 * F.cross_entropy(s, y), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_term_is_scaled_by_t_squared(temperature):
    s, t = _logits(2), _logits(3)
    y = torch.zeros(16, dtype=torch.long)
    p_t = F.softmax(t / temperature, dim=1)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    got = distillation_loss(s, t, y, temperature=temperature, alpha=1.0)
    assert torch.allclose(got, temperature**2 * kl, rtol=1e-5)
    assert got > 0


def test_scheduler_warms_up_then_decays_to_zero():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert opt.param_groups[0]["nesterov"]
    sched = make_scheduler(opt, epochs=5, steps_per_epoch=10, warmup_epochs=1)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm, decay = lrs[:10], lrs[10:]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))
    assert warm[-1] == pytest.approx(0.1)
    assert decay[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] < 0.1 * 0.01
    assert decay[20] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))


def test_scheduler_without_warmup_starts_at_full_lr():
    opt = make_optimizer(torch.nn.Linear(2, 2), lr=0.2, momentum=0.0, weight_decay=0.0)
    assert not opt.param_groups[0]["nesterov"]  # Nesterov needs momentum
    make_scheduler(opt, epochs=2, steps_per_epoch=3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def _separable(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8x8 grey images: dark vs bright, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.where(y[:, None, None, None] == 1, 180.0, 60.0)
    x = (base + torch.randn(n, 1, 8, 8, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    return x.contiguous(), y.long()


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        spec_for("resnet8", in_channels=1, num_classes=2, image_size=(8, 8), width=4)
    )


def _epoch(model, x, y, epoch, opt, sched=None, teacher=None, alpha=0.9):
    targets = None if teacher is None else SoftTargets(KD(4.0, alpha), model=teacher)
    return train_one_epoch(
        model,
        x,
        y,
        optimizer=opt,
        scheduler=sched,
        batching=Batching(32, 0, "crop", MEAN, STD),
        epoch=epoch,
        targets=targets,
    )


def test_train_one_epoch_learns_a_separable_problem():
    x, y = _separable()
    model = _tiny_model()
    opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=0.0)
    sched = make_scheduler(opt, epochs=6, steps_per_epoch=4)
    before = evaluate(model, x, y, batch_size=64, mean=MEAN, std=STD)
    stats = [_epoch(model, x, y, e, opt, sched) for e in range(6)]
    after = evaluate(model, x, y, batch_size=64, mean=MEAN, std=STD)
    assert set(stats[0]) >= {"loss", "acc", "images_per_s", "seconds"}
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert after["loss"] < before["loss"]
    assert after["acc"] >= 0.95
    assert stats[0]["images_per_s"] > 0
    assert model.training  # evaluate restores the mode


def test_distillation_from_a_teacher_trains_the_student():
    x, y = _separable()
    teacher = _tiny_model(1)
    t_opt = make_optimizer(teacher, lr=0.05, momentum=0.9, weight_decay=0.0)
    for e in range(4):
        _epoch(teacher, x, y, e, t_opt)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = _tiny_model(2)
    opt = make_optimizer(student, lr=0.05, momentum=0.9, weight_decay=0.0)
    stats = [_epoch(student, x, y, e, opt, teacher=teacher, alpha=0.5) for e in range(4)]
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert not teacher.training
    for k, v in teacher.state_dict().items():  # eval mode + no_grad: teacher untouched
        assert torch.equal(v, teacher_before[k]), k


def test_non_finite_loss_raises():
    x, y = _separable(64)
    model = _tiny_model()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 3 step 1"):
        _epoch(model, x, y, 3, opt)


def test_huge_learning_rate_raises():
    x, y = _separable(256)
    model = _tiny_model()
    opt = make_optimizer(model, lr=1e30, momentum=0.9, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        for e in range(3):
            _epoch(model, x, y, e, opt)


def test_same_seed_gives_identical_training():
    x, y = _separable()
    states = []
    for _ in range(2):
        model = _tiny_model()
        opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
        _epoch(model, x, y, 0, opt)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
