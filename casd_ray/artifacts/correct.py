"""Which evaluation images a finished network got right, as stored in its ``metrics.json``.

Two networks pruned from one teacher mostly err on the same images, so the standard error of
their accuracy difference is far below the unpaired binomial bound; computing the paired one
(and McNemar's test) needs each network's per-image outcome. One bit per image, base64: about
1.7 kB for 10,000 test images.
"""

from __future__ import annotations

import base64

import numpy as np

from casd_ray.errors import ArtifactError


def encode_correct(correct: np.ndarray) -> dict:
    """A bool vector as ``{"images": n, "bits": base64 of np.packbits}``."""
    correct = np.asarray(correct, dtype=bool)
    return {"images": int(len(correct)), "bits": base64.b64encode(np.packbits(correct)).decode()}


def decode_correct(stored: dict, where: str = "metrics.json") -> np.ndarray:
    """The bool vector :func:`encode_correct` stored; ArtifactError naming ``where``."""
    try:
        n = int(stored["images"])
        bits = np.frombuffer(base64.b64decode(stored["bits"], validate=True), dtype=np.uint8)
        if len(bits) != (n + 7) // 8:
            raise ValueError(f"{len(bits)} bytes for {n} images")
        return np.unpackbits(bits, count=n).astype(bool)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: per-image results unreadable ({err})") from None
