"""The per-layer latency table against the fitted features model, where the search looks.

Both predictors are fitted on the same random networks measured now on a run's deployment
(in the run's whole channel blocks, as its search drew them), then judged against
measurement on (1) further random networks, in milliseconds, and (2) the networks the runs'
searches kept (every distilled trial, and the fine-tuned ``uniform`` and ``winner``), as a
ratio to the teacher measured beside them in interleaved rounds, the way a budget is judged.
Neither is calibrated here; a run calibrates its predictor by the median of measured over
predicted ratios where the search looks, so the error left after that one scale (per run) is
printed too: it is what repair sees. The runs must
share a teacher and deployment (one latency table serves them all); run it on the machine the
runs measured on, with nothing else running.

    python benchmarks/latency_table_check.py runs/<name> [runs/<name> ...] [--fit 26] [--check 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from casd_ray.artifacts.run_folder import PARTS
from casd_ray.artifacts.trials import TRIALS_FILE, read_trials
from casd_ray.models.family import build_model, spec_from_json
from casd_ray.pipeline.latency import LATENCY_FILE, judge_budget
from casd_ray.widths.latency_model import (
    LatencyModel,
    choose_block,
    fit,
    measure_spec,
    random_specs,
    relative_error,
)
from casd_ray.widths.latency_table import fit_table, measure_table


def searched_networks(run: Path) -> dict:
    trials = read_trials(run / TRIALS_FILE)
    ids = list(trials.loc[trials["epochs"].fillna(0) > 0, "trial_id"])
    out = {
        f"{run.name} trial {t}": spec_from_json(
            trials.loc[trials["trial_id"] == t, "widths"].iloc[0]
        )
        for t in ids
    }
    for part in PARTS:
        if (run / part / "widths.json").is_file():
            out[f"{run.name} {part}"] = spec_from_json((run / part / "widths.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders of one latency budget")
    ap.add_argument("--fit", type=int, default=26, help="random networks both are fitted on")
    ap.add_argument("--check", type=int, default=50, help="random networks both are judged on")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--save", type=Path,
        help="write every measurement here (JSON): other predictors on the same measurements",
    )  # fmt: skip
    args = ap.parse_args()
    saved = json.loads((args.runs[0] / LATENCY_FILE).read_text())
    run_model = LatencyModel.from_dict(saved["model"])
    dep = run_model.deployment()
    teacher = spec_from_json((args.runs[0] / "teacher" / "widths.json").read_text())
    step = saved["divisible_by"]["searched"]
    low = yaml.safe_load((args.runs[0] / "config.yaml").read_text())["space"]["min_channels"]
    kw = {"min_channels": max(low, step), "divisible_by": step}

    t0 = time.perf_counter()
    table = measure_table(teacher, dep, step=step, min_channels=max(low, step))
    print(f"table: {len(table.entries)} convolutions timed in {time.perf_counter() - t0:.0f} s")
    fit_specs = [teacher, *random_specs(teacher, args.fit - 1, 1000, **kw)]
    fit_ms = [measure_spec(s, dep).median_ms for s in fit_specs]
    block = choose_block(fit_specs, fit_ms)
    coef = fit(fit_specs, fit_ms, block)
    ref = LatencyModel(coef, 1.0, 1.0, dep.runtime, dep.shape, dep.threads, block=block)
    features = LatencyModel(**{**ref.__dict__, "teacher_ms": ref.predict_ms(teacher)})
    table = fit_table(table, fit_specs, fit_ms)
    models = {"features": features.predict_ms, "table": table.predict_ms}
    print(f"features: block {block}, coef {np.round(coef, 3).tolist()}; "
          f"table: coef {np.round(table.coef, 3).tolist()}")  # fmt: skip

    check = random_specs(teacher, args.check, 2000, **kw)
    check_ms = np.array([measure_spec(s, dep).median_ms for s in check])
    print(
        "\n| predictor | random networks: MAPE % | bias % | worst % | searched networks: MAPE "
        "of the ratio % | bias % | worst % | after each run's median scale: MAPE % | worst % "
        "| Kendall τ | within/over as measured, right |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    nets = {}
    for run in args.runs:
        nets |= searched_networks(run)
    got = judge_budget(
        {"teacher": build_model(teacher)} | {k: build_model(v) for k, v in nets.items()},
        run_model,
        args.rounds,
    )
    measured = np.array([got[k]["teacher_ratio"] for k in nets])
    if args.save:
        js = {"teacher": teacher.model_dump_json(), "table": table.as_dict()}
        js["fit"] = [[s.model_dump_json(), ms] for s, ms in zip(fit_specs, fit_ms, strict=True)]
        pairs = zip(check, check_ms, strict=True)
        js["check"] = [[s.model_dump_json(), float(m)] for s, m in pairs]
        js["searched"] = [[k, s.model_dump_json(), float(m)]
                          for (k, s), m in zip(nets.items(), measured, strict=True)]  # fmt: skip
        args.save.write_text(json.dumps(js))
    rows = {}
    for name, predict in models.items():
        rnd = relative_error(np.array([predict(s) for s in check]), check_ms)
        ratio = np.array([predict(s) / predict(teacher) for s in nets.values()])
        srch = relative_error(ratio, measured)
        tau = stats.kendalltau(ratio, measured).statistic
        target = run_model.target_ratio
        right = int(np.sum((ratio <= target * 1.03) == (measured <= target * 1.03)))
        rows[name] = ratio
        scaled = ratio.copy()
        for run in args.runs:  # calibration: one scale per run, the median measured/predicted
            mine = np.array([k.startswith(f"{run.name} ") for k in nets])
            scaled[mine] *= np.median(measured[mine] / ratio[mine])
        cal = relative_error(scaled, measured)
        print(f"| {name} | {rnd['mape_pct']} | {rnd['bias_pct']} | {rnd['worst_pct']} | "
              f"{srch['mape_pct']} | {srch['bias_pct']} | {srch['worst_pct']} | "
              f"{cal['mape_pct']} | {cal['worst_pct']} | {tau:.2f} | "
              f"{right} of {len(nets)} |")  # fmt: skip
    print("\n| network | measured ratio | features | table |\n|---|---:|---:|---:|")
    for i, k in enumerate(nets):
        print(f"| {k} | {measured[i]:.3f} | {rows['features'][i]:.3f} | {rows['table'][i]:.3f} |")


if __name__ == "__main__":
    main()
