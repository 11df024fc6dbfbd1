"""A latency budget's model for one run: fitted once, kept in ``latency.json``, reused.

The model is fitted from measurements, which differ from run to run; a resumed or rerun
search must repair genomes exactly as before, so the fitted model is saved in the run
folder and reused while the deployment (runtime, batch, threads, target) is unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from casd_ray.config import ExperimentConfig
from casd_ray.errors import ConfigError
from casd_ray.files import read_json_or_none, write_json
from casd_ray.models.family import Spec
from casd_ray.pipeline.plan import Log
from casd_ray.widths.latency_model import FEATURES, LatencyModel, build_latency_model
from casd_ray.widths.space import SpaceRules

LATENCY_FILE = "latency.json"


def _settings(cfg: ExperimentConfig) -> dict:
    b = cfg.space.budget
    # the feature list too: a model saved with other features cannot be reused
    return {
        "target": b.target,
        **b.latency.model_dump(),
        "seed": cfg.seed,
        "features": list(FEATURES),
    }


def saved_latency(cfg: ExperimentConfig, rules: SpaceRules) -> SpaceRules:
    """``rules`` with the model this run folder keeps for the same settings, if any (stages
    that are reused, and a trials table rebuilt, need the same model but no measurement)."""
    saved = read_json_or_none(cfg.run_dir / LATENCY_FILE)
    if not (rules.metric == "latency" and isinstance(saved, dict)):
        return rules
    if saved.get("settings") != _settings(cfg):
        return rules
    return replace(rules, latency=LatencyModel.from_dict(saved["model"]))


def with_latency(
    cfg: ExperimentConfig, rules: SpaceRules, teacher_spec: Spec, log: Log
) -> SpaceRules:
    """``rules`` carrying the run's latency model (read from the run folder, or fitted now:
    measuring the teacher, random networks and the smallest one, which may refuse the
    target). Rules of a FLOPs or params budget are returned as they are."""
    if rules.metric != "latency":
        return rules
    if cfg.search.algorithm == "optuna-nsga2":
        raise ConfigError(
            "search.algorithm: optuna-nsga2 trades accuracy against FLOPs, not latency; with "
            "space.budget.metric latency use optuna-tpe, evolution or random"
        )
    kept = saved_latency(cfg, rules)
    if kept.latency is not None:
        log(f"latency: reusing the model in {cfg.run_dir / LATENCY_FILE}")
        return kept
    b, s = cfg.space.budget, cfg.space
    model = build_latency_model(
        teacher_spec, b.latency, b.target, min_channels=s.min_channels,
        divisible_by=s.divisible_by, seed=cfg.seed, log=log,
    )  # fmt: skip
    if model.block > 1 and s.divisible_by % model.block:
        log(f"latency: convolutions off whole blocks of {model.block} channels measured slower "
            f"on this device; space.divisible_by: {model.block} keeps every candidate on the "
            "fast path")  # fmt: skip
    return replace(rules, latency=model)


def save_latency(cfg: ExperimentConfig, rules: SpaceRules) -> None:
    """Write the rules' latency model into the run folder (after every check passed)."""
    if rules.latency is not None:
        path = Path(cfg.run_dir) / LATENCY_FILE
        write_json(path, {"settings": _settings(cfg), "model": rules.latency.as_dict()})
