"""The Python API: compress an ``nn.Module`` you hold, with data you hold, in one call.

    import casd_ray
    result = casd_ray.compress(model, train_set, val_set, budget={"flops": 0.5})
    result.model            # the compressed network to deploy (eval mode, CPU)
    result.save("deploy/")  # model.pt + widths.json + model.ts + model.onnx + preprocessing

It runs the same stages as ``casd-ray run`` (teacher -> search -> fine-tune -> audit ->
report) with the same fingerprints: calling it again with the same arguments and folder
reuses every finished stage and resumes an interrupted one. The command line is a layer over
the same pipeline; a YAML config or an :class:`~casd_ray.config.ExperimentConfig` can be
passed as ``config`` to set everything else.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from casd_ray.artifacts.network import ONNX_FILE, PREPROCESSING, load_compressed, preprocessing_of
from casd_ray.artifacts.trials import TRIALS_FILE, read_trials
from casd_ray.config import ExperimentConfig
from casd_ray.config_file import load_config, validate_config
from casd_ray.data.memory import digest, from_user
from casd_ray.errors import ArtifactError, ConfigError
from casd_ray.files import read_json, write_json
from casd_ray.models.source import register_object
from casd_ray.pipeline.plan import STAGES
from casd_ray.pipeline.run import execute

METRICS = ("flops", "params")


@dataclass
class Result:
    """What :func:`compress` made: the networks, the search's trials and the report."""

    model: nn.Module  # the network the report says to deploy (see ``choice``)
    choice: str  # "winner", "uniform" or "audit/<trial>": which folder ``model`` came from
    winner: nn.Module
    uniform: nn.Module  # every layer at one keep-ratio, same budget and recipe
    trials: pd.DataFrame
    report: dict  # report.json
    run_dir: Path
    report_path: Path  # report.md
    preprocessing: dict = field(default_factory=dict)  # mean, std, input shape, classes

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the deployable network to ``path``: ``model.pt`` + ``widths.json`` (rebuild
        with :func:`casd_ray.load_compressed`), ``model.ts`` (TorchScript), ``model.onnx``
        (when it exports), ``metrics.json`` and ``preprocessing.json``. An existing non-empty
        folder is refused unless ``overwrite``."""
        out = Path(path)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ArtifactError(f"{out}: exists and is not empty; pass overwrite=True")
        src = self.run_dir / self.choice
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.pt", "widths.json", "model.ts", ONNX_FILE, "metrics.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        write_json(out / PREPROCESSING, self.preprocessing)
        return out


def _config(config: Any) -> ExperimentConfig:
    if config is None:
        return ExperimentConfig()
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return validate_config(config)
    if isinstance(config, str | Path):
        return load_config(config)
    raise ConfigError(
        f"config: expected a dict, a YAML path or an ExperimentConfig, got {config!r}"
    )


def _budget(budget: Any) -> dict[str, Any]:
    """``{"flops": 0.5}`` / ``{"params": 0.3}`` / a bare fraction (of the teacher's FLOPs)."""
    if isinstance(budget, int | float) and not isinstance(budget, bool):
        return {"metric": "flops", "target": float(budget)}
    if isinstance(budget, dict) and len(budget) == 1:
        ((metric, target),) = budget.items()
        if metric in METRICS:
            return {"metric": metric, "target": target}
    raise ConfigError(
        f"budget: expected {{'flops': fraction}} or {{'params': fraction}}, got {budget!r}"
    )


def _with(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with sections updated, validated again as a whole (one-line errors)."""
    raw = cfg.model_dump()
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return validate_config(raw)


def compress(
    model: nn.Module | str,
    train: Any,
    val: Any,
    *,
    budget: dict[str, float] | float = 0.5,
    test: Any = None,
    teacher: nn.Module | str | None = None,
    config: ExperimentConfig | dict | str | Path | None = None,
    address: str | None = None,
    output_dir: str | Path | None = None,
    name: str | None = None,
    augment: str = "none",
    fresh: str | None = None,
    log: Callable[[str], None] = print,
) -> Result:
    """Search the widths of ``model`` under ``budget``, distilling every candidate from the
    teacher; prune and fine-tune the winner and the uniform baseline; return them.

    ``model``: a trained ``nn.Module`` (it is the teacher, used as it is), or an architecture
    name (``resnet20``, ``torchvision:resnet18``, ``timm:…``) whose teacher is trained with
    ``config``'s teacher recipe, or loaded from ``teacher`` (a saved teacher folder or state
    dict, or a trained ``nn.Module`` of that architecture).

    ``train``, ``val``, ``test``: a torch ``Dataset`` or ``DataLoader`` of (image, label), an
    ``(images, labels)`` pair of arrays/tensors, or a folder of ``<class>/*.png`` images.
    Float images are used as given (your normalisation); uint8 images are normalised with the
    training split's statistics. ``val`` chooses everything; ``test`` (optional) is only
    reported. ``augment``: casd-ray's seeded augmentation of training batches (``none``,
    ``crop``, ``flip_crop``).

    ``budget``: ``{"flops": 0.5}`` keeps at most half of the teacher's FLOPs (``params``
    likewise). ``config`` sets everything else (search size, recipes; see
    ``docs/configuration.md``). Outputs go to ``output_dir/name`` (default: ``config``'s);
    calling again with the same arguments reuses finished stages and resumes an interrupted
    one; ``fresh`` redoes a stage and every later one. ``address`` joins a Ray cluster.
    Bad input raises a :class:`casd_ray.errors.UserError` whose message names what to fix.
    """
    cfg = _config(config)
    data = from_user(train, val, test, augment=augment)
    top: dict[str, Any] = {}
    if output_dir is not None:
        top["output_dir"] = str(output_dir)
    if name is not None:
        top["name"] = name
    teacher_model = None
    if isinstance(model, nn.Module):
        if teacher is not None:
            raise ConfigError("teacher: give it only with an architecture name; a module is "
                              "its own teacher")  # fmt: skip
        arch, teacher_model = register_object(model), model
    elif isinstance(model, str):
        arch = model
        if isinstance(teacher, nn.Module):
            teacher_model = teacher
        elif teacher is not None:
            top["teacher"] = {"checkpoint": str(teacher)}
    else:
        raise ConfigError(f"model: expected an nn.Module or an architecture name, got {model!r}")
    cfg = _with(
        cfg,
        **top,
        model={"arch": arch},
        data={"dataset": "memory", "digest": digest(data), "root": None},
        space={"budget": _budget(budget)},
    )
    run_dir = execute(
        cfg,
        list(STAGES),
        fresh=fresh,
        address=address,
        log=log,
        data=data,
        teacher_model=teacher_model,
    )
    return result_of(run_dir)


def result_of(run_dir: str | Path) -> Result:
    """The :class:`Result` of a finished run folder (``casd-ray run`` or :func:`compress`)."""
    run_dir = Path(run_dir)
    report = read_json(run_dir / "report.json", hint="run the pipeline to the report first")
    choice = (report.get("deploy") or {}).get("part", "winner")
    data = read_json(run_dir / "teacher" / "data.json", hint="the teacher stage writes it")
    preprocessing = preprocessing_of(data)
    return Result(
        model=load_compressed(run_dir / choice),
        choice=choice,
        winner=load_compressed(run_dir / "winner"),
        uniform=load_compressed(run_dir / "uniform"),
        trials=read_trials(run_dir / TRIALS_FILE),
        report=report,
        run_dir=run_dir,
        report_path=run_dir / "report.md",
        preprocessing=preprocessing,
    )
