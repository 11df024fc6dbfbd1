"""Where a model trains and in which memory format: one place for the device rules that
the teacher, every search trial and the fine-tune share, so that they train alike."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn


def pick_device(gpus: float) -> torch.device:
    """CUDA when the caller was given (a fraction of) a GPU and one is visible, else CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def prepare_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``model`` to ``device``; on CPU in channels_last when that is the faster format.

    channels_last is faster on this project's CPUs only when every convolution's output
    channels are a multiple of oneDNN's vector block (:data:`CHANNELS_LAST_BLOCK`); pruned
    widths mostly are not, and NCHW then trains far faster. Measured, training images/s on
    2 threads (AVX2 Zen 2), NCHW / channels_last: ResNet-20 on 32x32 (``benchmarks/
    memory_format.py``) 0.80 at widths 16/32/64, 0.75 at 16/24/48, 1.30 at 11/22/45, 1.25 at
    12/24/44; ResNet-8 on 28x28 0.75 at 16/32/64, 0.93 at 8/24/48, 1.58 at 11/23/46 (``make
    demo``'s uniform student), 1.29 at 12/24/44. The rule is a pure function of the widths,
    so a seed gives the same numbers on every run. On GPUs the format is left to the caller
    until measured there. A state dict loads into any model whatever its format.
    """
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cpu" and channels_last_pays(model):
        model = model.to(memory_format=torch.channels_last)
        for m in model.modules():
            if _onednn_unsafe(m):
                # not .contiguous(): a 1x1 weight in channels_last already counts as contiguous
                m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
                if _nchw_input not in m._forward_pre_hooks.values():
                    m.register_forward_pre_hook(_nchw_input)
    return model


CHANNELS_LAST_BLOCK = 8  # floats per AVX2 vector; AVX-512 has 16 (not measured)
# Strided 1x1 convs with input channels off a multiple of this run in NCHW: AVX-512's block,
# so the oneDNN#6035 guard below holds on either instruction set.
ONEDNN_SAFE_BLOCK = 16


def channels_last_pays(model: nn.Module) -> bool:
    """Whether every convolution writes a multiple of :data:`CHANNELS_LAST_BLOCK` channels
    (the input image's 1 or 3 channels do not count: the teacher at 16/32/64 reads them)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and all(m.out_channels % CHANNELS_LAST_BLOCK == 0 for m in convs)


def _onednn_unsafe(m: nn.Module) -> bool:
    """A strided 1x1 convolution whose input channels (per group) do not fill oneDNN's
    vector block (8 floats on AVX2, 16 on AVX-512). On channels_last input, oneDNN's x64
    kernel for its weight gradient writes past its workspace (uxlfoundation/oneDNN#6035):
    on this project's AVX2 CPU a candidate with 2-7 channels before a downsampling shortcut
    aborted the trial ("double free or corruption"); the issue reports hangs and silently
    wrong gradients too. Such layers run in NCHW (a blocked path without the bug); they are
    small, so the rest of the network keeps channels_last's speed."""
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.stride != (1, 1)
        and (m.in_channels // m.groups) % ONEDNN_SAFE_BLOCK != 0
    )


def _nchw_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (no loss scaler needed); a no-op on CPU, where it is slower."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
