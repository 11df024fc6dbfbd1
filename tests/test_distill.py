"""Distillation loss, optimiser/schedule and the shared training loop, on tiny real models."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from casd_ray.distill import (
    distillation_loss,
    evaluate,
    make_optimizer,
    make_scheduler,
    pick_device,
    prepare_model,
    train_one_epoch,
)
from casd_ray.models import build_model, spec_for

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


def _epoch(model, x, y, epoch, opt, sched=None, **kw):
    return train_one_epoch(
        model,
        x,
        y,
        optimizer=opt,
        scheduler=sched,
        batch_size=32,
        seed=0,
        epoch=epoch,
        augment="crop",
        mean=MEAN,
        std=STD,
        **kw,
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


# Trains a strided 1x1 convolution with 5 input channels (a pruned downsampling shortcut)
# after prepare_model and with a plain NCHW copy; prints the largest weight-gradient gap.
_STRIDED_1X1 = """
import copy, torch
from casd_ray.distill import prepare_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(5, 32, 1, stride=2, bias=False))
fast = prepare_model(copy.deepcopy(model), "cpu")
x = torch.randn(128, 5, 32, 32)
for m in (model, fast):
    for _ in range(3):
        m.zero_grad()
        m(x).square().mean().backward()
gap = (fast[0].weight.grad - model[0].weight.grad).abs().max() / model[0].weight.grad.abs().max()
print(f"{float(gap):.3g}")
"""


def test_prepared_strided_1x1_conv_trains_like_nchw():
    """oneDNN's x64 kernel for the weight gradient of a strided 1x1 convolution on
    channels_last input writes past its workspace when the input channels do not fill its
    vector block (uxlfoundation/oneDNN#6035): on this project's AVX2 CPU candidates with 2-7
    channels before a downsampling shortcut aborted ("double free or corruption"); elsewhere
    it hangs or gives wrong gradients. A subprocess, because the bug kills the interpreter."""
    run = subprocess.run(
        [sys.executable, "-c", _STRIDED_1X1], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-300:]}"
    assert float(run.stdout) < 1e-4


def test_pick_device_without_gpus_is_cpu():
    assert pick_device(0) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device(0.25).type == expected


def test_prepare_model_uses_channels_last_on_cpu_without_changing_outputs():
    model = _tiny_model().eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    fast = prepare_model(copy.deepcopy(model), "cpu")
    w = fast.stages[0][0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(fast(x), before, atol=1e-5)
    plain = _tiny_model()
    plain.load_state_dict(fast.state_dict())  # the state dict loads into a plain model
