"""The run report: report.json, report.md and the plots (:mod:`casd_ray.plots`), from saved files.

Everything here reads the run folder (config.yaml, trials.parquet, teacher/, finetune.json)
and recomputes nothing expensive, so ``casd-ray report RUN_DIR`` can rebuild the report on
any machine that has the folder. Parts of the pipeline that have not run yet are left out
of the report (and said so) rather than failing it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from casd_ray.export import PARTS, SUMMARY, read_summary, validated_pick
from casd_ray.files import ArtifactError, atomic_write, read_json, write_json
from casd_ray.plots import NAMES, plot_pareto, plot_progress, plot_widths
from casd_ray.trials import TRIALS_FILE, eligible, read_trials


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
    trials = _load_trials(run_dir)
    if trials is not None:
        report["search"] = search_summary(trials, config)
    else:
        report["missing"].append("trials.parquet (run `casd-ray search`)")
    return report


def binomial_se(n: int, *accs: float) -> float:
    """Standard error of one accuracy measured on ``n`` images, or of the difference of
    several measured independently: sqrt(sum p(1-p) / n)."""
    return math.sqrt(sum(p * (1 - p) for p in accs) / n)


def split_noise(models: dict, data: dict | None) -> dict:
    """Winner − uniform on each split beside the standard error of that difference.

    Binomial and unpaired, sqrt((p(1-p) + q(1-q)) / n): an upper bound, since two networks
    pruned from one teacher mostly err on the same images. Without per-image predictions the
    paired (McNemar) error cannot be computed; this bound is what the stored results allow.
    """
    sizes = (data or {}).get("sizes", {})
    out = {}
    for split in ("val", "test"):
        p, q, n = (
            models["winner"].get(f"{split}_acc"),
            models["uniform"].get(f"{split}_acc"),
            sizes.get(split),
        )
        if p is None or q is None or not n:
            continue
        out[split] = {
            "images": n,
            "winner_minus_uniform": p - q,
            "se_difference": binomial_se(n, p, q),
        }
    return out


def _noise_line(noise: dict | None) -> list[str]:
    if not noise or set(noise) != {"val", "test"}:
        return []
    v, t = noise["val"], noise["test"]
    return [
        f"Winner − uniform: **{100 * v['winner_minus_uniform']:+.2f}** points on validation, "
        f"**{100 * t['winner_minus_uniform']:+.2f}** on test. With {v['images']:,} validation "
        f"and {t['images']:,} test images the standard error of such a difference is at most "
        f"±{100 * v['se_difference']:.2f} and ±{100 * t['se_difference']:.2f} points "
        "(binomial, unpaired: an upper bound). A difference within about two of these is no "
        "evidence that either network is better; `casd-ray compare` measures the spread over "
        "seeds.",
    ]


def deploy_choice(run_dir: Path, models: dict, audit: dict | None) -> dict:
    """Which exported network to deploy: :func:`validated_pick` over winner, uniform and the
    audited trials (each fine-tuned with the final recipe; ``audit/<trial>/``)."""
    candidates = {p: models[p] for p in PARTS}
    parts = {str((models[p].get("search") or {}).get("trial_id")) for p in PARTS}
    for row in (audit or {}).get("trials", []):
        if str(row["trial_id"]) not in parts:
            candidates[f"audit/{row['trial_id']}"] = {
                "val_acc": row["final_val_acc"],
                "flops_ratio": row["flops_ratio"],
            }
    pick = validated_pick(candidates)
    return {
        "part": pick,
        "folder": str(run_dir / pick),
        "rule": "highest validation accuracy after the identical fine-tune",
        "val_acc": {name: c["val_acc"] for name, c in candidates.items()},
    }


def _deploy_line(deploy: dict | None) -> list[str]:
    if not deploy:
        return []
    part = deploy["part"]
    why = {
        "winner": "the search's winner validated highest after the identical fine-tune",
        "uniform": "after the identical fine-tune the search's winner did not validate higher "
        "than uniform slimming, so the search's choice is not shipped",
    }.get(part, "an audited trial validated highest after the identical fine-tune")
    scores = ", ".join(f"{name} {_pct(v)}" for name, v in deploy["val_acc"].items())
    return [
        "",
        f"**Deploy `{part}/`** ({deploy['folder']}): {why} (validation accuracy: {scores}; "
        "the test split chooses nothing).",
    ]


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


def _audit_lines(audit: dict | None, val_images: int | None) -> list[str]:
    if audit is None:
        return []
    lines = ["## How far to trust the search ranking", ""]
    if not audit.get("top_k"):
        return lines + [
            "The proxy-fidelity audit is off (`audit.top_k: 0`). Run it with `casd-ray run "
            "CONFIG --set audit.top_k=5`: it fine-tunes the 5 best completed trials (and the "
            "uniform control) with the final recipe, one fine-tune each, and reports how well "
            "the search's score predicts their final validation accuracy.",
            "",
        ]

    def num(x: float | None) -> str:
        return "undefined" if x is None else f"{x:.2f}"

    rows = audit["trials"]
    acc = sum(r["final_val_acc"] for r in rows) / len(rows) if rows else None
    same = "Both scores are measured on the same validation images"
    if val_images and acc is not None:
        se = 100 * binomial_se(val_images, acc)
        same += (
            f" ({val_images:,}; one network's accuracy on them has a standard error of about "
            f"±{se:.2f} points at {_pct(acc)})"
        )
    lines += [
        f"Rank correlation between the search's score and the final validation accuracy "
        f"after the full fine-tune recipe, over {len(rows)} trials: **Kendall τ = "
        f"{num(audit['kendall_tau'])}**, Spearman ρ = {num(audit['spearman_rho'])} (1: the "
        "search ranks as the final training would; 0: no better than chance).",
        same + ", so τ says how consistently that split ranks the candidates, not how they will "
        "rank on new images. The same τ on the test split (reported only, it chooses nothing): "
        f"**{num(audit.get('kendall_tau_test'))}**.",
        "",
        "| trial | search val acc | final val acc | final test acc | FLOPs ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r['trial_id']} (uniform control)" if r["is_control"] else r["trial_id"]
        lines.append(
            f"| {name} | {_pct(r['search_val_acc'])} | {_pct(r['final_val_acc'])} | "
            f"{_pct(r.get('final_test_acc'))} | {r['flops_ratio']:.3f} |"
        )
    return [*lines, ""]


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
            *_noise_line(report.get("noise")),
            *_deploy_line(report.get("deploy")),
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
    sizes = (report.get("data") or {}).get("sizes", {})
    lines += _audit_lines(report.get("audit"), sizes.get("val"))
    if report.get("width_profile"):
        lines += [
            "## Where the channels went",
            "",
            "Kept channels per channel group (network order) for the teacher, the uniform "
            "network and the winner at the same budget.",
            "",
            "![widths](widths.png)",
            "",
        ]
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


__all__ = ["PARTS", "build_report", "build_report_json", "render_markdown", "search_summary"]
