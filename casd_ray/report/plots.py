"""The report's plots: search accuracy vs cost, search progress, and where the channels went.

Each reads only what the run folder holds and writes one PNG atomically; matplotlib runs
headless (Agg), so a report builds on any machine.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from casd_ray.artifacts.network import read_group_widths  # noqa: E402
from casd_ray.artifacts.trials import eligible  # noqa: E402
from casd_ray.errors import ArtifactError  # noqa: E402
from casd_ray.files import atomic_write  # noqa: E402

NAMES = ("teacher", "uniform", "winner")


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


def plot_widths(run_dir: Path, path: Path) -> dict[str, dict[str, int]] | None:
    """Kept channels per group for teacher, uniform and winner (their ``widths.json``).

    Returns the plotted widths (for report.json), or None when the fine-tune has not run.
    """
    try:
        widths = {name: read_group_widths(Path(run_dir) / name / "widths.json") for name in NAMES}
    except ArtifactError:
        return None
    groups = list(widths["teacher"])
    x = range(len(groups))
    fig, ax = plt.subplots(figsize=(max(8, 0.12 * len(groups) + 4), 4.5))
    styles = {
        "teacher": ("k", "--", ""),
        "uniform": ("tab:orange", "-", "s"),
        "winner": ("tab:red", "-", "D"),
    }
    for name in NAMES:
        color, line, marker = styles[name]
        ys = [widths[name][g] for g in groups]
        ax.plot(x, ys, color=color, linestyle=line, marker=marker, markersize=3, label=name)
    if len(groups) <= 40:
        ax.set_xticks(list(x), groups, rotation=90, fontsize=7)
    else:
        ax.set_xlabel(f"channel group (network order, {len(groups)} groups)")
    ax.set_ylabel("kept channels")
    ax.set_title("Where the channels went")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return widths


def plot_latency(report: dict, path: Path) -> None:
    """Test accuracy against latency measured on the budget's runtime, with the target."""
    lat, models = report["budget_latency"], report["models"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in NAMES:
        m = lat["measured"][name]
        ax.errorbar(m["median_ms"], models[name]["test_acc"], xerr=m["iqr_ms"] / 2, fmt="o",
                    capsize=3, label=name)  # fmt: skip
    ax.axvline(lat["target_ms"], color="grey", linestyle="--", label="latency budget")
    ax.set_xlabel(f"ms per batch of {lat['shape'][0]} ({lat['runtime']}, median, IQR)")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
