"""The run folder's summaries: what the fine-tune stage writes for the report to read.

One export folder per part (``winner/``, ``uniform/``; :mod:`casd_ray.artifacts.network`) and
``finetune.json``: accuracy, cost and latency of the teacher and both parts. A torn or
foreign summary is one :class:`~casd_ray.errors.ArtifactError` line, never read as "not yet
run".
"""

from __future__ import annotations

from pathlib import Path

from casd_ray.errors import ArtifactError
from casd_ray.files import read_json

PARTS = ("winner", "uniform")
SUMMARY = "finetune.json"
# CPU seconds the search spent on its driver (the controls' allocations, the shared teacher
# logits): part of the search's cost beside its trials'
SEARCH_DRIVER = "search_driver.json"


def read_summary(path: Path) -> dict:
    """``finetune.json``, checked for the fields the report uses: a torn or foreign file is
    an ArtifactError (never read as "not yet run")."""
    hint = "rerun the same command to rebuild it"
    summary = read_json(path, hint=hint)
    try:
        models = summary["models"]
        for name in ("teacher", *PARTS):
            for key in ("test_acc", "val_acc", "flops", "params", "flops_ratio", "latency"):
                models[name][key]  # noqa: B018 - presence check
        models["teacher"]["latency"]["batch_ms"].keys()
        float(summary["flops_reduction"]), float(summary["params_reduction"])
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ArtifactError(f"{path}: not a complete fine-tune summary ({err!r}); {hint}") from None
    return summary
