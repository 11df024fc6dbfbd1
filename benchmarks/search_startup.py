"""Start-up cost of a search: how long each trial waits before its first training batch, and
the share of the search's wall time that is not training, for 10 and 50 trials.

Each search is the real ``run_search`` (Tune, data and teacher in the object store, reused
actors, a checkpoint per epoch) on the config's teacher, with the FIFO scheduler so that every
trial runs all of its epochs. Per trial, from its own result rows and the trial table:

- lag: Tune starting the trial -> the trial function's first line (actor start or reuse,
  arguments fetched from the object store);
- setup: first line -> first training batch (``setup_seconds``: student inherited from the
  teacher, BN recalibration, data views);
- epochs: the sum of ``epoch_seconds`` (training and validation);
- rest: Tune's ``time_total_s`` (first line -> last report) minus setup and epochs: the
  reports and checkpoints between epochs.

Per search: wall time, the shared-logit precomputation, and the not-training share =
1 - (sum of epoch seconds) / (wall x concurrent trials). The "bare" column of
``trial_overhead.py`` is the per-trial counterpart (one trial, bare loop vs Tune).

    python benchmarks/search_startup.py [CONFIG] [--trials 10 50] [--smoke-test] [--set k=v]

The default config is ``experiments/quick.yaml`` (as ``make demo``, whose search it sizes),
its teacher cut to one epoch: start-up does not depend on the teacher's accuracy.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from common import SMOKE, config_parser, prepare, search, start_ray


def trial_rows(exp: Path) -> dict[str, list[dict]]:
    """Trial id -> the result rows it reported (Tune's result.json in its folder)."""
    out = {}
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def breakdown(table: pd.DataFrame, rows: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per trial: lag, setup, epochs and rest seconds (see the module docstring).

    Tune repeats a trial's last report in a final row, so epochs are counted once each; its
    ``time_total_s`` runs from the function's start to the last report, so rest covers the
    reports and checkpoints between epochs."""
    out = []
    for t in table.itertuples():
        r = {x["epoch"]: x for x in rows[t.trial_id] if "epoch_seconds" in x}  # one per epoch
        first, last = r[min(r)], r[max(r)]
        epochs = float(sum(x["epoch_seconds"] for x in r.values()))
        setup = float(first["setup_seconds"])
        out.append(
            {
                "lag": float(first["started_at"]) - float(t.start_time),
                "setup": setup,
                "epochs": epochs,
                "rest": float(last["time_total_s"]) - setup - epochs,
            }
        )
    return pd.DataFrame(out)


def main() -> None:
    parser = config_parser(__doc__, smoke_help="tiny sizes, 4 and 8 trials")
    parser.add_argument("--trials", type=int, nargs="+", default=[10, 50])
    args = parser.parse_args()
    overrides = [
        "teacher.epochs=1",
        "search.scheduler=fifo",
        "search.algorithm=random",
        *args.overrides,
        *(SMOKE if args.smoke_test else []),
    ]
    if args.smoke_test:
        args.trials = [4, 8]
    cfg, data, teacher, out = prepare(args.config, overrides, "casd-startup-")
    t0 = time.time()
    start_ray(cfg)
    print(f"ray.init: {time.time() - t0:.1f}s (once per search)")
    slots = cfg.search.max_concurrent
    summary = {}
    try:
        for n in args.trials:
            s = cfg.search.model_copy(update={"num_samples": n})
            logged: list[str] = []
            t0 = time.time()
            table = pd.read_parquet(search(cfg, data, teacher, s, out / f"n{n}", log=logged.append))
            wall = time.time() - t0
            parts = breakdown(table, trial_rows(out / f"n{n}" / "search"))
            found = [re.search(r"computed once \(.*?, ([\d.]+)s on", m) for m in logged]
            logits_s = sum(float(m.group(1)) for m in found if m)
            summary[n] = {
                "wall s": wall,
                "logits s": logits_s,
                "epochs s": parts["epochs"].sum(),
                "not training": 1 - parts["epochs"].sum() / (wall * slots),
                "lag s median": parts["lag"].median(),
                "lag s max": parts["lag"].max(),
                "setup s median": parts["setup"].median(),
                "setup s max": parts["setup"].max(),
                "rest s median": parts["rest"].median(),
                "trial / epochs": float(
                    np.median((parts.sum(axis=1)) / parts["epochs"])
                ),  # per trial: its wall time over its epochs
            }
            # each size as soon as it is done: a long run cut short still reports
            print(
                f"# {n} trials: {wall:.1f}s\n{pd.Series(summary[n]).round(3).to_string()}",
                flush=True,
            )
    finally:
        ray.shutdown()
    print(
        f"\n{cfg.search.max_epochs} epochs per trial, {slots} concurrent trials x "
        f"{cfg.search.cpus_per_trial:g} CPU, proxy {len(data.y_train)} train images"
        + (f", {cfg.search.train_subset} of them per epoch" if cfg.search.train_subset else "")
    )
    print(pd.DataFrame(summary).round(3).to_string())


if __name__ == "__main__":
    main()
