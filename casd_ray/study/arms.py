"""One arm of ``casd-ray compare``: a network fine-tuned with the run's recipe, in its folder.

Only the widths differ between arms, so an arm folder is reused when its settings (the
fine-tune fingerprint and the widths) are the same. Under a latency budget an arm's widths
come from measurements, which move from run to run: :func:`decided_arm` keeps an arm whose
widths were decided before, so a second ``compare`` (to add a seed, say) neither measures it
again nor fine-tunes it again onto other widths, overwriting the first.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from casd_ray.artifacts.network import is_complete
from casd_ray.config import ExperimentConfig
from casd_ray.files import read_json_or_none
from casd_ray.models.family import Spec, spec_from_json
from casd_ray.pipeline.run import fingerprints, load_teacher
from casd_ray.pipeline.stages.student import StudentRecipe, part_settings, train_export
from casd_ray.stream.load import load_data
from casd_ray.train import devices
from casd_ray.widths import space

Log = Callable[[str], None]


def fine_tuned_arm(
    cfg: ExperimentConfig, spec: Spec, name: str, log: Log, start: dict | None = None
) -> dict:
    """Fine-tune ``spec`` with the run's recipe into ``run_dir/arms/name`` (reused if done);
    ``start``: another tool's pruned weights instead of inheriting from the teacher."""
    folder = cfg.run_dir / "arms" / name
    settings = part_settings(fingerprints(cfg)["finetune"], spec)
    if start is not None:
        settings["start"] = name
    saved = read_json_or_none(folder / "metrics.json")
    if is_complete(folder) and isinstance(saved, dict) and saved.get("settings") == settings:
        log(f"compare: reusing {folder}")
        return saved
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    return train_export(
        load_data(cfg.data, cfg.seed),
        load_teacher(cfg, cfg.run_dir / "teacher"),
        spec,
        folder,
        recipe=StudentRecipe(cfg.finetune, cfg.distill, rules.importance, cfg.seed, cfg.search.amp),
        settings=settings,
        device=devices.pick_device(1),
        log=log,
        label=name,
        start=start,
    )


def kept_arm(cfg: ExperimentConfig, name: str, log: Log) -> dict | None:
    """The arm ``name`` as fine-tuned before with this recipe, whatever its widths (they were
    decided by measurement then), or ``None``."""
    folder = cfg.run_dir / "arms" / name
    saved = read_json_or_none(folder / "metrics.json")
    if not (is_complete(folder) and isinstance(saved, dict)):
        return None
    if saved.get("settings", {}).get("widths") is None:
        return None
    if saved["settings"] != part_settings(fingerprints(cfg)["finetune"], arm_widths(saved)):
        return None  # another recipe: decided again
    log(f"compare: reusing {folder} (its widths were decided by measurement)")
    return saved


def decided_arm(cfg: ExperimentConfig, name: str, choose: Callable[[], Spec], log: Log) -> dict:
    """:func:`kept_arm`, else ``choose()``'s widths fine-tuned."""
    return kept_arm(cfg, name, log) or fine_tuned_arm(cfg, choose(), name, log)


def arm_widths(metrics: dict) -> Spec:
    """The widths an arm was fine-tuned with (from its ``metrics.json``)."""
    return spec_from_json(json.dumps(metrics["settings"]["widths"]))
