"""Replay finished searches' rung-0 scores through the rung-0 scheduler under other settings.

Which candidates rung 0 promotes depends only on the order and values of the rung-0 scores;
a finished search's ``trials.parquet`` holds both (``rung0_score``, ``start_time``). Fed in that
order to :class:`casd_ray.search.rungs.SearchASHA` (the scheduler the search runs, not a copy
of its rule), they show what another ``search.screen.observe`` would have promoted, as each
promoted candidate's rank among the search's rung-0 scores (1 = best; controls left out).
This is the rung-0 score, not the final accuracy: it says whether the places went to the
candidates rung 0 itself ranks best, which is what the promotion rule is for.

    python benchmarks/rung0_replay.py runs/c10cmp03-s0 runs/c10cmp03-s1 --observe 0 0.37 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from casd_ray.search.rungs import SearchASHA


def replay(table: pd.DataFrame, promote: int, observe: float) -> list[int]:
    """Rung-0 ranks (1 = best) of the non-control candidates ``observe`` promotes."""
    df = table.sort_values("start_time").reset_index(drop=True)
    controls = df["control"].notna()
    genomes = [{"i": float(i)} for i in df.index]  # a config per trial; controls match theirs
    sched = SearchASHA(
        [genomes[i] for i in df.index[controls]],
        promote=promote,
        num_samples=len(df),
        observe=observe,
        metric="objective",
        mode="max",
        time_attr="epoch",
        max_t=3,
        grace_period=3,
    )
    trials = [SimpleNamespace(trial_id=f"t{i:04d}", config=genomes[i]) for i in df.index]
    for t in trials:
        sched.on_trial_add(None, t)
    rank = df["rung0_score"].rank(ascending=False, method="min").astype(int)
    kept = []
    for i, t in enumerate(trials):
        decision = sched.on_trial_result(None, t, {"epoch": 0, "objective": df["rung0_score"][i]})
        if decision == sched.CONTINUE and not controls[i]:
            kept.append(int(rank[i]))
    return sorted(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with trials.parquet")
    parser.add_argument("--observe", type=float, nargs="+", default=[0.0, 0.37, 0.5])
    args = parser.parse_args()
    tables = {}
    for run in args.runs:
        table = pd.read_parquet(run / "trials.parquet")
        promote = int((table["epochs"] > 0).sum())  # what the search really distilled
        tables[run.name] = (table, promote)
    for observe in args.observe:
        ranks = {name: replay(t, k, observe) for name, (t, k) in tables.items()}
        flat = [r for rs in ranks.values() for r in rs]
        shown = "  ".join(f"{name}: {rs}" for name, rs in ranks.items())
        print(f"observe {observe:.2f}  mean rank {sum(flat) / len(flat):5.1f}  {shown}")


if __name__ == "__main__":
    main()
