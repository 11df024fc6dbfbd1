"""Same seed, same search? Asynchronous search vs generations, on an idle and a "busy" machine.

For each mode (``search.generation_size`` null = Tune's asynchronous default, and N) the same
search runs twice from the same teacher and seed: once as it is ("idle"), once with every
trial slowed down per epoch by a delay drawn from its genome ("busy": another process on the
machine changes which trial of a pair finishes first). Printed per mode: whether the two
searches agree (same genomes, same epochs per trial, same scores), the winner's genome, and
what the mode costs (trial-epochs, wall time of the idle run; ratio generations / async).

    python benchmarks/search_reproducibility.py [CONFIG] [--generation-size 4] [--smoke-test]
        [--set key=value ...]

The default config is ``experiments/quick.yaml`` (Fashion-MNIST, as ``make demo``); runs go
to a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import time

import pandas as pd
import ray
from common import SMOKE, config_parser, prepare, search, start_ray

from casd_ray.search.trial import distill_trial


def busy(delay_s: float):
    """:func:`distill_trial`, every epoch of every other genome ``delay_s`` slower."""

    def busy_trial(config, **kwargs):
        from ray import tune

        key = json.dumps({k: round(float(v), 6) for k, v in sorted(config.items())})
        delay = delay_s * (int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2)

        def report(metrics, checkpoint=None):
            time.sleep(delay)
            tune.report(metrics, checkpoint=checkpoint)

        return distill_trial(config, report=report, **kwargs)

    return busy_trial


def outcome(df: pd.DataFrame) -> list[tuple]:
    return sorted(zip(df["genome"], df["epochs"], df["best_val_acc"].round(6), strict=True))


def main() -> None:
    parser = config_parser(__doc__)
    parser.add_argument("--generation-size", type=int, default=4)
    parser.add_argument("--delay", type=float, default=3.0, help="seconds per epoch when busy")
    args = parser.parse_args()
    overrides = [*args.overrides, *(SMOKE if args.smoke_test else [])]
    cfg, data, teacher, out = prepare(args.config, overrides, "casd-repro-")
    start_ray(cfg)
    rows = {}
    try:
        for size in (None, args.generation_size):
            mode = "async" if size is None else f"generations of {size}"
            runs = {}
            for machine, delay in (("idle", 0.0), ("busy", args.delay)):
                s = cfg.search.model_copy(update={"generation_size": size})
                name = f"{'async' if size is None else f'gen{size}'}-{machine}"
                t0 = time.time()
                path = search(
                    cfg, data, teacher, s, out / name,
                    trainable=busy(delay) if delay else distill_trial,
                )  # fmt: skip
                runs[machine] = (pd.read_parquet(path), time.time() - t0)
            (idle, wall), (busy_df, _) = runs["idle"], runs["busy"]
            best = idle.loc[idle["completed"]].sort_values("best_val_acc").iloc[-1]
            rows[mode] = {
                "same search idle vs busy": outcome(idle) == outcome(busy_df),
                "trial-epochs (idle)": int(idle["epochs"].sum()),
                "completed trials (idle)": int(idle["completed"].sum()),
                "wall s (idle)": round(wall, 1),
                "winner val_acc (idle / busy)": (
                    f"{best['best_val_acc']:.4f} / "
                    f"{busy_df.loc[busy_df['completed'], 'best_val_acc'].max():.4f}"
                ),
            }
    finally:
        ray.shutdown()
    table = pd.DataFrame(rows)
    print(table.to_string())
    a, g = rows["async"], rows[f"generations of {args.generation_size}"]
    print(
        f"cost of generations: wall {g['wall s (idle)'] / a['wall s (idle)']:.2f}x, "
        f"trial-epochs {g['trial-epochs (idle)'] / a['trial-epochs (idle)']:.2f}x (idle runs)"
    )


if __name__ == "__main__":
    main()
