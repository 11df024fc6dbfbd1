"""Which network to deploy: the one that validates highest after the identical fine-tune.

The winner, the uniform baseline and any audited trial all get the final recipe; their
validation accuracy after it judges them more closely than the search's short proxy did.
The test split never decides.
"""

from __future__ import annotations

from pathlib import Path

from casd_ray.artifacts.network import verify_export
from casd_ray.artifacts.run_folder import PARTS
from casd_ray.errors import ArtifactError


def validated_pick(candidates: dict[str, dict]) -> str:
    """The network to deploy among those fine-tuned with the final recipe (winner, uniform,
    audited trials): the highest validation accuracy after that fine-tune.

    They all get the identical fine-tune, so its validation accuracy judges them more closely
    than the search's short proxy did. When winner and uniform are within noise the search can
    pick a network that ends up behind uniform slimming; shipping it anyway would turn the
    search's noise into a loss. Ties go to fewer FLOPs, then to uniform (no evidence for the
    search's choice). The test split never decides.
    """
    return max(
        candidates,
        key=lambda n: (candidates[n]["val_acc"], -candidates[n]["flops_ratio"], n == "uniform"),
    )


def deploy_choice(run_dir: Path, models: dict, audit: dict | None) -> dict:
    """Which exported network to deploy: :func:`validated_pick` over winner, uniform and the
    audited trials (each fine-tuned with the final recipe; ``audit/<trial>/``)."""
    candidates = {p: models[p] for p in PARTS}
    parts = {str((models[p].get("search") or {}).get("trial_id")) for p in PARTS}
    for row in (audit or {}).get("trials", []):
        if str(row["trial_id"]) not in parts:
            candidates[f"audit/{row['trial_id']}"] = {
                "val_acc": row["final_val_acc"],
                "flops_ratio": row["flops_ratio"],
            }
    pick = validated_pick(candidates)
    try:  # never tell a user to deploy a folder that load_compressed rejects
        verify_export(run_dir / pick)
    except ArtifactError as err:
        raise ArtifactError(f"{err}; rerun the command that made {run_dir}") from None
    return {
        "part": pick,
        "folder": str(run_dir / pick),
        "rule": "highest validation accuracy after the identical fine-tune",
        "val_acc": {name: c["val_acc"] for name, c in candidates.items()},
    }
