"""``report.md``: the report's JSON rendered as tables a user reads top to bottom."""

from __future__ import annotations

from casd_ray.report.plots import NAMES
from casd_ray.report.stats import binomial_se


def _noise_line(noise: dict | None) -> list[str]:
    if not noise or set(noise) != {"val", "test"}:
        return []
    v, t = noise["val"], noise["test"]
    head = (
        f"Winner − uniform: **{100 * v['winner_minus_uniform']:+.2f}** points on validation, "
        f"**{100 * t['winner_minus_uniform']:+.2f}** on test. "
    )
    tail = (
        "A difference within about two of these is no evidence that either network is better "
        "on these images; it says nothing of another seed's training, which `casd-ray compare` "
        "measures."
    )
    if v.get("paired") and t.get("paired"):
        return [
            head + f"Paired over the same {v['images']:,} validation and {t['images']:,} test "
            f"images, the standard error of that difference is ±{100 * v['se_difference']:.2f} "
            f"and ±{100 * t['se_difference']:.2f} points; only the winner was right on "
            f"{t['only_first_right']:,} test images, only uniform on {t['only_second_right']:,} "
            f"(McNemar p = {t['mcnemar_p']:.2g}; validation p = {v['mcnemar_p']:.2g}). " + tail
        ]
    return [
        head + f"With {v['images']:,} validation and {t['images']:,} test images the standard "
        f"error of such a difference is at most ±{100 * v['se_difference']:.2f} and "
        f"±{100 * t['se_difference']:.2f} points (binomial, unpaired: an upper bound). " + tail
    ]


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
    lines = [
        "",
        f"**Deploy `{part}/`** ({deploy['folder']}): {why} (validation accuracy: {scores}; "
        "the test split chooses nothing).",
    ]
    pre = deploy.get("preprocessing")
    if pre:  # raw pixels in would give wrong answers with no error
        lines += [
            "",
            f"Its inputs: `{pre['formula']}`, mean ({_nums(pre['mean'])}), std "
            f"({_nums(pre['std'])}), shape {'x'.join(map(str, pre['shape']))}; the outputs are "
            f"the classes in the order of `preprocessing.json` beside the model "
            "(`casd_ray.load_compressed(folder).preprocessing`).",
        ]
    return lines


def _nums(xs: list[float]) -> str:
    return ", ".join(f"{x:.4f}" for x in xs)


def _latency_lines(report: dict) -> list[str]:
    """The latency budget: teacher, uniform and winner measured on the budget's runtime."""
    lat = report.get("budget_latency")
    if not lat:
        return []
    err = lat.get("model_error") or {}
    lines = [
        "## Latency budget",
        "",
        f"Measured on {lat['runtime']}, input {tuple(lat['shape'])}, {lat['threads']} "
        f"thread(s), in interleaved rounds: median ms per batch, with the interquartile range; "
        f"each network judged round by round against the teacher of the same round. "
        f"Target: **{lat['target_ms']:.3f} ms** (met within "
        f"{100 * lat.get('tolerance', 0.0):g} %, the run-to-run movement of a median)"
        + _fitted_target(lat),
        "",
        "| model | test acc | ms (median) | IQR ms | within budget |",
        "|---|---:|---:|---:|---|",
    ]
    for name in NAMES:
        m = lat["measured"][name]
        ok = "–" if name == "teacher" else _verdict(m, lat)
        acc = report["models"][name]["test_acc"]
        lines.append(f"| {name} | {_pct(acc)} | {m['median_ms']:.3f} | {m['iqr_ms']:.3f} | {ok} |")
    if err.get("networks"):
        how = f": a table of {err['entries']} convolutions timed alone" if "entries" in err else ""
        line = (f"Latency model (repair's prediction{how}): MAPE {err['mape_pct']} %, worst "
                f"{err['worst_pct']} % on {err['networks']} measured random networks")  # fmt: skip
        if f := err.get("features"):
            line += f" (the features model there: MAPE {f['mape_pct']} %, worst {f['worst_pct']} %)"
        lines += ["", line + "."]
    if cal := err.get("searched_space"):
        b, h = cal["before"], cal.get("held_out")
        after = (
            f"on {h['networks']} fresh ones after, MAPE {h['mape_pct']} % (bias "
            f"{h['bias_pct']:+} %), {h['within_budget']} within the budget"
            if h
            else f"{cal['after']['mape_pct']} % after"
        )
        lines.append(
            f"Calibrated on {cal['networks']} networks of the searched space, measured beside "
            f"the teacher: ratios ×{cal['calibration']:.3f}; there MAPE {b['mape_pct']} % "
            f"(bias {b['bias_pct']:+} %) before; {after}.".replace("-", "−")
        )
    return [*lines, *_finalist_lines(lat), "", "![latency](latency.png)", ""]


def _finalist_lines(lat: dict) -> list[str]:
    """Why the winner is not the search's best trial: the better-validated ones measured
    over the budget beside the teacher (the model had predicted them within)."""
    checked = lat.get("finalists") or []
    over = [c for c in checked if not c["within_budget"]]
    if not over:
        return []
    won = [c for c in checked if c["within_budget"]]
    n = len(over)
    listed = "; ".join(
        f"{c['trial_id']} (val {100 * c['val_acc']:.2f} %): {c['fraction_of_target']:.3f} of "
        f"the target, predicted {c['predicted_fraction']:.3f}"
        for c in over
    )
    end = (
        f"the winner, {won[0]['trial_id']} (val {100 * won[0]['val_acc']:.2f} %), measured "
        f"{won[0]['fraction_of_target']:.3f}"
        if won
        else "none measured within: the best was cut onto the budget from its measurement"
    )
    return [
        "",
        f"Winner chosen as measured: {n} better-validated trial{'s' if n > 1 else ''} "
        f"measured over the budget and {'were' if n > 1 else 'was'} passed over ({listed}); "
        f"{end}: the latency model under-predicted the networks the search ranked best.",
    ]


def _verdict(m: dict, lat: dict) -> str:
    """Judged round by round, with the rounds as evidence; a report from before that was
    judged by the medians alone."""
    if "within_budget" not in m:
        limit = lat["target_ms"] * (1 + lat.get("tolerance", 0.0))
        return "yes" if m["median_ms"] <= limit else "**no**"
    word = "yes" if m["within_budget"] else "**no**"
    return f"{word} ({m['rounds_within']} of {m['rounds']} rounds within)"


def _fitted_target(lat: dict) -> str:
    """A budget set as a fraction of the teacher is judged against the teacher measured in
    the same rounds, so its milliseconds move with the machine: say so, with the fitted ones."""
    fitted = lat.get("fitted_target_ms")
    if fitted is None or abs(fitted - lat["target_ms"]) < 5e-4:
        return "."
    return (
        f": the budget's fraction of the teacher as measured in these rounds "
        f"({fitted:.3f} ms when the latency model was fitted)."
    )


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
            "The proxy-fidelity audit is off (`audit.top_k: 0`). Run it on this run folder "
            "with `casd-ray run CONFIG --set audit.top_k=5 --fresh audit` (the teacher, "
            "search and fine-tune are reused): it fine-tunes the 5 best completed trials (and "
            "the uniform control) with the final recipe, one fine-tune each, and reports how "
            "well the search's score predicts their final validation accuracy.",
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
            "| model | test acc | val acc | MFLOPs | params (k) | cost model: MFLOPs / params (k) "
            f"| FLOPs ratio | CPU ms (batch {b1}) | CPU ms/img (batch {bn}) | search rank |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name in NAMES:
            m = models[name]
            ms = m["latency"]
            lines.append(
                f"| {name} | {_pct(m['test_acc'])} | {_pct(m['val_acc'])} | "
                f"{m.get('flops_measured', m['flops']) / 1e6:.2f} | "
                f"{m.get('params_measured', m['params']) / 1e3:.1f} | "
                f"{m['flops'] / 1e6:.2f} / {m['params'] / 1e3:.1f} | {m['flops_ratio']:.3f} | "
                f"{ms['batch_ms'][b1]:.2f} | {ms['per_image_ms'][bn]:.3f} | "
                f"{_rank(m.get('search')) if name != 'teacher' else '–'} |"
            )
        lines += [
            "",
            f"FLOPs reduction of the winner: **{100 * report['flops_reduction']:.1f}%** "
            f"(params: {100 * report['params_reduction']:.1f}%). FLOPs are counted by "
            "`torch.utils.flop_counter.FlopCounterMode` on a real forward of the exported "
            "network (2 FLOPs per multiply-add, conv and linear layers only), parameters by "
            "`numel`; the cost model the search budgets with is beside them.",
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
        lines += _latency_lines(report)
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
