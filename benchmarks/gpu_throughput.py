"""Search trials on a GPU: images/s of one trial's distillation epoch, by how it is run.

The same training loop a trial runs (:func:`casd_ray.train.loop.train_one_epoch` with the
search's shared teacher logits, seeded augmented batches gathered on the device) on a
ResNet-20 student at half the teacher's FLOPs, on random CIFAR-shaped data, measured as:

- ``fp32`` batch 128 (the CPU recipe moved to the GPU as it is), the baseline;
- ``bf16`` autocast (``search.amp``), NCHW and channels_last;
- ``bf16`` at batch 512 (a GPU-sized recipe);
- ``bf16`` + ``torch.compile`` (``mode="max-autotune-no-cudagraphs"`` and ``"reduce-overhead"``
  = CUDA graphs), compile time reported apart;
- 1, 2, 4 and 8 trials sharing the GPU (``search.gpus_per_trial`` 1, 0.5, 0.25, 0.125), each a
  process running the bf16 loop: the aggregate images/s.

Printed: images/s per variant and its ratio to the baseline, one run, on whatever GPU this is.

    python benchmarks/gpu_throughput.py [--seconds 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from casd_ray.data.batches import Batching, to_tensors
from casd_ray.models.family import build_model, spec_for
from casd_ray.train.kd import KD, SoftTargets
from casd_ray.train.loop import train_one_epoch
from casd_ray.train.recipe import make_optimizer
from casd_ray.widths import space

N_IMAGES = 10_000  # one search epoch on the 10k proxy


def _student():
    spec = spec_for("resnet20", 3, 10, (32, 32))
    half, _ = space.repair(spec, "layer", space.uniform_genome(spec, "layer"), target=0.5)
    return build_model(half)


def measure(
    *, batch: int, amp: bool, channels_last: bool = False, compile_mode: str | None = None,
    seconds: float = 8.0, device: str = "cuda",
) -> dict:  # fmt: skip
    """Images/s of full distillation epochs (after one warm-up epoch) for ``seconds``."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = to_tensors(
        rng.integers(0, 256, (N_IMAGES, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, 10, N_IMAGES), device,
    )  # fmt: skip
    model = _student().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)
    batching = Batching(batch, 0, "flip_crop", (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    logits = np.random.default_rng(1).normal(size=(64, N_IMAGES, 10)).astype(np.float16)
    targets = SoftTargets(KD(), logits=logits)
    opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    run = dict(optimizer=opt, scheduler=None, batching=batching, targets=targets, amp=amp)
    train_one_epoch(model, x, y, epoch=0, **run)  # warm-up (and compilation)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    images, start, epoch = 0, time.perf_counter(), 1
    while time.perf_counter() - start < seconds:
        res = train_one_epoch(model, x, y, epoch=epoch, **run)
        images += int(round(res["images_per_s"] * res["seconds"]))
        epoch += 1
    torch.cuda.synchronize()
    return {"images_per_s": images / (time.perf_counter() - start), "warmup_s": warm}


def _worker(rank: int, seconds: float, queue) -> None:
    queue.put(measure(batch=128, amp=True, seconds=seconds)["images_per_s"])


def shared(n: int, seconds: float) -> float:
    """Aggregate images/s of ``n`` processes training at once on the one GPU."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, seconds, queue)) for r in range(n)]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return float(sum(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    a = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    variants = {
        "fp32 b128": dict(batch=128, amp=False),
        "bf16 b128": dict(batch=128, amp=True),
        "bf16 b128 channels_last": dict(batch=128, amp=True, channels_last=True),
        "bf16 b512": dict(batch=512, amp=True),
        "bf16 b128 compile": dict(batch=128, amp=True, compile_mode="max-autotune-no-cudagraphs"),
        "bf16 b128 cuda graphs": dict(batch=128, amp=True, compile_mode="reduce-overhead"),
    }
    out: dict = {"device": torch.cuda.get_device_name(0), "variants": {}}
    base = None
    for name, kw in variants.items():
        try:
            res = measure(seconds=a.seconds, device=a.device, **kw)
        except Exception as err:  # noqa: BLE001 - report what does not run, measure the rest
            print(f"{name:<28} failed: {type(err).__name__}: {str(err)[:160]}", flush=True)
            continue
        base = base or res["images_per_s"]
        out["variants"][name] = {**res, "ratio": res["images_per_s"] / base}
        print(f"{name:<28} {res['images_per_s']:9.0f} img/s  {res['images_per_s'] / base:5.2f}x"
              f"  (warm-up {res['warmup_s']:.1f}s)", flush=True)  # fmt: skip
    for n in (1, 2, 4, 8):
        rate = shared(n, a.seconds)
        out["variants"][f"bf16 b128 x{n} trials"] = {"images_per_s": rate, "ratio": rate / base}
        print(f"{f'bf16 b128 x{n} trials':<28} {rate:9.0f} img/s  {rate / base:5.2f}x", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
