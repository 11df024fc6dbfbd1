"""Measured repair of a trained network: how many FLOPs each way of taking it under its
prediction keeps, on a latency-budget run's own distilled trials (model only, no timing).

(a) the genome rescaled onto the lower ratio (:func:`space.repair`, how the uniform network
is repaired), (b) the trained network cut by single channel blocks and grown back
(:func:`latency_repair.nearest_within`, how a winner is repaired). For each distilled trial,
taken 2 / 4 / 8 % under its predicted ratio: FLOPs kept over the teacher's by each, and each
one's prediction over the goal.

    python benchmarks/latency_cut.py runs/<name>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from casd_ray.artifacts.network import read_spec
from casd_ray.artifacts.trials import TRIALS_FILE, read_trials
from casd_ray.models.family import flops, spec_from_json
from casd_ray.pipeline.latency import LATENCY_FILE
from casd_ray.widths import space
from casd_ray.widths.latency_model import LatencyModel
from casd_ray.widths.latency_repair import nearest_within


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    saved = json.loads((args.run / LATENCY_FILE).read_text())
    model, step = LatencyModel.from_dict(saved["model"]), saved["divisible_by"]["searched"]
    teacher = read_spec(args.run / "teacher" / "widths.json")
    trials = read_trials(args.run / TRIALS_FILE)
    done = trials[trials["completed"]].sort_values("best_val_acc", ascending=False)
    full = flops(teacher)
    print("trial     under  FLOPs  rescaled (pred/goal)  single blocks (pred/goal)")
    gain = []
    for _, row in done.iterrows():
        spec, genome = spec_from_json(row["widths"]), json.loads(row["genome"])
        granularity = "layer" if len(genome) > 3 else "stage"
        for under in (1.02, 1.04, 1.08):
            goal = model.ratio(spec) / under
            kw = {"divisible_by": step, "ratio_fn": model.ratio}
            a = space.repair(teacher, granularity, genome, target=goal, metric="latency", **kw)[0]
            b = nearest_within(spec, teacher, goal, **kw)
            gain.append(flops(b) / full - flops(a) / full)
            print(f"{row['trial_id']}  {under:.2f}  {flops(spec) / full:.3f}  "
                  f"{flops(a) / full:.3f} ({model.ratio(a) / goal:.3f})         "
                  f"{flops(b) / full:.3f} ({model.ratio(b) / goal:.3f})")  # fmt: skip
    print(f"single blocks keep {sum(gain) / len(gain):+.3f} of the teacher's FLOPs on average "
          f"(min {min(gain):+.3f}, max {max(gain):+.3f}, {len(gain)} cases)")  # fmt: skip


if __name__ == "__main__":
    main()
