"""The run report: report.json, report.md and the plots, from the run folder's saved files.

Everything here reads the run folder (config.yaml, trials.parquet, teacher/, finetune.json)
and recomputes nothing expensive, so ``casd-ray report RUN_DIR`` can rebuild the report on
any machine that has the folder. Parts of the pipeline that have not run yet are left out
of the report (and said so) rather than failing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from casd_ray.artifacts.network import preprocessing_of
from casd_ray.artifacts.run_folder import PARTS, SUMMARY, read_summary
from casd_ray.artifacts.trials import TRIALS_FILE, eligible, read_trials
from casd_ray.errors import ArtifactError
from casd_ray.files import atomic_write, read_json, write_json
from casd_ray.report.deploy import deploy_choice
from casd_ray.report.markdown import render_markdown
from casd_ray.report.plots import plot_pareto, plot_progress, plot_widths
from casd_ray.report.stats import split_noise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_data(path: Path) -> dict | None:
    """The teacher's data summary; absent before the teacher ran, refused when damaged (the
    noise estimates and the deploy notes need it: dropping it would make a lesser report)."""
    if not path.exists():
        return None
    return read_json(path, hint="rerun the same `casd-ray run` command to rewrite it")


def _load_trials(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / TRIALS_FILE
    return read_trials(path) if path.exists() else None


def search_summary(trials: pd.DataFrame, config: dict) -> dict:
    """Counts, wall time and the search settings that produced ``trials``."""
    s, budget = config.get("search", {}), config.get("space", {}).get("budget", {})
    start = trials["start_time"].min() if "start_time" in trials else None
    end = trials["end_time"].max() if "end_time" in trials else None
    wall = float(end - start) if pd.notna(start) and pd.notna(end) else None
    return {
        "trials": len(trials),
        "completed": int(trials["completed"].astype(bool).sum()),
        "early_stopped": int(trials["stopped_early"].astype(bool).sum()),
        "failed": int((trials["status"] == "ERROR").sum()),
        "meets_budget": int(trials["meets_budget"].astype(bool).sum()),
        "eligible": int(eligible(trials).sum()),
        "wall_time_s": round(wall, 2) if wall is not None else None,
        "trial_time_s": round(float(trials["wall_time_s"].fillna(0).sum()), 2),
        "searcher": s.get("algorithm"),
        "scheduler": s.get("scheduler"),
        "num_samples": s.get("num_samples"),
        "max_epochs": s.get("max_epochs"),
        "granularity": config.get("space", {}).get("granularity"),
        "repair": config.get("space", {}).get("repair"),
        "budget": {"metric": budget.get("metric"), "target": budget.get("target")},
    }


def build_report_json(run_dir: Path) -> dict:
    """Gather everything the report shows into one JSON-able dict."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict):
        raise ArtifactError(f"{run_dir / 'config.yaml'}: not a casd-ray config (corrupt YAML)")
    report: dict[str, Any] = {
        "name": config.get("name", run_dir.name),
        "run_dir": str(run_dir),
        "reproduce": {
            "config": str(run_dir / "config.yaml"),
            "command": f"casd-ray run {run_dir / 'config.yaml'}",
            "report_command": f"casd-ray report {run_dir}",
        },
        "data": _read_data(run_dir / "teacher" / "data.json"),
        "model": config.get("model"),
        "flops_convention": "FlopCounterMode: 2 FLOPs per multiply-add; conv and linear only",
        "missing": [],
    }
    # A corrupt summary is an error, not "not yet run": a complete report must never be
    # replaced by a teacher-only one.
    summary = run_dir / SUMMARY
    finetune = read_summary(summary) if summary.exists() else None
    if finetune is not None:
        report["models"] = finetune["models"]
        report["flops_reduction"] = finetune["flops_reduction"]
        report["params_reduction"] = finetune["params_reduction"]
        lat = finetune["models"]["teacher"]["latency"]
        report["latency"] = {
            "device": "cpu",
            "threads": lat["threads"],
            "batch_sizes": [int(b) for b in lat["batch_ms"]],
            "statistic": "median wall time of repeated eval forwards (torch.inference_mode)",
        }
        report["search_rank"] = {p: finetune["models"][p].get("search") for p in PARTS}
        report["noise"] = split_noise(finetune["models"], report["data"])
        report["finetune"] = config.get("finetune")
    else:
        teacher = _read_json(run_dir / "teacher" / "metrics.json")
        if teacher is not None:
            report["models"] = {"teacher": teacher}
        report["missing"].append(f"{SUMMARY} (run `casd-ray finetune`)")
    audit = run_dir / "audit.json"
    if audit.exists():
        report["audit"] = read_json(audit, hint="rerun the same command to rebuild it")
    if finetune is not None:
        report["deploy"] = deploy_choice(run_dir, finetune["models"], report.get("audit"))
        if report["data"] is not None:  # what its inputs must look like (preprocessing.json)
            report["deploy"]["preprocessing"] = preprocessing_of(report["data"])
    trials = _load_trials(run_dir)
    if trials is not None:
        report["search"] = search_summary(trials, config)
    else:
        report["missing"].append("trials.parquet (run `casd-ray search`)")
    return report


def build_report(run_dir: str | Path) -> Path:
    """Write report.json, report.md, pareto.png, progress.png and widths.png into ``run_dir``.

    Returns the path of report.md.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ArtifactError(f"{run_dir / 'config.yaml'}: not found; is this a run folder?")
    report = build_report_json(run_dir)
    trials = _load_trials(run_dir)
    if trials is not None and len(trials):
        plot_pareto(trials, report, run_dir / "pareto.png")
        plot_progress(trials, run_dir / "progress.png")
    report["width_profile"] = plot_widths(run_dir, run_dir / "widths.png")
    write_json(run_dir / "report.json", report)
    md = run_dir / "report.md"
    atomic_write(md, lambda p: p.write_text(render_markdown(report)))
    return md
