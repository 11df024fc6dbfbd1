"""The trainable's logic without Ray: ``report`` and ``get_checkpoint`` are plain callables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rules_of
from ray import tune

from casd_ray.artifacts.network import numpy_to_state
from casd_ray.config import ExperimentConfig
from casd_ray.data.batches import to_tensors, train_batches
from casd_ray.data.load import load_dataset
from casd_ray.models.family import build_model, flops, spec_for, spec_from_json
from casd_ray.models.resnet import WidthSpec
from casd_ray.search.packing import pack_data, pack_teacher
from casd_ray.search.scratch import checkpoint_dir
from casd_ray.search.trial import STATE_FILE, distill_trial, trial_resources
from casd_ray.search.trial_plan import pack_logits, trial_plan
from casd_ray.train import kd, loop, recipe
from casd_ray.train.bn import recalibrate_bn
from casd_ray.train.recipe import steps_per_epoch
from casd_ray.widths import space

METRICS = {"val_acc", "val_loss", "flops", "params", "flops_ratio", "params_ratio", "epoch"}


class Recorder:
    """A ``report`` that keeps every metrics dict and a copy of every checkpoint."""

    def __init__(self, root: Path, stop_after: int | None = None) -> None:
        self.root, self.stop_after = root, stop_after
        self.metrics: list[dict] = []
        self.checkpoints: list[Path] = []

    def __call__(self, metrics: dict, *, checkpoint: tune.Checkpoint | None = None) -> None:
        if checkpoint is not None:  # rung 0 reports without one
            keep = self.root / f"ckpt{len(self.metrics)}"
            shutil.copytree(checkpoint.path, keep)  # the trial deletes its dir after report
            self.checkpoints.append(keep)
        self.metrics.append(dict(metrics))
        if self.stop_after is not None and len(self.metrics) >= self.stop_after:
            raise KeyboardInterrupt("driver killed")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """distill_trial sets torch's threads to the trial's CPUs (1 here); restore them after.

    One thread also keeps the fixture's teacher training fast when other processes load
    the cores (two spinning OpenMP threads on a busy 2-core machine are 100x slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(image_tree: Path, one_thread):
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"arch": "resnet8", "width": 4},
            "data": {"dataset": "imagefolder", "root": str(image_tree), "val_size": 40},
            "space": {"budget": {"target": 0.5}},
            "search": {"max_epochs": 3, "batch_size": 32, "lr": 0.05, "cpus_per_trial": 1},
        }
    )
    data = load_dataset(cfg.data, cfg.seed)
    spec = spec_for("resnet8", data.in_channels, data.num_classes, data.image_size, width=4)
    torch.manual_seed(0)
    teacher = build_model(spec)
    x, y = to_tensors(data.x_train, data.y_train, "cpu")
    opt = recipe.make_optimizer(teacher, lr=0.05, momentum=0.9, weight_decay=0.0)
    for epoch in range(5):
        loop.train_one_epoch(
            teacher,
            x,
            y,
            optimizer=opt,
            scheduler=None,
            batching=data.batching(32, 0),
            epoch=epoch,
        )
    teacher.eval()
    packed = pack_data(data)
    for arr in packed.values():  # object-store arrays are read-only: the trial must cope
        if isinstance(arr, np.ndarray):
            arr.flags.writeable = False
    return cfg, packed, pack_teacher(teacher), spec


def _run(setup, cfg=None, genome=None, **kw):
    base, data, teacher_state, spec = setup
    cfg = cfg or base
    genome = genome or space.uniform_genome(spec, cfg.space.granularity, 1.0)
    return distill_trial(
        genome,
        data=data,
        teacher_state=teacher_state,
        teacher_spec_json=spec.to_json(),
        plan=trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed),
        **kw,
    )


def test_reports_every_epoch_with_metrics_and_checkpoint(setup, tmp_path):
    cfg, _, _, spec = setup
    rec = Recorder(tmp_path)
    genome = {"stage0": 0.3, "stage1": 1.0, "stage2": 0.6}
    before = time.time()
    _run(setup, genome=genome, report=rec, get_checkpoint=lambda: None)
    assert [m["epoch"] for m in rec.metrics] == [1, 2, 3]
    # start-up figures (benchmarks/search_startup.py): when the trial began, and how long it
    # took to reach its first batch; the same on every row
    assert {m["started_at"] for m in rec.metrics} == {rec.metrics[0]["started_at"]}
    assert before <= rec.metrics[0]["started_at"] <= time.time()
    assert len({m["setup_seconds"] for m in rec.metrics}) == 1
    assert 0 < rec.metrics[0]["setup_seconds"] < time.time() - before
    for m in rec.metrics:
        assert set(m) >= METRICS
        assert 0.0 <= m["val_acc"] <= 1.0 and np.isfinite(m["val_loss"])
    last = rec.metrics[-1]
    student = WidthSpec.from_json(last["genome_widths"])
    assert student == space.candidate_spec(rules_of(cfg), spec, genome)
    assert last["flops"] == flops(student)
    assert last["flops_ratio"] <= cfg.space.budget.target + 1e-9  # repaired onto the budget
    assert last["best_val_acc"] == max(m["val_acc"] for m in rec.metrics)
    state = torch.load(rec.checkpoints[-1] / STATE_FILE, weights_only=True)
    assert state["epoch"] == 3 and {"model", "optimizer", "scheduler"} <= set(state)


def test_resume_from_checkpoint_continues_where_it_stopped(setup, tmp_path):
    full = Recorder(tmp_path / "full")
    _run(setup, report=full, get_checkpoint=lambda: None)
    cut = Recorder(tmp_path / "cut", stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, report=cut, get_checkpoint=lambda: None)
    resumed = Recorder(tmp_path / "resumed")
    ckpt = tune.Checkpoint.from_directory(cut.checkpoints[-1])
    _run(setup, report=resumed, get_checkpoint=lambda: ckpt)
    assert [m["epoch"] for m in resumed.metrics] == [3]
    # Same seed, same batches, restored optimizer and LR schedule: the same final epoch.
    assert resumed.metrics[-1]["val_acc"] == pytest.approx(full.metrics[-1]["val_acc"], abs=0.03)
    assert resumed.metrics[-1]["val_loss"] == pytest.approx(full.metrics[-1]["val_loss"], rel=0.05)


def test_distillation_learns_the_synthetic_task(setup, tmp_path):
    cfg = setup[0].model_copy(
        update={"search": setup[0].search.model_copy(update={"max_epochs": 6})}
    )
    rec = Recorder(tmp_path)
    _run(setup, cfg=cfg, report=rec, get_checkpoint=lambda: None)
    assert rec.metrics[-1]["best_val_acc"] > 0.6  # 4 classes: chance is 0.25


def test_bn_recalibration_runs_before_training(setup, tmp_path):
    cfg = setup[0].model_copy(
        update={"distill": setup[0].distill.model_copy(update={"bn_recalibration_batches": 2})}
    )
    rec = Recorder(tmp_path)
    _run(setup, cfg=cfg, report=rec, get_checkpoint=lambda: None)
    assert len(rec.metrics) == 3


def test_precise_bn_rescores_without_changing_training(setup, tmp_path):
    """Precise BN only re-estimates BN statistics before validation: the weights train
    exactly as without it, and the saved statistics are the exact average over the epoch's
    first batches at the epoch's final weights."""
    base, data, _, _ = setup
    runs = {}
    for name, batches in {"off": 0, "on": 2}.items():  # "off" explicitly: the default is on
        search = base.search.model_copy(update={"precise_bn_batches": batches})
        cfg = base.model_copy(update={"search": search})
        rec = Recorder(tmp_path / name)
        _run(setup, cfg=cfg, report=rec, get_checkpoint=lambda: None)
        runs[name] = (rec.metrics, torch.load(rec.checkpoints[-1] / STATE_FILE)["model"])
    (_, off), (m_on, on) = runs["off"], runs["on"]
    stats = ("running_mean", "running_var")
    for key in off:
        if not key.endswith((*stats, "num_batches_tracked")):
            assert torch.equal(off[key], on[key]), key
    assert any(not torch.equal(off[k], on[k]) for k in off if k.endswith(stats))

    spec = spec_from_json(m_on[-1]["genome_widths"])
    model = build_model(spec)
    model.load_state_dict(off)
    x, y = to_tensors(data["x_train"], data["y_train"], "cpu")
    batches = train_batches(
        x, y, batch_size=base.search.batch_size, seed=base.seed, epoch=2,
        augment=data["augment"], mean=data["mean"], std=data["std"],
    )  # fmt: skip
    recalibrate_bn(model, batches, 2)
    for key in on:
        if key.endswith(stats):
            assert torch.allclose(model.state_dict()[key], on[key], atol=1e-6), key
    xv, yv = to_tensors(data["x_val"], data["y_val"], "cpu")
    val = loop.evaluate(model, xv, yv, batch_size=256, mean=data["mean"], std=data["std"])
    assert val["acc"] == pytest.approx(m_on[-1]["val_acc"])


def test_huge_learning_rate_fails_the_trial(setup, tmp_path):
    cfg = setup[0].model_copy(update={"search": setup[0].search.model_copy(update={"lr": 1e6})})
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        _run(setup, cfg=cfg, report=Recorder(tmp_path), get_checkpoint=lambda: None)


def test_missing_gene_is_an_error(setup, tmp_path):
    with pytest.raises(KeyError, match="stage2"):
        _run(setup, genome={"stage0": 1.0, "stage1": 1.0}, report=Recorder(tmp_path))


def test_pack_data_leaves_the_test_split_out(setup):
    _, packed, teacher_state, _ = setup
    assert not any(k.startswith(("x_test", "y_test")) for k in packed)
    assert packed["x_train"].dtype == np.uint8
    assert all(isinstance(v, np.ndarray) for v in teacher_state.values())
    json.dumps({k: v for k, v in packed.items() if not isinstance(v, np.ndarray)})


@pytest.mark.parametrize(("n", "batch"), [(100, 32), (97, 32), (96, 32), (65, 32), (5, 8)])
def test_steps_per_epoch_matches_train_batches(n, batch):
    x, y = to_tensors(np.zeros((n, 1, 4, 4), np.uint8), np.zeros(n, np.int64), "cpu")
    batches = train_batches(
        x, y, batch_size=batch, seed=0, epoch=0, augment="none", mean=(0.0,), std=(1.0,)
    )
    assert steps_per_epoch(n, batch) == sum(1 for _ in batches)


def test_search_train_subset_is_a_seeded_subset_of_train(setup):
    data = load_dataset(setup[0].data, 0)
    full = pack_data(data)
    a, b = pack_data(data, 40, seed=3), pack_data(data, 40, seed=3)
    other = pack_data(data, 40, seed=4)
    assert len(a["y_train"]) == 40 and np.array_equal(a["x_train"], b["x_train"])
    assert not np.array_equal(a["x_train"], other["x_train"])
    rows = {r.tobytes() for r in full["x_train"]}
    assert all(r.tobytes() in rows for r in a["x_train"])
    assert np.array_equal(a["x_val"], full["x_val"])  # validation is never subsampled
    assert len(pack_data(data, 10**9)["y_train"]) == len(full["y_train"])


def test_trial_plan_holds_the_config_as_plain_values(setup):
    cfg = setup[0]
    plan = trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed)
    assert plan.rules == rules_of(cfg) and plan.rules.repair
    assert (plan.seed, plan.max_epochs, plan.batch_size, plan.lr) == (cfg.seed, 3, 32, 0.05)
    assert (plan.temperature, plan.alpha) == (cfg.distill.temperature, cfg.distill.alpha)
    assert plan.cpus == cfg.search.cpus_per_trial and plan.gpus == cfg.search.gpus_per_trial
    nsga2 = cfg.search.model_copy(update={"algorithm": "optuna-nsga2"})
    assert not trial_plan(cfg.space, cfg.distill, nsga2, cfg.seed).rules.repair


def test_trial_resources_from_the_search_section(setup):
    search = setup[0].search
    assert trial_resources(search) == {"cpu": 1}
    gpu = search.model_copy(update={"cpus_per_trial": 2, "gpus_per_trial": 0.5})
    assert trial_resources(gpu) == {"cpu": 2, "gpu": 0.5}


def test_shared_teacher_logits_give_the_trial_its_own_numbers(setup, tmp_path):
    """Logits computed once (``search.shared_logits``) = the trial's own teacher forwards."""
    cfg, data, teacher_state, spec = setup
    teacher = build_model(spec)
    teacher.load_state_dict(numpy_to_state(teacher_state))
    plan = trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed)
    logits = pack_logits(data, teacher, plan)
    n_batched = sum(len(yb) for _, yb in _epoch_batches(data, plan))
    assert logits.shape == (plan.max_epochs, n_batched, spec.num_classes)
    assert not np.allclose(logits[0], logits[1])  # each epoch has its own augmentation
    genome = {"stage0": 0.3, "stage1": 1.0, "stage2": 0.6}
    runs = {}
    for shared in (False, True):
        rec = Recorder(tmp_path / str(shared))
        _run(
            setup,
            genome=genome,
            report=rec,
            get_checkpoint=lambda: None,
            teacher_logits=logits if shared else None,
        )
        runs[shared] = rec.metrics
    for own, cached in zip(runs[False], runs[True], strict=True):
        for key in ("val_loss", "train_loss"):
            assert cached[key] == pytest.approx(own[key], rel=1e-4, abs=1e-5), key
        assert abs(cached["val_acc"] - own["val_acc"]) <= 1 / len(data["y_val"])
    wrong = np.zeros_like(logits)  # and they are really used: other logits, other training
    rec = Recorder(tmp_path / "wrong")
    _run(setup, genome=genome, report=rec, get_checkpoint=lambda: None, teacher_logits=wrong)
    assert rec.metrics[-1]["train_loss"] != pytest.approx(runs[True][-1]["train_loss"], rel=1e-3)


def test_logit_cache_falls_back_to_float16_then_to_the_teacher(setup):
    """The cache is bounded: float32 when it fits, float16 (half) when only that fits, else
    None (trials run the teacher); float16 rows match float32 to float16's precision."""
    mib = 2**20
    assert kd.logits_dtype(10, 45_000, 100, 256 * mib) == np.float32  # CIFAR-100: 172 MiB
    assert kd.logits_dtype(10, 45_000, 100, 100 * mib) == np.float16
    assert kd.logits_dtype(10, 45_000, 100, 50 * mib) is None
    cfg, data, teacher_state, spec = setup
    teacher = build_model(spec)
    teacher.load_state_dict(numpy_to_state(teacher_state))
    plan = trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed)
    full = pack_logits(data, teacher, plan)
    half = pack_logits(data, teacher, plan, dtype=np.dtype(np.float16))
    assert half.dtype == np.float16 and half.nbytes * 2 == full.nbytes
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=2**-10, atol=1e-4)


def _epoch_batches(data, plan):
    x, y = to_tensors(data["x_train"], data["y_train"], "cpu")
    return train_batches(
        x, y, batch_size=plan.batch_size, seed=plan.seed, epoch=0, augment=data["augment"],
        mean=data["mean"], std=data["std"],
    )  # fmt: skip


def _screening(setup, **screen):
    cfg = setup[0]
    search = cfg.search.model_copy(
        update={"screen": cfg.search.screen.model_copy(update={"promote": 2, **screen})}
    )
    return cfg.model_copy(update={"search": search})


class StopAtRung0(Exception):
    pass


def test_rung0_is_deterministic_for_a_fixed_seed(setup, tmp_path):
    """Rung 0 (inherit, adaptive BN on the seed's batches, a fixed validation subset) gives
    the same score every time for one seed and genome: candidates are compared on common
    random numbers, and a restarted trial screens to the same decision."""
    genome = {"stage0": 0.3, "stage1": 1.0, "stage2": 0.6}
    scores = []
    for score in ("acc", "acc", "kd"):
        got: list[dict] = []

        def stop(metrics, checkpoint=None, got=got):
            got.append(metrics)
            raise StopAtRung0

        cfg = _screening(setup, val_images=30, bn_batches=2, score=score)
        with pytest.raises(StopAtRung0):
            _run(setup, cfg=cfg, genome=genome, report=stop, get_checkpoint=lambda: None)
        assert got[0]["epoch"] == 0 and "rung0_score" in got[0]
        assert got[0]["objective"] == got[0]["rung0_score"]  # rung 0: fidelity 0 + score
        scores.append((got[0]["rung0_score"], got[0]["val_acc"], got[0]["rung0_kd_loss"]))
    assert scores[0] == scores[1]
    assert scores[2][0] == pytest.approx(1 / (1 + scores[2][2]))  # the KD-loss score


def test_a_promoted_candidate_continues_in_the_same_trial(setup, tmp_path, monkeypatch):
    """After rung 0 the trial goes on distilling the network it screened: one set-up (one
    inheritance), rung 0 then every epoch reported by the same trial."""
    import casd_ray.search.trial as trial_module

    calls = []
    real = trial_module.inherit
    monkeypatch.setattr(trial_module, "inherit", lambda *a, **k: calls.append(1) or real(*a, **k))
    rec = Recorder(tmp_path)
    _run(setup, cfg=_screening(setup, val_images=30, bn_batches=2), report=rec,
         get_checkpoint=lambda: None)  # fmt: skip
    assert [m["epoch"] for m in rec.metrics] == [0, 1, 2, 3]
    assert len(calls) == 1
    assert len({m["setup_seconds"] for m in rec.metrics}) == 1
    assert len({m["started_at"] for m in rec.metrics}) == 1
    objectives = [m["objective"] for m in rec.metrics]
    assert objectives == sorted(objectives)  # each fidelity outranks the one before
    assert len(rec.checkpoints) == 3  # rung 0 needs no checkpoint: it is cheap to redo


def test_a_killed_trials_scratch_checkpoint_is_swept_by_the_next(tmp_path):
    """A trial killed inside ``report()`` (a lost node, the OOM killer, a test's SIGKILL)
    never leaves its scratch checkpoint folder: 63 had piled up in /tmp on the development
    machine, each a model state. A new scratch folder first removes those whose process no
    longer runs; a live trial's, and folders not named by a process, stay."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = tmp_path / f"casd-ckpt-{ended.pid}-k2j4x9a1"
    stale.mkdir()
    (stale / STATE_FILE).write_bytes(b"state")
    live = tmp_path / f"casd-ckpt-{os.getpid()}-a8d0q2zz"
    live.mkdir()
    unnamed = tmp_path / "casd-ckpt-0hs9lnxe"  # named before the process id was
    unnamed.mkdir()
    with checkpoint_dir(tmp_path) as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith(f"casd-ckpt-{os.getpid()}-")
        assert not stale.exists() and live.exists() and unnamed.exists()
    assert not scratch.exists()
