"""Device and memory-format rules shared by every training loop, on tiny real models."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from casd_ray.models.family import build_model, spec_for
from casd_ray.train.devices import channels_last_pays, pick_device, prepare_model

# Trains a strided 1x1 convolution with 5 input channels (a pruned downsampling shortcut)
# after prepare_model and with a plain NCHW copy; prints the largest weight-gradient gap.
_STRIDED_1X1 = """
import copy, torch
from casd_ray.train.devices import prepare_model
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


def _resnet8(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = spec_for("resnet8", in_channels=1, num_classes=2, image_size=(8, 8), width=width)
    return build_model(spec)


def test_prepare_model_uses_channels_last_on_cpu_without_changing_outputs():
    model = _resnet8(8).eval()  # every conv writes 8, 16 or 32 channels
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    fast = prepare_model(copy.deepcopy(model), "cpu")
    w = fast.stages[0][0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(fast(x), before, atol=1e-5)
    plain = _resnet8(8)
    plain.load_state_dict(fast.state_dict())  # the state dict loads into a plain model


@pytest.mark.parametrize("width", [4, 11])
def test_prepare_model_keeps_nchw_when_a_width_is_off_the_vector_block(width):
    """Pruned widths off a multiple of 8 train 1.3-1.6x faster in NCHW on this CPU
    (benchmarks/memory_format.py): such models stay as they are."""
    model = _resnet8(width)
    assert not channels_last_pays(model)
    fast = prepare_model(copy.deepcopy(model), "cpu")
    assert all(p.is_contiguous() for p in fast.parameters())
    assert not any(m._forward_pre_hooks for m in fast.modules())


def test_one_odd_width_is_enough_to_keep_nchw():
    model = _resnet8(8)
    assert channels_last_pays(model)
    model.stages[2][0].conv1 = torch.nn.Conv2d(32, 30, 3, padding=1, bias=False)
    assert not channels_last_pays(model)
