"""Which stages a command runs: fingerprints, the stage record, and the reuse plan.

Each stage has a *fingerprint*: the settings that determine its result (plus the
fingerprint of the stage before it). ``stages.json`` in the run folder records, per stage,
the fingerprint it was started with and whether it finished (see :mod:`casd_ray.pipeline.run`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casd_ray.config import ExperimentConfig, ScreenConfig
from casd_ray.errors import ArtifactError, ConfigError, StageMismatch
from casd_ray.files import read_json, write_json
from casd_ray.models.names import source_digest
from casd_ray.stream.shards import content_digest

STAGES = ("teacher", "search", "finetune", "audit", "report")
TRAINED = STAGES[:-1]  # stages with a fingerprint (the report is always rebuilt)
RECORD = "stages.json"
OUTPUTS = {
    "teacher": ("teacher",),
    "search": ("search", "trials.parquet", "search_driver.json"),
    "finetune": ("winner", "uniform", "finetune.json"),
    "audit": ("audit", "audit.json"),
    "report": ("report.md", "report.json", "pareto.png", "progress.png", "widths.png"),
}
# Keys that change how a stage runs, not what it produces.
VOLATILE = {"search": ("max_concurrent", "max_failures", "cpus_per_trial", "storage_path")}

# Settings added after run folders existed: left out of the fingerprint while off, so a
# folder searched before them is reused, not refused as changed.
ADDED_OFF = {
    "search": {
        "precise_bn_batches": 0,
        "controls": ["uniform"],
        "screen": json.loads(ScreenConfig().model_dump_json()),
    }
}
# The same, one level down: sub-settings added to a section that already existed.
ADDED_OFF_WITHIN = {"search": {"screen": {"observe": 0.0}}}

Log = Callable[[str], None]


# --------------------------------------------------------------------------- fingerprints


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprints(cfg: ExperimentConfig) -> dict[str, dict]:
    """Stage -> the settings that determine its result (JSON-able, compared as is)."""
    dump = cfg.model_dump(mode="json")
    teacher = {k: dump[k] for k in ("seed", "data", "model", "teacher")}
    digest = source_digest(cfg.model.arch)
    if digest is not None:  # editing a python: factory's file changes the architecture
        teacher["model"]["source_sha256"] = digest
    if cfg.data.dataset == "shards":  # re-packed shards are other data, at the same root
        teacher["data"]["shards_sha256"] = content_digest(cfg.data.root)
    search_section = {k: v for k, v in dump["search"].items() if k not in VOLATILE["search"]}
    for key, off in ADDED_OFF["search"].items():  # run folders from before the setting existed
        if search_section.get(key) == off:
            del search_section[key]
    for section, added in ADDED_OFF_WITHIN["search"].items():
        inner = search_section.get(section)
        for key, off in added.items():
            if isinstance(inner, dict) and inner.get(key) == off:
                del inner[key]
    latency = dump["space"]["budget"]["latency"]
    if cfg.space.budget.metric != "latency" or not latency["align_channels"]:
        del latency["align_channels"]  # added later; off or idle, folders before it match
    if cfg.space.budget.metric != "latency" or not latency["calibrate_networks"]:
        del latency["calibrate_networks"]  # so was this
    if cfg.space.budget.metric != "latency" or latency["predictor"] == "features":
        del latency["predictor"]  # and this (before it, the features model predicted)
    search = {
        "after": _digest(teacher),
        "space": dump["space"],
        "distill": dump["distill"],
        "search": search_section,
    }
    finetune = {"after": _digest(search), "finetune": dump["finetune"]}
    audit = {"after": _digest(finetune), "audit": dump["audit"]}
    return {"teacher": teacher, "search": search, "finetune": finetune, "audit": audit}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every differing leaf (``after``: an earlier stage changed)."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    out = []
    for k in keys:
        if k == "after":
            out.append("an earlier stage's settings")
        else:
            out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out


# --------------------------------------------------------------------------- records


def read_record(run_dir: Path) -> dict[str, dict]:
    path = run_dir / RECORD
    if not path.exists():
        return {}
    record = read_json(path, hint="rerun with --fresh teacher to start this run over")
    for stage, entry in record.items():
        if stage not in STAGES or not isinstance(entry, dict) or "fingerprint" not in entry:
            raise ArtifactError(
                f"{path}: entry {stage!r} is not a stage record; use --fresh teacher"
            )
    return record


def mark_stage(run_dir: Path, stage: str, fingerprint: dict, status: str) -> None:
    record = read_record(run_dir)
    record[stage] = {"status": status, "fingerprint": fingerprint, "time": time.time()}
    write_json(run_dir / RECORD, record)


def set_aside_outputs(run_dir: Path, stages: list[str], log: Log) -> None:
    """Move the outputs of ``stages`` under ``previous/<time>/`` and forget their records.

    The report describes every stage, so it moves with any of them; a copy of the
    ``config.yaml`` they were made with goes along (call this before writing the new one).
    Redoing the teacher redoes everything: the record itself moves too (even a corrupt one).
    """
    names = [name for s in stages for name in OUTPUTS[s]]
    if stages:
        names += OUTPUTS["report"]
    if "teacher" in stages:
        names.append(RECORD)
    moved = [run_dir / name for name in names if (run_dir / name).exists()]
    if moved:
        dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for path in moved:
            path.rename(dest / path.name)
        if (run_dir / "config.yaml").is_file():
            shutil.copy2(run_dir / "config.yaml", dest / "config.yaml")
        log(f"moved {', '.join(p.name for p in moved)} to {dest}")
    record = read_record(run_dir)
    if any(s in record for s in stages):
        write_json(run_dir / RECORD, {k: v for k, v in record.items() if k not in stages})


@dataclass
class Plan:
    """What a command will do per stage: ``reuse``, ``resume`` or ``new``."""

    actions: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, dict] = field(default_factory=dict)
    discard: list[str] = field(default_factory=list)  # outputs to set aside before running

    def runs(self, stage: str) -> bool:
        return self.actions.get(stage) in ("resume", "new")


def plan(cfg: ExperimentConfig, stages: list[str], fresh: str | None = None) -> Plan:
    """Decide reuse for ``stages`` (in order) from ``stages.json``; writes nothing.

    Earlier stages a command does not run must be finished with matching settings.
    """
    run_dir = cfg.run_dir
    fps = fingerprints(cfg)
    try:
        record = read_record(run_dir)
    except ArtifactError:
        if fresh != "teacher":
            raise
        record = {}  # everything is redone, and the torn record is set aside with the rest
    redo = set(STAGES[STAGES.index(fresh) :]) if fresh else set()
    out = Plan(fingerprints=fps)
    cascade = False
    for stage in TRAINED:
        rec = record.get(stage)
        wanted = stage in stages
        if stage in redo or cascade:
            # a stage redone makes every later one stale, whether this command runs it or not
            out.discard.append(stage)
            if wanted:
                out.actions[stage] = "new"
            cascade = True
            continue
        if rec is not None and rec["fingerprint"] != fps[stage]:
            diff = differences(rec["fingerprint"], fps[stage])
            raise StageMismatch(
                f"{stage}: {run_dir} holds a {stage} made with other settings "
                f"({'; '.join(diff[:4])}{'; …' if len(diff) > 4 else ''}); use a new `name`, "
                f"or --fresh {stage} to redo {stage} and every later stage"
            )
        done = rec is not None and rec.get("status") == "done"
        if wanted:
            out.actions[stage] = "reuse" if done else ("resume" if rec else "new")
            if out.actions[stage] == "new":
                out.discard.append(stage)  # outputs without a record: an older or torn run
                cascade = True
        elif stages and STAGES.index(stage) < STAGES.index(stages[0]):
            if not done:
                raise ConfigError(
                    f"{stages[0]}: needs a finished {stage} in {run_dir}; run "
                    f"`casd-ray {stage} CONFIG` (or `casd-ray run CONFIG`) first"
                )
            out.actions[stage] = "reuse"
    return out
