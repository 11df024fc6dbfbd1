"""ASHA vs FIFO on the same genomes: epochs spent and the best val_acc found, one run each.

Both searches use the random searcher with the same seed, so they propose the same genomes
in the same order (a random sampler does not look at results); FIFO trains every genome for
``max_epochs``, ASHA stops the weak ones at its rungs. Printed: trial-epochs spent, wall time,
the best completed val_acc of each, and the gap. The issue's target: ASHA within 0.5 point of
FIFO's best with at most 50% of its epochs. Also printed, from FIFO's full curves: how well
each epoch's val_acc ranks the trials as their best over all epochs does (Kendall τ); a rung
at an epoch whose τ is near 0 stops trials by chance.

    python benchmarks/search_efficiency.py [CONFIG] [--smoke-test] [--set key=value ...]

The default config is ``experiments/quick.yaml`` (as ``make demo``) with 32 trials of 4 epochs
and ASHA's reduction factor 3 (rungs at epochs 1 and 3). ASHA's saving grows with the number
of trials: with 12, its first trials reach each rung with nothing to compare against and are
promoted, and it spent 52-62% of FIFO's epochs (README, Benchmarks).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import ray
from common import SMOKE, config_parser, prepare, search, start_ray
from scipy import stats


def rung_fidelity(search_dir: Path, score: str = "val_acc") -> dict[int, float]:
    """Epoch -> Kendall τ between every trial's ``score`` at that epoch (val_acc, or
    val_loss negated) and its best val_acc (from each trial's ``result.json``: a FIFO
    search, where every trial ran every epoch)."""
    rows = [
        pd.read_json(f, lines=True).set_index("epoch")
        for f in sorted(search_dir.glob("*/result.json"))
    ]
    sign = -1.0 if score.endswith("loss") else 1.0
    best = [r["val_acc"].max() for r in rows]
    last = min(int(r.index.max()) for r in rows)
    return {
        e: float(stats.kendalltau([sign * r.loc[e, score] for r in rows], best)[0])
        for e in range(1, last)
    }


def main() -> None:
    parser = config_parser(__doc__)
    args = parser.parse_args()
    overrides = [
        "search.algorithm=random",
        "search.num_samples=32",
        "search.max_epochs=4",
        "search.reduction_factor=3",
        *args.overrides,
        *(SMOKE if args.smoke_test else []),
    ]
    cfg, data, teacher, out = prepare(args.config, overrides, "casd-efficiency-")
    start_ray(cfg)
    rows = {}
    try:
        for scheduler in ("fifo", "asha"):
            s = cfg.search.model_copy(update={"scheduler": scheduler})
            t0 = time.time()
            df = pd.read_parquet(search(cfg, data, teacher, s, out / scheduler))
            done = df[df["completed"]]
            rows[scheduler] = {
                "trials": len(df),
                "trial-epochs": int(df["epochs"].sum()),
                "completed trials": len(done),
                "failed trials": int((df["status"] == "ERROR").sum()),
                "best completed val_acc": float(done["best_val_acc"].max()),
                "wall s": round(time.time() - t0, 1),
                "genomes": set(df["genome"]),
            }
    finally:
        ray.shutdown()
    fifo, asha = rows["fifo"], rows["asha"]
    same = fifo.pop("genomes") == asha.pop("genomes")
    print(pd.DataFrame(rows).to_string())
    gap = 100 * (fifo["best completed val_acc"] - asha["best completed val_acc"])
    share = asha["trial-epochs"] / fifo["trial-epochs"]
    print(
        f"same genomes: {same}; ASHA spent {share:.0%} of FIFO's epochs "
        f"({asha['wall s'] / fifo['wall s']:.2f}x its wall time) and found a best val_acc "
        f"{gap:+.2f} points below FIFO's (target: <= 50% of the epochs, within 0.5 point)"
    )
    for score in ("val_acc", "val_loss"):
        taus = rung_fidelity(out / "fifo" / "search", score)
        print(
            f"FIFO: Kendall tau of each epoch's {score} with the best val_acc over all epochs: "
            + ", ".join(f"epoch {e} {t:+.2f}" for e, t in taus.items())
        )


if __name__ == "__main__":
    main()
