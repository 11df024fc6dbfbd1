"""The run report: report.json, report.md, pareto.png and progress.png, from saved files only.

Everything here reads the run folder (config.yaml, trials.parquet, teacher/, finetune.json)
and recomputes nothing expensive, so ``casd-ray report RUN_DIR`` can rebuild the report on
any machine that has the folder. Parts of the pipeline that have not run yet are left out
of the report (and said so) rather than failing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from casd_ray.export import PARTS, SUMMARY, read_summary  # noqa: E402
from casd_ray.files import ArtifactError, atomic_write, write_json  # noqa: E402
from casd_ray.trials import TRIALS_FILE, eligible, read_trials  # noqa: E402

NAMES = ("teacher", "uniform", "winner")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
        "data": _read_json(run_dir / "teacher" / "data.json"),
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
        report["finetune"] = config.get("finetune")
    else:
        teacher = _read_json(run_dir / "teacher" / "metrics.json")
        if teacher is not None:
            report["models"] = {"teacher": teacher}
        report["missing"].append(f"{SUMMARY} (run `casd-ray finetune`)")
    trials = _load_trials(run_dir)
    if trials is not None:
        report["search"] = search_summary(trials, config)
    else:
        report["missing"].append("trials.parquet (run `casd-ray search`)")
    return report


# --------------------------------------------------------------------------- plots


def _teacher_point(report: dict) -> tuple[float, float] | None:
    t = report.get("models", {}).get("teacher")
    if t and "flops" in t and "val_acc" in t:
        return t["flops"], t["val_acc"]
    return None


def plot_pareto(trials: pd.DataFrame, report: dict, path: Path) -> None:
    """Search val_acc against FLOPs for every scored trial, with the three final models."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    scored = trials[trials["best_val_acc"].notna()]
    done = scored[scored["completed"].astype(bool)]
    early = scored[~scored["completed"].astype(bool)]
    ax.scatter(
        done["flops"] / 1e6,
        done["best_val_acc"],
        c="tab:blue",
        s=28,
        label=f"trial, all epochs ({len(done)})",
    )
    ax.scatter(
        early["flops"] / 1e6,
        early["best_val_acc"],
        c="tab:gray",
        marker="x",
        s=28,
        label=f"trial, stopped early ({len(early)})",
    )
    models = report.get("models", {})
    styles = {
        "teacher": ("*", "black", 14),
        "uniform": ("s", "tab:orange", 9),
        "winner": ("D", "tab:red", 9),
    }
    for name in NAMES:
        m = models.get(name)
        if not m or "val_acc" not in m:
            continue
        marker, color, size = styles[name]
        label = name if name == "teacher" else f"{name} (fine-tuned)"
        ax.plot(
            m["flops"] / 1e6,
            m["val_acc"],
            marker=marker,
            color=color,
            markersize=size,
            linestyle="none",
            label=label,
        )
        tid = (m.get("search") or {}).get("trial_id")
        row = scored[scored["trial_id"].astype(str) == str(tid)] if tid is not None else None
        if row is not None and not row.empty:
            ax.scatter(
                row["flops"] / 1e6,
                row["best_val_acc"],
                s=160,
                facecolors="none",
                edgecolors=color,
                linewidths=1.5,
                label=f"{name}'s search trial",
            )
    budget = report.get("search", {}).get("budget", {})
    teacher = _teacher_point(report)
    if teacher and budget.get("metric") == "flops" and budget.get("target"):
        ax.axvline(
            teacher[0] * budget["target"] / 1e6,
            color="tab:green",
            linestyle="--",
            linewidth=1,
            label=f"budget ({budget['target']:g} of teacher FLOPs)",
        )
    ax.set_xlabel("MFLOPs per image (2 per multiply-add)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Search: accuracy vs cost\n(trial scores: the search's short distill)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never hides points
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def plot_progress(trials: pd.DataFrame, path: Path) -> None:
    """Best validation accuracy so far, by trials finished and by wall time."""
    scored = trials[trials["best_val_acc"].notna()].copy()
    order = "end_time" if "end_time" in scored and scored["end_time"].notna().all() else None
    if order:
        scored = scored.sort_values(order, kind="stable")
    ok = eligible(scored)
    best_any = scored["best_val_acc"].cummax()
    best_ok = scored["best_val_acc"].where(ok).cummax()
    n = range(1, len(scored) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    axes[0].step(n, best_ok, where="post", color="tab:blue", label="completed, within budget")
    axes[0].step(n, best_any, where="post", color="tab:gray", linestyle="--", label="any trial")
    axes[0].set_xlabel("trials finished")
    axes[0].set_ylabel("best validation accuracy so far")
    if order:
        t = (scored["end_time"] - trials["start_time"].min()) / 60
        axes[1].step(t, best_ok, where="post", color="tab:blue", label="completed, within budget")
        axes[1].step(t, best_any, where="post", color="tab:gray", linestyle="--", label="any")
    axes[1].set_xlabel("wall time since the first trial started (min)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Search progress")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _rank(s: dict | None) -> str:
    if not s or s.get("trial_id") is None:
        return "not a trial"
    if s.get("rank") is not None:
        return f"{s['rank']} of {s['of']}"
    if s.get("rank_all") is not None:
        return f"{s['rank_all']} of {s['of_all']} (stopped early)"
    return "not scored"


def render_markdown(report: dict) -> str:
    """report.json as tables, plus how to reproduce the run."""
    lines = [f"# casd-ray report: {report['name']}", ""]
    models = report.get("models", {})
    if "winner" in models:
        lat = report["latency"]
        b1, bn = (str(b) for b in (lat["batch_sizes"][0], lat["batch_sizes"][-1]))
        lines += [
            "## Result",
            "",
            f"| model | test acc | val acc | MFLOPs | params (k) | FLOPs ratio | "
            f"CPU ms (batch {b1}) | CPU ms/img (batch {bn}) | search rank |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name in NAMES:
            m = models[name]
            ms = m["latency"]
            lines.append(
                f"| {name} | {_pct(m['test_acc'])} | {_pct(m['val_acc'])} | "
                f"{m['flops'] / 1e6:.2f} | {m['params'] / 1e3:.1f} | {m['flops_ratio']:.3f} | "
                f"{ms['batch_ms'][b1]:.2f} | {ms['per_image_ms'][bn]:.3f} | "
                f"{_rank(m.get('search')) if name != 'teacher' else '–'} |"
            )
        lines += [
            "",
            f"FLOPs reduction of the winner: **{100 * report['flops_reduction']:.1f}%** "
            f"(params: {100 * report['params_reduction']:.1f}%). FLOPs are counted by "
            "`torch.utils.flop_counter.FlopCounterMode` on a real forward: 2 FLOPs per "
            "multiply-add, conv and linear layers only.",
            f"CPU latency: median of repeated eval forwards, {lat['threads']} thread(s), "
            f"batch sizes {lat['batch_sizes']}.",
            "Uniform = every layer at one keep-ratio, at the same budget (the search's control "
            "trial when there is one); winner and uniform "
            "are pruned from the teacher and fine-tuned with the same recipe, seed and "
            "distillation. The test split is used only for this table; the winner was chosen "
            "on validation accuracy.",
            "",
        ]
    elif "teacher" in models:
        t = models["teacher"]
        lines += [
            "## Teacher",
            "",
            f"val acc {_pct(t.get('val_acc'))}, test acc {_pct(t.get('test_acc'))}",
            "",
        ]
    s = report.get("search")
    if s:
        lines += ["## Search", "", "| | |", "|---|---|"]
        rows = [
            ("searcher", s["searcher"]),
            ("scheduler", s["scheduler"]),
            ("budget", f"{s['budget']['metric']} <= {s['budget']['target']} of the teacher"),
            ("granularity", s["granularity"]),
            ("trials", s["trials"]),
            ("completed (all epochs)", s["completed"]),
            ("stopped early", s["early_stopped"]),
            ("failed", s["failed"]),
            ("eligible (completed, within budget)", s["eligible"]),
            ("wall time", "–" if s["wall_time_s"] is None else f"{s['wall_time_s']:.1f} s"),
            ("trial time (sum)", f"{s['trial_time_s']:.1f} s"),
        ]
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines += ["", "![pareto](pareto.png)", "", "![progress](progress.png)", ""]
    r = report["reproduce"]
    lines += [
        "## Reproduce",
        "",
        "The resolved config of this run is saved next to this report; rerunning it",
        "reuses every finished stage and redoes only what is missing:",
        "",
        "```",
        r["command"],
        r["report_command"] + "   # rebuild this report from the saved results",
        "```",
        "",
    ]
    if report.get("missing"):
        lines += ["Not yet available: " + "; ".join(report["missing"]), ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> Path:
    """Write report.json, report.md, pareto.png and progress.png into ``run_dir``.

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
    write_json(run_dir / "report.json", report)
    md = run_dir / "report.md"
    atomic_write(md, lambda p: p.write_text(render_markdown(report)))
    return md


__all__ = ["PARTS", "build_report", "build_report_json", "render_markdown", "search_summary"]
