"""How well does each cheap score predict a candidate's final accuracy? (the proxy to pick)

For each seed, ``--candidates`` networks spread over the search space (random genomes repaired
onto the budget, plus the uniform network and the global channel ranking) are pruned from one
teacher and scored by every proxy a search could rank them with:

- ``r0``: no training — inherit (L1 or BN-γ), adaptive BN on k training batches, evaluate on a
  fixed validation subset (accuracy, and the KD loss against the teacher's logits);
- ``steps``: a few hundred distillation steps, adaptive BN, then the same evaluation;
- ``ep1`` / ``ep3``: the search's own trial recipe (``search.*``) after 1 and 3 epochs;

then fine-tuned with the final recipe (``finetune.*``). Printed: Kendall τ and Spearman ρ of
every proxy against the final validation accuracy (and test accuracy, reported only), per seed
and their mean, and each proxy's cost in images processed. Writes every score to ``--out``.

    python benchmarks/proxy_fidelity.py TEACHER_DIR DATA_ROOT [--budget 0.3] [--seeds 0 1 2]
        [--candidates 20] [--device cuda] [--workers 4] [--smoke-test]

``TEACHER_DIR`` is a run's ``teacher/`` folder; ``DATA_ROOT`` an image folder with
``train/`` and ``test/`` (the CIFAR-10 JPEG copy). It needs no Ray: it runs on a GPU machine
with torch, pydantic, pyyaml and torch-pruning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from casd_ray.artifacts.network import load_network
from casd_ray.config import DataConfig
from casd_ray.config_file import load_config
from casd_ray.data.batches import to_tensors
from casd_ray.data.load import load_dataset
from casd_ray.models.family import flops
from casd_ray.search.screening import ScreenRecipe, screen
from casd_ray.train import devices
from casd_ray.train.bn import recalibrate_bn
from casd_ray.train.kd import KD, SoftTargets
from casd_ray.train.loop import evaluate, train_one_epoch
from casd_ray.train.recipe import make_optimizer, make_scheduler
from casd_ray.widths import space
from casd_ray.widths.baselines import global_ranking_spec
from casd_ray.widths.inherit import inherit

SCREENS = {  # name -> (criterion, BN batches, distillation steps)
    "r0_l1_bn5": ("l1", 5, 0),
    "r0_l1_bn20": ("l1", 20, 0),
    "r0_l1_bn50": ("l1", 50, 0),
    "r0_gamma_bn20": ("bn_gamma", 20, 0),
    "steps200_l1": ("l1", 20, 200),
}


def candidates(teacher, spec, rules, n: int, seed: int) -> dict[str, object]:
    """The uniform network, the global ranking and ``n - 2`` random genomes, all on budget."""
    rng = np.random.default_rng(seed + 1000)
    out = {"uniform": space.candidate_spec(rules, spec, space.control_genome(rules, spec))}
    out["global"] = global_ranking_spec(
        teacher, spec, target=rules.target, metric=rules.metric, criterion=rules.importance,
        min_channels=rules.min_channels, divisible_by=rules.divisible_by,
    )  # fmt: skip
    genes = space.gene_names(spec, rules.granularity)
    while len(out) < n:
        genome = {g: float(rng.uniform(rules.min_ratio, rules.max_ratio)) for g in genes}
        out[f"random{len(out) - 2}"] = space.candidate_spec(rules, spec, genome)
    return out


def train_epochs(student, targets, x, y, *, epochs, batching, lr, momentum, wd, amp, evals):
    """A cosine schedule over ``epochs``; ``evals[e]()`` called after epoch e+1 when given."""
    opt = make_optimizer(student, lr=lr, momentum=momentum, weight_decay=wd)
    sched = make_scheduler(opt, epochs=epochs, steps_per_epoch=batching.steps(len(x)))
    out = {}
    for e in range(epochs):
        train_one_epoch(
            student, x, y, optimizer=opt, scheduler=sched, batching=batching, epoch=e,
            targets=targets, amp=amp,
        )  # fmt: skip
        if e + 1 in evals:
            out[e + 1] = evals[e + 1]()
    return out


def score_candidate(job: dict, shared: dict) -> dict:
    """Every proxy and the final accuracy of one candidate (one worker process)."""
    cfg, data, teacher, dev = shared["cfg"], shared["data"], shared["teacher"], shared["device"]
    spec, seed, amp = job["spec"], job["seed"], dev.type == "cuda"
    t_model = devices.prepare_model(teacher.model, dev).eval()
    x, y = to_tensors(data.x_train, data.y_train, dev)
    xv, yv = to_tensors(data.x_val, data.y_val, dev)
    n_val = min(shared["val_subset"], len(yv))
    row = {"name": job["name"], "seed": seed, "flops_ratio": flops(spec) / flops(teacher.spec)}
    # proxies on the search's data: the seeded proxy subset of the training images
    rng = np.random.default_rng(seed)
    s = cfg.search
    keep = np.sort(rng.choice(len(y), min(s.train_subset or len(y), len(y)), replace=False))
    keep_t = torch.as_tensor(keep, device=dev)
    xp, yp = x[keep_t], y[keep_t]
    batching = data.batching(s.batch_size, seed)
    val_logits = shared["val_logits"][dev.type][:n_val]
    for name, (criterion, bn, steps) in SCREENS.items():
        t0 = time.perf_counter()
        student = devices.prepare_model(inherit(t_model, teacher.spec, spec, criterion), dev)
        recipe = ScreenRecipe(bn_batches=bn, steps=steps, lr=s.lr, momentum=s.momentum,
                              weight_decay=s.weight_decay, kd=KD(cfg.distill.temperature,
                                                                 cfg.distill.alpha))  # fmt: skip
        res = screen(
            student, xp, yp, xv[:n_val], yv[:n_val], batching=batching, recipe=recipe,
            val_logits=val_logits, targets=SoftTargets(recipe.kd, model=t_model), amp=amp,
        )  # fmt: skip
        row[f"{name}_acc"], row[f"{name}_kd"] = res["acc"], -res["kd_loss"]
        row[f"{name}_s"] = time.perf_counter() - t0
    # the search's trial: distil on the proxy, Precise BN, full validation after epochs 1, 3
    t0 = time.perf_counter()
    student = devices.prepare_model(inherit(t_model, teacher.spec, spec, "l1"), dev)
    kd = SoftTargets(KD(cfg.distill.temperature, cfg.distill.alpha), model=t_model)
    recalibrate_bn(student, batching.epoch(xp, yp, 0), cfg.distill.bn_recalibration_batches)

    def val_after(epoch):
        def f():
            recalibrate_bn(student, batching.epoch(xp, yp, epoch - 1), s.precise_bn_batches)
            return evaluate(student, xv, yv, batch_size=1024, mean=data.mean, std=data.std,
                            amp=amp)["acc"]  # fmt: skip

        return f

    got = train_epochs(
        student, kd, xp, yp, epochs=3, batching=batching, lr=s.lr, momentum=s.momentum,
        wd=s.weight_decay, amp=amp, evals={1: val_after(1), 3: val_after(3)},
    )  # fmt: skip
    row["ep1_acc"], row["ep3_acc"] = got[1], got[3]
    row["ep3_s"] = time.perf_counter() - t0
    # the final recipe on the whole training split
    t0 = time.perf_counter()
    f = cfg.finetune
    student = devices.prepare_model(inherit(t_model, teacher.spec, spec, "l1"), dev)
    fb = data.batching(f.batch_size, seed)
    recalibrate_bn(student, fb.epoch(x, y, 0), cfg.distill.bn_recalibration_batches)
    train_epochs(
        student, kd, x, y, epochs=f.epochs, batching=fb, lr=f.lr, momentum=f.momentum,
        wd=f.weight_decay, amp=amp, evals={},
    )  # fmt: skip
    xt, yt = to_tensors(data.x_test, data.y_test, dev)
    for split, (xs, ys) in (("val", (xv, yv)), ("test", (xt, yt))):
        row[f"final_{split}_acc"] = evaluate(
            student, xs, ys, batch_size=1024, mean=data.mean, std=data.std, amp=amp
        )["acc"]
    row["final_s"] = time.perf_counter() - t0
    return row


def _worker(rank: int, jobs: list[dict], shared_args: dict, out_dir: str) -> None:
    torch.set_num_threads(shared_args["threads"])
    shared = _load(shared_args)
    for i, job in enumerate(jobs):
        if i % shared_args["workers"] != rank:
            continue
        row = score_candidate(job, shared)
        with open(Path(out_dir) / "rows.jsonl", "a") as fh:  # one short append per line
            fh.write(json.dumps(row) + "\n")
        print(f"[{rank}] {job['seed']} {job['name']}: final val {row['final_val_acc']:.4f} "
              f"({row['final_s']:.0f}s)", flush=True)  # fmt: skip


def _load(a: dict) -> dict:
    cfg = load_config(a["config"], a["overrides"])
    data = np.load(a["data_file"], allow_pickle=True)["data"].item()
    teacher = load_network(a["teacher"])
    dev = torch.device(a["device"])
    t = devices.prepare_model(teacher.model, dev).eval()
    xv, yv = to_tensors(data.x_val, data.y_val, dev)
    with torch.no_grad():
        logits = [t(xb).float() for xb, _ in data.batching(1024, 0).evaluation(xv, yv)]
    val_logits = {dev.type: torch.cat(logits)}
    return {"cfg": cfg, "data": data, "teacher": teacher, "device": dev,
            "val_subset": a["val_subset"], "val_logits": val_logits}  # fmt: skip


def fidelity(rows: list[dict]) -> dict[str, dict]:
    """Proxy -> Kendall τ / Spearman ρ against final val (and test) accuracy per seed."""
    from scipy import stats

    proxies = sorted({k for r in rows for k in r if k.endswith(("_acc", "_kd"))
                      and not k.startswith("final")})  # fmt: skip
    out: dict[str, dict] = {}
    for p in proxies:
        per = {}
        for seed in sorted({r["seed"] for r in rows}):
            rs = [r for r in rows if r["seed"] == seed]
            if len(rs) < 3:
                continue
            x = [r[p] for r in rs]
            per[seed] = {
                "tau": float(stats.kendalltau(x, [r["final_val_acc"] for r in rs])[0]),
                "rho": float(stats.spearmanr(x, [r["final_val_acc"] for r in rs])[0]),
                "tau_test": float(stats.kendalltau(x, [r["final_test_acc"] for r in rs])[0]),
            }
        out[p] = {"per_seed": per, **{
            k: float(np.nanmean([v[k] for v in per.values()])) if per else math.nan
            for k in ("tau", "rho", "tau_test")
        }}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", help="a run's teacher/ folder")
    parser.add_argument("data_root", help="image folder with train/ and test/")
    parser.add_argument("--config", default="experiments/cifar10_resnet20.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--val-subset", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="proxy_fidelity")
    parser.add_argument("--smoke-test", action="store_true")
    a = parser.parse_args()
    overrides = [f"space.budget.target={a.budget}", "data.split_seed=0", *a.overrides]
    if a.smoke_test:
        overrides += ["data.train_subset=1200", "search.train_subset=600", "finetune.epochs=1",
                      "data.val_size=300"]  # fmt: skip
        a.candidates, a.seeds, a.val_subset = 4, a.seeds[:1], 200
    cfg = load_config(a.config, overrides)
    data = load_dataset(DataConfig(**{**cfg.data.model_dump(), "root": a.data_root}), 0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = Path(tempfile.mkdtemp(prefix="casd-fidelity-")) / "data.npz"
    np.savez(data_file, data=np.array(data, dtype=object))
    teacher = load_network(a.teacher)
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    jobs = [
        {"seed": seed, "name": name, "spec": spec}
        for seed in a.seeds
        for name, spec in candidates(teacher.model, teacher.spec, rules, a.candidates, seed).items()
    ]
    shared = {"config": a.config, "overrides": overrides, "data_file": str(data_file),
              "teacher": a.teacher, "device": a.device, "val_subset": a.val_subset,
              "workers": a.workers, "threads": a.threads}  # fmt: skip
    (out / "rows.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    if a.workers == 1:
        _worker(0, jobs, shared, str(out))
    else:
        import torch.multiprocessing as mp

        mp.start_processes(_worker, args=(jobs, shared, str(out)), nprocs=a.workers,
                           start_method="spawn")  # fmt: skip
    rows = [json.loads(ln) for ln in (out / "rows.jsonl").open()]
    table = fidelity(rows)
    data_file.unlink()
    (out / "fidelity.json").write_text(json.dumps({"rows": rows, "fidelity": table,
                                                   "overrides": overrides}, indent=1))  # fmt: skip
    print(f"{len(rows)} candidates in {time.time() - t0:.0f}s on {a.device} x{a.workers}")
    print(f"{'proxy':<22} {'tau':>6} {'rho':>6} {'tau_test':>9}  seconds/candidate")
    for p, v in sorted(table.items(), key=lambda kv: -np.nan_to_num(kv[1]["tau"], nan=-9)):
        secs = np.mean([r.get(p.rsplit("_", 1)[0] + "_s", np.nan) for r in rows])
        print(f"{p:<22} {v['tau']:6.2f} {v['rho']:6.2f} {v['tau_test']:9.2f}  {secs:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
