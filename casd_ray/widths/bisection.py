"""The largest feasible index of a monotone predicate, by bisection.

Budget repair and the global channel ranking both look for the biggest network that still
fits a budget along one axis (a scale, a number of channels removed); each feasibility test
costs a cost-model call (or a measured latency), so they bisect instead of scanning.
"""

from __future__ import annotations

from collections.abc import Callable


def last_true(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``i`` in ``[lo, hi]`` with ``pred(i)``, for a ``pred`` that is true up to
    some index and false after it, and true at ``lo`` (log2(hi - lo) calls)."""
    if pred(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo
