"""A latency-budget run's own networks: the latency model's predicted ratio beside the ratio
measured now, beside the teacher in interleaved rounds.

The model's error printed at fitting (MAPE, worst) is on *random* networks. The networks a
search keeps are not random: they are the ones the model let keep the most, so its error on
them can be larger, and an error that moves every ratio alike (one slow measurement of the
teacher) shows as a common factor here. Measures the distilled trials' networks (or the
``--trials`` given) and the fine-tuned ``uniform`` and ``winner`` with the run's own
``latency.json`` deployment, each judged round by round against the budget as the report
judges (:func:`judge_budget`, measured ratio = median of the rounds' ratios); run it on the
machine the run measured on, with nothing else running.

    python benchmarks/latency_run_check.py runs/<name> [--trials ID ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from casd_ray.artifacts.run_folder import PARTS
from casd_ray.artifacts.trials import TRIALS_FILE, read_trials
from casd_ray.models.family import build_model, spec_from_json
from casd_ray.pipeline.latency import LATENCY_FILE, judge_budget
from casd_ray.widths.latency_model import LatencyModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder of a latency budget")
    ap.add_argument("--trials", nargs="*", help="trial ids (default: every distilled trial)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = LatencyModel.from_dict(json.loads((args.run / LATENCY_FILE).read_text())["model"])
    teacher = spec_from_json((args.run / "teacher" / "widths.json").read_text())
    trials = read_trials(args.run / TRIALS_FILE)
    ids = args.trials or list(trials.loc[trials["epochs"].fillna(0) > 0, "trial_id"])
    specs = {
        f"trial {t}": spec_from_json(trials.loc[trials["trial_id"] == t, "widths"].iloc[0])
        for t in ids
    }
    for part in PARTS:
        if (args.run / part / "widths.json").is_file():
            specs[f"final {part}"] = spec_from_json((args.run / part / "widths.json").read_text())
    nets = {"teacher": build_model(teacher)} | {k: build_model(v) for k, v in specs.items()}
    ms = judge_budget(nets, model, rounds=args.rounds)
    t_ms = ms["teacher"]["median_ms"]
    at_fit = model.error.get("teacher_measured_ms")
    ref = (
        "the teacher measured at fitting: a model from before e50be7a"
        if at_fit is None
        else f"the model's prediction of the teacher; measured at fitting {at_fit:.2f} ms"
    )
    print(f"teacher measured {t_ms:.2f} ms now; the ratios' reference {model.teacher_ms:.2f} ms "
          f"({ref})")  # fmt: skip
    print("| network | predicted ratio | measured ratio | measured / predicted | within budget |")
    print("|---|---:|---:|---:|---|")
    for name, spec in specs.items():
        m = ms[name]
        pred, got = model.ratio(spec), m["teacher_ratio"]
        verdict = f"{'yes' if m['within_budget'] else 'no'} ({m['rounds_within']}/{m['rounds']})"
        print(f"| {name} | {pred:.3f} | {got:.3f} | {got / pred:.2f} | {verdict} |")


if __name__ == "__main__":
    main()
