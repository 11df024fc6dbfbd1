"""The report's noise figures: standard errors of accuracies measured on a finite split."""

from __future__ import annotations

import math


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
