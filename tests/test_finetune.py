"""Fine-tune stage: winner selection, the uniform control, export, and reuse on rerun."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from conftest import finetune_stage, rules_of, tiny_config

from casd_ray.artifacts.network import (
    FILES,
    ONNX_FILE,
    PREPROCESSING,
    load_compressed,
    load_network,
    load_torchscript,
)
from casd_ray.artifacts.trials import rank_of, read_trials, select_winner
from casd_ray.errors import ArtifactError, SelectionError
from casd_ray.models.family import flops, spec_for
from casd_ray.models.latency import Latency
from casd_ray.models.resnet import WidthSpec
from casd_ray.pipeline import latency as pipeline_latency
from casd_ray.pipeline.stages import finetune
from casd_ray.pipeline.stages.finetune import uniform_spec
from casd_ray.train import kd
from casd_ray.widths import space
from casd_ray.widths.latency_model import LatencyModel


def _table(**cols) -> pd.DataFrame:
    base = {
        "trial_id": ["a", "b", "c", "d", "e"],
        "best_val_acc": [0.8, 0.9, 0.9, 0.95, 0.99],
        "flops": [10, 30, 20, 5, 5],
        "completed": [True, True, True, True, False],
        "meets_budget": [True, True, True, False, True],
        "status": ["TERMINATED"] * 5,
    }
    base.update(cols)
    return pd.DataFrame(base)


def test_winner_is_best_eligible_and_ties_go_to_fewer_flops():
    # d is over budget, e stopped early: neither may win; b and c tie, c is cheaper.
    assert select_winner(_table())["trial_id"] == "c"


def test_errored_and_unscored_trials_never_win():
    t = _table(status=["TERMINATED", "TERMINATED", "ERROR", "TERMINATED", "TERMINATED"])
    t.loc[1, "best_val_acc"] = None
    assert select_winner(t)["trial_id"] == "a"


def test_no_eligible_trial_is_a_one_line_error():
    t = _table(completed=[False] * 5)
    with pytest.raises(SelectionError, match="no completed trial within the budget") as err:
        select_winner(t)
    assert "\n" not in str(err.value)


def test_rank_of_counts_better_trials():
    t = _table()
    assert rank_of(t, "c") == {"trial_id": "c", "rank": 1, "of": 3, "rank_all": 3, "of_all": 5}
    assert rank_of(t, "a")["rank"] == 3
    assert rank_of(t, "e")["rank"] is None and rank_of(t, "e")["rank_all"] == 1
    assert rank_of(t, None)["rank"] is None


def test_uniform_without_control_is_repaired_to_the_winners_cost(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, space={"repair": False})
    teacher = spec_for("resnet8", in_channels=1, image_size=(28, 28), width=8)
    genome = {n: 0.3 + 0.1 * i for i, n in enumerate(space.gene_names(teacher, "stage"))}
    winner_spec = space.candidate_spec(rules_of(cfg), teacher, genome)
    ratio = flops(winner_spec) / flops(teacher)
    row = pd.Series({"flops_ratio": ratio, "widths": winner_spec.model_dump_json()})
    spec, trial_id = uniform_spec(
        pd.DataFrame({"is_control": [False]}), rules_of(cfg), teacher, row
    )
    assert trial_id is None
    assert flops(spec) <= flops(winner_spec)
    assert flops(spec) / flops(teacher) > ratio - 0.1  # within rounding of the same cost


def test_run_finetune_exports_winner_and_uniform(finetuned_run):
    cfg, summary, logs = finetuned_run
    trials = pd.read_parquet(cfg.run_dir / "trials.parquet")
    for part in ("winner", "uniform"):
        folder = cfg.run_dir / part
        assert {p.name for p in folder.iterdir()} == {
            *FILES,
            ONNX_FILE,
            PREPROCESSING,
        }  # no last.pt
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 0 <= metrics["test_acc"] <= 1 and 0 <= metrics["val_acc"] <= 1
        assert metrics["flops"] == metrics["flops_measured"]
        assert len(metrics["history"]) == cfg.finetune.epochs
        x = torch.randn(4, 1, 28, 28)
        model = load_compressed(folder)
        with torch.no_grad():
            torch.testing.assert_close(load_torchscript(folder)(x), model(x), rtol=0, atol=1e-6)
    winner = json.loads((cfg.run_dir / "winner" / "metrics.json").read_text())
    uniform = json.loads((cfg.run_dir / "uniform" / "metrics.json").read_text())
    assert winner["trial_id"] == "t1"  # t3 scored higher but was stopped early
    assert uniform["trial_id"] == "t0"  # the control trial
    control = trials.set_index("trial_id").loc["t0", "widths"]
    assert WidthSpec.load(cfg.run_dir / "uniform" / "widths.json") == WidthSpec.from_json(control)
    models = summary["models"]
    assert set(models) == {"teacher", "uniform", "winner"}
    assert models["winner"]["flops_ratio"] <= cfg.space.budget.target
    assert models["winner"]["search"]["rank"] == 1  # best of the completed trials
    assert models["winner"]["search"]["rank_all"] == 2  # behind the stopped-early t3
    for name in models:
        assert set(models[name]["latency"]["batch_ms"]) == {"1", "64"}
    assert summary["flops_reduction"] >= 1 - cfg.space.budget.target


def test_a_uniform_copied_from_the_winner_is_timed_once(finetuned_run, tmp_path, monkeypatch):
    """When the uniform control wins, ``uniform/`` is the winner's copy: one network, one
    latency. Timed twice, the same network showed two latencies, and against a latency
    budget two verdicts (a real run: 21.28 ms "within budget", 22.17 ms "no")."""
    cfg, _, _ = finetuned_run
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path)})
    shutil.copytree(finetuned_run[0].run_dir, cfg.run_dir)
    trials = read_trials(cfg.run_dir / "trials.parquet")
    trials.loc[trials["trial_id"] == "t0", "best_val_acc"] = 0.999  # the control wins
    trials.to_parquet(cfg.run_dir / "trials.parquet")
    for part in ("winner", "uniform"):
        shutil.rmtree(cfg.run_dir / part)
    logs: list[str] = []
    models = finetune_stage(cfg, log=logs.append)["models"]
    assert any("uniform/ is a copy of winner/" in line for line in logs)
    assert models["uniform"]["latency"] == models["winner"]["latency"]

    timed: list[list[str]] = []

    def rounds(nets, dep, rounds=3):  # distinct figures for distinct networks
        timed.append(list(nets))
        return {n: [Latency(1.0 + i, 0.0, 5)] * rounds for i, n in enumerate(nets)}

    monkeypatch.setattr(pipeline_latency, "measure_rounds", rounds)
    model = LatencyModel((1.0, 0, 0, 0, 0), 1.0, 0.5, "torch", (1, 1, 28, 28), 1)
    out = finetune._budget_latency(cfg.run_dir, load_network(cfg.run_dir / "teacher"), model, print)
    assert timed == [["teacher", "winner"]]
    assert out["measured"]["uniform"] == out["measured"]["winner"]


def test_rerun_reuses_finished_outputs(finetuned_run):
    cfg, summary, _ = finetuned_run
    mtimes = {p: p.stat().st_mtime_ns for p in (cfg.run_dir / "winner").iterdir()}
    logs: list[str] = []
    again = finetune_stage(cfg, log=logs.append)
    assert any("reusing" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in (cfg.run_dir / "winner").iterdir()} == mtimes
    for name, m in summary["models"].items():  # the same networks (latency is re-measured)
        assert {k: v for k, v in again["models"][name].items() if k != "latency"} == {
            k: v for k, v in m.items() if k != "latency"
        }


def test_changed_recipe_redoes_the_finetune(finetuned_run, tmp_path):
    cfg, _, _ = finetuned_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg2 = cfg.model_copy(
        update={
            "output_dir": str(tmp_path),
            "finetune": cfg.finetune.model_copy(update={"lr": 0.01}),
        }
    )
    teacher_stamp = (cfg2.run_dir / "teacher" / "model.pt").stat().st_mtime_ns
    logs: list[str] = []
    finetune_stage(cfg2, log=logs.append)
    assert (cfg2.run_dir / "teacher" / "model.pt").stat().st_mtime_ns == teacher_stamp
    assert not any(line.startswith("finetune: reusing") for line in logs)
    saved = json.loads((cfg2.run_dir / "winner" / "metrics.json").read_text())
    assert saved["settings"]["finetune"]["lr"] == 0.01


def test_missing_or_foreign_trials_table_is_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="run the search first"):
        read_trials(tmp_path / "trials.parquet")
    (tmp_path / "trials.parquet").write_bytes(b"PAR1 torn")
    with pytest.raises(ArtifactError, match="not a readable parquet"):
        read_trials(tmp_path / "trials.parquet")
    pd.DataFrame({"trial_id": ["a"]}).to_parquet(tmp_path / "trials.parquet")
    with pytest.raises(ArtifactError, match="missing columns"):
        read_trials(tmp_path / "trials.parquet")


def _without_students(cfg, out):
    """A copy of the finished run with its fine-tuned networks removed."""
    shutil.copytree(cfg.run_dir, out / cfg.name)
    for part in ("winner", "uniform"):
        shutil.rmtree(out / cfg.name / part)
    return cfg.model_copy(update={"output_dir": str(out)})


def test_teacher_logits_are_computed_once_and_change_nothing(finetuned_run, tmp_path, monkeypatch):
    """Winner and uniform train on the same batches: the teacher's logits are computed once
    for both, and both networks equal those of distillation with the teacher run per batch."""
    cfg, _, _ = finetuned_run
    kd._CACHE.clear()
    calls = []
    real = kd.teacher_logits
    monkeypatch.setattr(kd, "teacher_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared, logs = _without_students(cfg, tmp_path / "shared"), []
    finetune_stage(shared, log=logs.append)
    assert len(calls) == 1 and sum("computed once" in line for line in logs) == 1
    monkeypatch.setattr(kd, "LOGITS_MAX_BYTES", 0)  # too big: run the teacher
    per_batch = _without_students(cfg, tmp_path / "per_batch")
    finetune_stage(per_batch)
    assert len(calls) == 1
    keys, runs = ("loss", "acc", "val_loss", "val_acc"), (shared, per_batch)
    for part in ("winner", "uniform"):
        a, b = (json.loads((c.run_dir / part / "metrics.json").read_text()) for c in runs)
        assert a["test_acc"] == b["test_acc"]
        assert [{k: h[k] for k in keys} for h in a["history"]] == [
            {k: h[k] for k in keys} for h in b["history"]
        ]


@pytest.mark.parametrize("name, damage", [("model.pt", b"garbled"), ("widths.json", b"{}")])
def test_a_garbled_export_is_redone_not_reused(finetuned_run, tmp_path, name, damage):
    """D10: a garbled winner/model.pt or widths.json passed reruns; exports are re-checked."""
    cfg, _, _ = finetuned_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg2 = cfg.model_copy(update={"output_dir": str(tmp_path)})
    (cfg2.run_dir / "winner" / name).write_bytes(damage)
    logs: list[str] = []
    finetune_stage(cfg2, log=logs.append)
    assert "finetune: reusing" not in " ".join(x for x in logs if "winner" in x)
    assert any("reusing" in x and "uniform" in x for x in logs)  # only the broken part redone
    load_compressed(cfg2.run_dir / "winner")


def test_exports_carry_their_preprocessing(finetuned_run):
    """Also seen: the mean/std/classes an export expects were only in teacher/data.json."""
    cfg, _, _ = finetuned_run
    data = json.loads((cfg.run_dir / "teacher" / "data.json").read_text())
    for part in ("winner", "uniform"):
        net = load_compressed(cfg.run_dir / part)
        pre = net.preprocessing
        assert pre == json.loads((cfg.run_dir / part / "preprocessing.json").read_text())
        assert (pre["mean"], pre["std"], pre["classes"]) == (
            data["mean"],
            data["std"],
            data["classes"],
        )
        assert pre["shape"] == data["shape"] and "pixels / 255" in pre["formula"]
