"""The search on a real local Ray instance (one per module), tiny model and data.

Every searcher runs 6 trials under ASHA (4 epochs, grace 1, factor 2, 2 concurrent); a
killed driver is resumed; a diverging config errors trial by trial without ending the search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
from conftest import ensure_teacher, kill_search_midway, rules_of, search_with
from ray import cloudpickle

from casd_ray.artifacts.network import read_spec
from casd_ray.artifacts.trials import TRIALS_FILE, best_completed, pareto_front
from casd_ray.config import ExperimentConfig
from casd_ray.config_file import save_config
from casd_ray.errors import BudgetError, ConfigError, SearchInterrupted
from casd_ray.models.family import flops
from casd_ray.models.resnet import WidthSpec
from casd_ray.pipeline.run import execute
from casd_ray.search.run import trials_table
from casd_ray.search.session import dashboard_login_hint
from casd_ray.search.trial import distill_trial

MAX_EPOCHS = 4


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test: pytest run as a background job (`cmd &`,
    as CI may) inherits SIGINT ignored, which a search leaves ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield before
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, image_tree) -> Path:
    """A module folder with one teacher (trained once, 3 epochs) that every test loads."""
    root = tmp_path_factory.mktemp("search")
    ensure_teacher(make_cfg(root, image_tree, "teacher"), num_threads=1)
    return root


def run_search(cfg: ExperimentConfig, log=print) -> Path:
    """The search stage as `casd-ray search` runs it (after importing the module's teacher)."""
    execute(cfg, ["teacher"], log=lambda _: None)
    execute(cfg, ["search"], log=log)
    return cfg.run_dir.absolute() / TRIALS_FILE


def make_cfg(root: Path, images: Path, name: str, **search) -> ExperimentConfig:
    teacher = root / "teacher" / "teacher"
    algo = search.get("algorithm", "optuna-tpe")
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "output_dir": str(root),
            "model": {"arch": "resnet8", "width": 4},
            "data": {"dataset": "imagefolder", "root": str(images), "val_size": 40},
            "teacher": {"epochs": 3, "batch_size": 32}
            | ({"checkpoint": str(teacher)} if name != "teacher" else {}),
            # NSGA-II keeps the cost as an objective: no repair onto the budget
            "space": {"budget": {"target": 0.5}, "repair": algo != "optuna-nsga2"},
            "search": {
                "num_samples": 6,
                "max_epochs": MAX_EPOCHS,
                "grace_period": 1,
                "reduction_factor": 2,
                "max_concurrent": 2,
                "batch_size": 32,
                "population": 4,
                "sample_size": 2,
            }
            | search,
        }
    )


@pytest.mark.parametrize("algorithm", ["optuna-tpe", "optuna-nsga2", "evolution", "random"])
def test_searcher_runs_under_asha(ray_local, workdir, image_tree, algorithm):
    cfg = make_cfg(workdir, image_tree, f"s-{algorithm}", algorithm=algorithm)
    lines: list[str] = []
    path = run_search(cfg, log=lines.append)
    df = pd.read_parquet(path)

    assert path == cfg.run_dir.absolute() / TRIALS_FILE
    assert (cfg.run_dir / "config.yaml").is_file()
    assert len(df) == 6 and df["trial_id"].is_unique
    assert (df["status"] == "TERMINATED").all()
    assert df["stopped_early"].any(), "ASHA should stop some of 6 trials at 4 epochs"
    assert (df.loc[df["completed"], "epochs"] == MAX_EPOCHS).all()
    assert (df.loc[df["stopped_early"], "epochs"] < MAX_EPOCHS).all()
    assert df["is_control"].sum() == 1  # the uniform-width control was enqueued
    assert df.loc[df["is_control"], "completed"].all()  # and ASHA let it finish
    for _, row in df.iterrows():  # widths/costs recorded per trial, consistent with each other
        assert flops(WidthSpec.from_json(row["widths"])) == row["flops"]
        assert set(json.loads(row["genome"])) == {"stage0", "stage1", "stage2"}

    winner = best_completed(df)
    assert winner is not None
    assert winner["completed"] and winner["epochs"] == MAX_EPOCHS
    assert winner["meets_budget"] and winner["flops_ratio"] <= 0.5 + 1e-9
    if algorithm == "optuna-nsga2":
        front = pareto_front(df)
        assert not front.empty
        assert front["completed"].all() and (front["epochs"] == MAX_EPOCHS).all()
    else:  # repaired: every candidate sits on the budget
        assert df["meets_budget"].all()
    assert any("finished" in ln for ln in lines) and any("stopped early" in ln for ln in lines)
    assert any(ln.startswith("search done: 6 trials") for ln in lines)
    assert any("teacher logits for 4 epochs" in ln and "shared" in ln for ln in lines)


def test_diverging_trials_are_recorded_and_the_search_finishes(ray_local, workdir, image_tree):
    cfg = make_cfg(workdir, image_tree, "nan", lr=1e6, num_samples=2, scheduler="fifo")
    lines: list[str] = []
    df = pd.read_parquet(run_search(cfg, log=lines.append))
    assert len(df) == 2
    assert (df["status"] == "ERROR").all()
    assert df["error"].str.contains("FloatingPointError: non-finite loss").all()
    assert not df["completed"].any() and best_completed(df) is None
    assert sum("failed: FloatingPointError: non-finite" in ln for ln in lines) == 2


def test_a_ctrl_c_lost_before_tunes_handler_still_stops_the_search(
    ray_local, workdir, image_tree, sigint_default
):
    """Seen once in CI: a Ctrl-C right after the search's log line, before ``fit()`` had
    installed Tune's handler, was lost; the search ran to the end, was fine-tuned and exited
    0. Here the code the signal interrupts swallows its KeyboardInterrupt (as code that
    catches what it interrupts does): the search must still stop before any trial finishes,
    raise SearchInterrupted and write no table."""
    cfg = make_cfg(workdir, image_tree, "lost-sigint", num_samples=4, scheduler="fifo")

    def log(msg: str) -> None:
        if msg.startswith("search: optuna-tpe"):
            with contextlib.suppress(KeyboardInterrupt):  # lost
                signal.raise_signal(signal.SIGINT)

    with pytest.raises(SearchInterrupted, match="search interrupted: 0 of 4 trials"):
        run_search(cfg, log=log)
    assert not (cfg.run_dir / TRIALS_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's is back


def test_an_interrupt_lost_in_tunes_set_up_stops_the_search_at_its_first_step(
    ray_local, tmp_path, sigint_default
):
    """The same, lost inside ``fit()`` before Tune's handler exists (where CI's was):
    :class:`ForwardInterrupt` hands it to Tune's handler, which stops the run at once."""
    from ray import tune

    from casd_ray.search import interrupts

    def trainable(config):
        tune.report({"x": config["i"]})

    def fit(callbacks) -> int:
        tuner = tune.Tuner(
            trainable,
            param_space={"i": tune.grid_search(list(range(12)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0, callbacks=callbacks),
        )
        with interrupts.recorded():
            with contextlib.suppress(KeyboardInterrupt):  # lost before fit()
                signal.raise_signal(signal.SIGINT)
            grid = tuner.fit()
            assert interrupts.received()
        return sum(r.metrics.get("x") is not None for r in grid)

    assert fit([]) == 12  # without it Tune never hears of the interrupt
    assert fit([interrupts.ForwardInterrupt()]) < 12


def test_unreachable_budget_is_refused_before_anything_is_written(ray_local, workdir, image_tree):
    cfg = make_cfg(workdir, image_tree, "tight")
    cfg.space.budget.target = 1e-4
    with pytest.raises(BudgetError, match="space.budget.target"):
        execute(cfg, ["teacher", "search"], log=lambda _: None)
    assert not cfg.run_dir.exists()


def test_trials_larger_than_the_local_instance_are_refused(ray_local, workdir, image_tree):
    cfg = make_cfg(workdir, image_tree, "big", cpus_per_trial=999)
    with pytest.raises(ConfigError, match="search.cpus_per_trial: 999 per trial"):
        execute(cfg, ["teacher", "search"], log=lambda _: None)
    assert not cfg.run_dir.exists()


def test_killed_search_resumes_without_rerunning_finished_trials(ray_local, workdir, image_tree):
    # enough epochs per trial that the watcher (Tune snapshots every second) catches the
    # search with some trials finished and others still to run, even on an idle machine
    cfg = make_cfg(workdir, image_tree, "resume", scheduler="fifo", max_epochs=10)
    save_config(cfg, workdir / "resume.yaml")
    execute(cfg, ["teacher"], log=lambda _: None)
    log = workdir / "resume-driver.log"
    finished = kill_search_midway(workdir / "resume.yaml", ray_local, cfg.run_dir / "search", log)
    assert len(finished) >= 2, log.read_text()[-2000:]
    assert not (cfg.run_dir / TRIALS_FILE).exists(), "the driver finished before it was killed"
    assert len(finished) < 6, "every trial had finished before the kill: nothing to resume"

    lines: list[str] = []  # the same command again: resumes (Tune's files pass the signatures)
    df = pd.read_parquet(run_search(cfg, log=lines.append)).set_index("trial_id")
    assert any(ln.startswith("search: resuming") for ln in lines)
    assert len(df) == 6 and df.index.is_unique
    assert (df["status"] == "TERMINATED").all() and df["completed"].all()
    assert (df["epochs"] == cfg.search.max_epochs).all()
    for trial_id, last in finished.items():  # kept, not rerun: same final report
        assert df.loc[trial_id, "end_time"] == pytest.approx(last["timestamp"])
        assert df.loc[trial_id, "last_val_acc"] == pytest.approx(last["val_acc"])
    teacher_spec = read_spec(cfg.run_dir / "teacher" / "widths.json")
    table = trials_table(cfg.run_dir / "search", rules_of(cfg), cfg.search.max_epochs, teacher_spec)
    assert table.shape[0] == 6
    # every checkpoint is kept while the search runs (a resume may need any); a finished
    # search keeps only each trial's last one
    # (a trial the killed driver had started but not yet saved in Tune's state is redone
    # under a new id: its orphaned folder is trimmed too, and is in no table)
    trial_dirs = [d for d in (cfg.run_dir / "search").iterdir() if d.is_dir()]
    kept = {d.name: sorted(c.name for c in d.glob("checkpoint_*")) for d in trial_dirs}
    assert all(len(v) <= 1 for v in kept.values()), kept
    for trial_id in df.index:
        (mine,) = [v for k, v in kept.items() if f"_{trial_id}_" in k]
        assert mine == [f"checkpoint_{cfg.search.max_epochs - 1:06d}"], (trial_id, mine)
    again: list[str] = []  # `casd-ray run` after a finished search: nothing is rerun
    run_search(cfg, log=again.append)
    assert any("search: reusing" in ln for ln in again)
    assert pd.read_parquet(cfg.run_dir / TRIALS_FILE).equals(df.reset_index())


def test_dashboard_hint_names_the_token(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/secrets/ray-token")
    assert "/secrets/ray-token" in dashboard_login_hint()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert "$RAY_AUTH_TOKEN" in dashboard_login_hint()


def delayed(phase: int):
    """:func:`distill_trial` slowed down per epoch by an amount drawn from the genome and
    ``phase``: each phase makes a different trial of a generation finish first."""

    def delayed_trial(config, **kwargs):
        import time as time_mod

        from ray import tune

        key = json.dumps({k: round(float(v), 6) for k, v in sorted(config.items())})
        delay = 1.0 * ((int(hashlib.sha256(key.encode()).hexdigest(), 16) + phase) % 2)

        def report(metrics, checkpoint=None):
            time_mod.sleep(delay)
            tune.report(metrics, checkpoint=checkpoint)

        return distill_trial(config, report=report, **kwargs)

    return delayed_trial


def test_generations_make_the_search_independent_of_timing(ray_local, workdir, image_tree):
    """Same seed, different trial timing: with ``generation_size`` the same trials, stops and
    scores (the proposals and ASHA's stops see only finished generations)."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    outcomes = []
    for phase in (0, 1):
        cfg = make_cfg(workdir, image_tree, f"gen-{phase}", generation_size=2, num_samples=6)
        execute(cfg, ["teacher"], log=lambda _: None)
        path = search_with(cfg, delayed(phase))
        df = pd.read_parquet(path)
        outcomes.append(
            sorted(zip(df["genome"], df["epochs"], df["best_val_acc"].round(6), strict=True))
        )
        assert len(df) == 6 and df["stopped_early"].any() and df["is_control"].sum() == 1
    assert outcomes[0] == outcomes[1]
