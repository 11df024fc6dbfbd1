"""The report's noise figures: standard errors of accuracies measured on a finite split."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from casd_ray.artifacts.correct import decode_correct


def binomial_se(n: int, *accs: float) -> float:
    """Standard error of one accuracy measured on ``n`` images, or of the difference of
    several measured independently: sqrt(sum p(1-p) / n)."""
    return math.sqrt(sum(p * (1 - p) for p in accs) / n)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Accuracy of ``a`` minus ``b`` on the same images, with the paired standard error
    (sd of the per-image differences / sqrt(n)) and McNemar's exact test on the images only
    one of them got right."""
    d = a.astype(np.int8) - b.astype(np.int8)
    only_a, only_b = int((d > 0).sum()), int((d < 0).sum())
    test = stats.binomtest(only_a, only_a + only_b, 0.5) if only_a + only_b else None
    return {
        "difference": float(d.mean()),
        "se_paired": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
        "only_first_right": only_a,
        "only_second_right": only_b,
        "mcnemar_p": float(test.pvalue) if test is not None else 1.0,
    }


def split_noise(models: dict, data: dict | None) -> dict:
    """Winner − uniform on each split beside the standard error of that difference.

    Paired where both networks' per-image results are stored (two networks pruned from one
    teacher mostly err on the same images, so this is much smaller than the unpaired bound),
    with McNemar's test; otherwise binomial and unpaired, sqrt((p(1-p) + q(1-q)) / n), an
    upper bound (run folders from before per-image results were kept).
    """
    sizes = (data or {}).get("sizes", {})
    out = {}
    for split in ("val", "test"):
        w, u = models["winner"], models["uniform"]
        p, q, n = w.get(f"{split}_acc"), u.get(f"{split}_acc"), sizes.get(split)
        if p is None or q is None or not n:
            continue
        entry = {"images": n, "winner_minus_uniform": p - q, "se_difference": binomial_se(n, p, q)}
        stored = [m.get("correct", {}).get(split) for m in (w, u)]
        if all(stored):
            a, b = (decode_correct(s, f"finetune.json ({split})") for s in stored)
            if len(a) == len(b) == n:
                pair = paired_difference(a, b)
                entry.update(se_difference=pair["se_paired"], paired=True,
                             **{k: pair[k] for k in ("only_first_right", "only_second_right",
                                                     "mcnemar_p")})  # fmt: skip
        out[split] = entry
    return out
