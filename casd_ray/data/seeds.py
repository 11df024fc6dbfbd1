"""Seeds of every random stream of the data: the split, subsets, batch order, augmentation.

Each stream gets its own constant word after the run's seed, so they never share random
numbers, and every one is reproducible on any machine from the seed alone.
"""

from __future__ import annotations

import numpy as np


def seed_words(seed: int, *more: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *more])
