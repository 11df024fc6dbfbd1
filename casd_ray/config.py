"""Typed experiment config: loaded from YAML, validated by pydantic, overridable by --set.

Unknown keys and bad values are errors that name the field (``search.max_epochs: ...``),
so a typo never silently falls back to a default. The resolved config is written into the
run folder, making every run reproducible from its own outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the field or file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: Literal["cifar10", "cifar100", "fashion_mnist", "imagefolder"] = "fashion_mnist"
    root: str | None = None  # None: the dataset's default location
    download: bool = False  # CIFAR / Fashion-MNIST only, and only when the network allows
    val_size: int = Field(5000, ge=1)  # carved from train; selection uses it
    # Seed of the train/val split (and of test_subset); null = the run seed. Fix it when one
    # teacher serves several seeds (compare with teacher.checkpoint): the teacher must never
    # have trained on a validation image.
    split_seed: int | None = None
    train_subset: int | None = Field(None, ge=1)  # quick runs: first N of the shuffled train
    test_subset: int | None = Field(None, ge=1)
    # imagefolder: resize the shorter side to this and centre-crop a square (any image sizes)
    image_size: int | None = Field(None, ge=8)

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("dataset") != "imagefolder":
            raise ValueError("only for dataset imagefolder (the others have one image size)")
        return v


class ModelConfig(_Strict):
    # A built-in pre-activation ResNet (resnet20, resnet56, resnet164, ...) or your own:
    # torchvision:<name>, timm:<name>, python:<module or file.py>:<callable>
    arch: str = "resnet20"
    width: int = Field(16, ge=1)  # built-in ResNets: base width; stages use width*(1, 2, 4)
    kwargs: dict[str, Any] = {}  # passed to a source model's factory (num_classes: the data's)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from casd_ray.models import check_arch_name  # lazy: torch only once a config is read

        try:
            check_arch_name(v)
        except ValueError as err:  # the field name is added by the config's error format
            raise ValueError(str(err).removeprefix("model.arch: ")) from None
        return v


class TeacherConfig(_Strict):
    checkpoint: str | None = None  # a saved teacher dir or state-dict file: load, don't train
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class BudgetConfig(_Strict):
    metric: Literal["flops", "params"] = "flops"
    target: float = Field(0.5, gt=0, le=1)  # keep at most this fraction of the teacher's cost


class SpaceConfig(_Strict):
    granularity: Literal["stage", "block", "layer"] = "stage"
    min_ratio: float = Field(0.1, gt=0, le=1)  # genome bounds (keep-ratio per searched group)
    max_ratio: float = Field(1.0, gt=0, le=1)
    min_channels: int = Field(1, ge=1)
    divisible_by: int = Field(1, ge=1)
    importance: Literal["l1", "bn_gamma"] = "l1"
    # Source models: module paths (and everything under them) whose channels stay full.
    # The classifier (any layer whose output is the network's output) always does.
    ignore: list[str] = []
    repair: bool = True  # scale every genome onto the budget (off for optuna-nsga2)
    budget: BudgetConfig = BudgetConfig()

    @model_validator(mode="after")
    def _bounds(self) -> SpaceConfig:
        if self.min_ratio > self.max_ratio:
            raise ValueError("min_ratio must be <= max_ratio")
        return self


class DistillConfig(_Strict):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    bn_recalibration_batches: int = Field(0, ge=0)  # EagleEye adaptive BN before scoring


class SearchConfig(_Strict):
    algorithm: Literal["optuna-tpe", "optuna-nsga2", "evolution", "random"] = "optuna-tpe"
    num_samples: int = Field(16, ge=1)
    max_epochs: int = Field(4, ge=1)
    # Images per search epoch: a seeded random subset of the train split (a cheaper proxy
    # for ranking candidates); None = all. The fine-tune always uses the whole train split.
    train_subset: int | None = Field(None, ge=2)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    keep_control: bool = True  # ASHA never stops the uniform control (the yardstick)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int = Field(2, ge=1)
    # Trials per generation: proposals and ASHA's stops see only earlier generations, so the
    # same seed gives the same search on any machine, busy or idle (casd_ray.rungs). null:
    # asynchronous (Tune's default; what was seen depends on timing). Fingerprinted.
    generation_size: int | None = Field(None, ge=1)
    # The teacher's logits for every search batch computed once and shared by all trials
    # (batches are seeded by (seed, epoch), so they are the same in every trial).
    shared_logits: bool = True
    # Precise BN (Wu & Johnson 2021): before each epoch's validation, BN statistics are
    # re-estimated on this many of the epoch's batches with the epoch's final weights; the
    # running averages lag behind weights that move fast early in the schedule, which made
    # epoch-1 scores rank trials almost at random (benchmarks/search_efficiency.py). 0: off.
    precise_bn_batches: int = Field(20, ge=0)
    # Where trial checkpoints and Tune's state go (casd_ray.storage): null = the run folder;
    # a shared folder (NFS) or a bucket URI (s3://bucket/prefix) for multi-node searches.
    storage_path: str | None = None
    max_failures: int = Field(0, ge=0)  # retries of a failed trial; the search goes on anyway
    population: int = Field(8, ge=2)  # evolution
    sample_size: int = Field(3, ge=1)  # evolution tournament
    mutation_genes: int = Field(2, ge=1)  # evolution: genes perturbed per child
    amp: bool = True  # mixed precision when the trial has a GPU


class FinetuneConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class AuditConfig(_Strict):
    # Proxy-fidelity audit: fine-tune the top_k completed trials (plus winner and control,
    # already fine-tuned) with the final recipe, and rank-correlate search score with final
    # validation accuracy. 0 switches it off (each audited trial costs one fine-tune).
    top_k: int = Field(5, ge=0)


class ExperimentConfig(_Strict):
    name: str = "quick"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    space: SpaceConfig = SpaceConfig()
    distill: DistillConfig = DistillConfig()
    search: SearchConfig = SearchConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    audit: AuditConfig = AuditConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # the run folder is output_dir/name: a path in the name would write elsewhere
        if not _PLAIN_NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError(
                "must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')"
            )
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["search.max_epochs=2", "data.root=/x"]`` -> pairs; values parsed as YAML scalars."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(
                f"--set {key.strip()}: value {raw!r} is not valid YAML ({first})"
            ) from None
        out.append((key.strip(), value))
    return out


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return " ".join(f"{field}: {msg} (got {got})".split())


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot read the config ({type(err).__name__})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if raw is None:
            # an empty file would silently run every default (into the demo's own folder)
            raise ConfigError(f"{p}: the config file is empty; start from experiments/quick.yaml")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_path(raw, key, value)
    return validate_config(raw)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    from casd_ray.files import write_text

    write_text(path, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
