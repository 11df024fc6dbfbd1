"""Which whole channel blocks a latency budget can use: one rule for the search and its arms.

A CPU's convolutions are faster on whole channel blocks (the latency model's ``block``), so
a latency budget searches widths in whole blocks where that can reach the target. The
search's space (:func:`casd_ray.pipeline.latency.with_latency`) and the aligned uniform arm
(:func:`casd_ray.widths.baselines.aligned_uniform`) both take the first block this yields:
they used to walk the blocks with different rules, and on one seed the arm fine-tuned all
16-channel layers the search had rightly refused (73.87 % against uniform's 77.10 %).
"""

from __future__ import annotations

import math
from dataclasses import replace

from casd_ray.models.family import Spec
from casd_ray.widths import space
from casd_ray.widths.latency_model import BLOCKS


def no_block_to_take(rules: space.SpaceRules) -> bool:
    """The device has no channel block (the model found none), or ``space.divisible_by``
    already keeps every width in whole blocks of it: nothing for :func:`block_steps`."""
    return rules.latency.block <= 1 or rules.divisible_by % rules.latency.block == 0


def block_steps(rules: space.SpaceRules, teacher: Spec) -> list[tuple[int, str | None]]:
    """Every block dividing the latency model's, largest first, as the width step it gives
    (with ``space.divisible_by``) and why it cannot be used (``None``: it can): no network
    in whole blocks reaches the target, or its uniform network at the target is already the
    narrowest (one network left to search: on ResNet-20 at 0.5 of the teacher, blocks of 16
    left every layer at 16 channels, and 48 trials trained the same network)."""
    model = rules.latency
    out: list[tuple[int, str | None]] = []
    for block in sorted((b for b in BLOCKS if b > 1 and model.block % b == 0), reverse=True):
        step = math.lcm(rules.divisible_by, block)
        low = space.smallest_ratio(
            teacher, "latency", min_channels=rules.min_channels, divisible_by=step,
            ratio_fn=model.ratio,
        )  # fmt: skip
        if low > model.target_ratio:
            out.append((step, f"no network in whole blocks of {step} reaches the target (the "
                              f"narrowest predicted at {low:.3f} of the teacher)"))  # fmt: skip
            continue
        step_rules = replace(rules, divisible_by=step)
        uniform = space.candidate_spec(
            step_rules, teacher, space.control_genome(step_rules, teacher)
        )
        one = (
            f"whole blocks of {step} leave one network at the target (the narrowest, "
            f"predicted at {low:.3f} of the teacher)"
        )
        out.append((step, one if model.ratio(uniform) <= low * (1 + 1e-9) else None))
    return out
