"""Typed experiment config: loaded from YAML, validated by pydantic, overridable by --set.

Unknown keys and bad values are errors that name the field (``search.max_epochs: ...``),
so a typo never silently falls back to a default. The resolved config is written into the
run folder, making every run reproducible from its own outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from casd_ray.config_data import DataConfig
from casd_ray.config_data import StrictModel as _Strict
from casd_ray.models.names import check_arch_name


class ModelConfig(_Strict):
    arch: str = Field(
        "resnet20",
        description=(
            "A built-in pre-activation ResNet (resnet20, resnet56, resnet164, ...) or your "
            "own: torchvision:<name>, timm:<name>, python:<module or file.py>:<callable>"
        ),
    )
    width: int = Field(
        16, ge=1, description=("built-in ResNets: base width; stages use width*(1, 2, 4)")
    )
    kwargs: dict[str, Any] = Field(
        {}, description=("passed to a source model's factory (num_classes: the data's)")
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        try:
            check_arch_name(v)
        except ValueError as err:  # the field name is added by the config's error format
            raise ValueError(str(err).removeprefix("model.arch: ")) from None
        return v


class TeacherConfig(_Strict):
    checkpoint: str | None = Field(
        None, description=("a saved teacher dir or state-dict file: load, don't train")
    )
    epochs: int = Field(
        30, ge=1, description="teacher training epochs (SGD, per-step cosine schedule)"
    )
    batch_size: int = Field(128, ge=1, description="teacher batch size")
    lr: float = Field(0.1, gt=0, description="teacher peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    warmup_epochs: int = Field(
        0, ge=0, description="linear learning-rate warm-up epochs before the cosine"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="label smoothing of the teacher's loss (a smoothed teacher distils worse)",
    )


class LatencyConfig(_Strict):
    """Where and how a latency budget is measured: a deployment is runtime, batch and threads."""

    runtime: Literal["torch", "torchscript", "onnxruntime", "cuda"] = Field(
        "onnxruntime",
        description=(
            "torch: eager PyTorch on CPU; torchscript: traced, on CPU; onnxruntime: ONNX "
            "Runtime's CPU provider; cuda: eager PyTorch with AMP on the GPU"
        ),
    )
    batch_size: int = Field(
        1, ge=1, description="images per forward (1: one request; larger: a throughput batch)"
    )
    threads: int = Field(1, ge=1, description="CPU threads of the runtime (CPU runtimes)")
    target_ms: float | None = Field(
        None,
        gt=0,
        description=(
            "budget in milliseconds per batch; null: space.budget.target times the "
            "teacher's measured latency"
        ),
    )
    fit_networks: int = Field(
        24, ge=4, description="random-width networks measured to fit the latency model"
    )
    check_networks: int = Field(
        50,
        ge=0,
        description="further random networks measured to report the model's error (MAPE, worst)",
    )
    calibrate_networks: int = Field(
        16,
        ge=0,
        description=(
            "networks drawn as the search draws them (random genomes repaired onto the "
            "target), measured beside the teacher before the search to scale the model's "
            "ratios where the search looks; 0: no calibration"
        ),
    )
    predictor: Literal["table", "features"] = Field(
        "table",
        description=(
            "what predicts a candidate's latency for repair: table, every convolution timed "
            "alone on the deployment at a grid of widths and summed (~1-2 min more to build); "
            "features, a fit to FLOPs, activations and parameters"
        ),
    )
    align_channels: bool = Field(
        True,
        description=(
            "when the fitted latency model finds convolutions off whole channel blocks "
            "slower on this device, every searched width is a whole block (with "
            "space.divisible_by); false: every width is searched"
        ),
    )
    min_run_time: float = Field(
        0.2,
        gt=0,
        description=(
            "least seconds of timed runs per measurement (up to 10x while the spread of "
            "blocks of runs exceeds 5 % of their median)"
        ),
    )


class BudgetConfig(_Strict):
    metric: Literal["flops", "params", "latency"] = Field(
        "flops",
        description=(
            "what the budget limits: FLOPs or parameters of one image's forward, or the "
            "latency measured on space.budget.latency's runtime"
        ),
    )
    target: float = Field(
        0.5, gt=0, le=1, description=("keep at most this fraction of the teacher's cost")
    )
    latency: LatencyConfig = Field(
        LatencyConfig(), description="metric latency: runtime, batch, threads, target in ms"
    )


class SpaceConfig(_Strict):
    granularity: Literal["stage", "block", "layer"] = Field(
        "stage",
        description="stage: one gene per stage; block: one per block; layer: one per channel group",
    )
    min_ratio: float = Field(
        0.1, gt=0, le=1, description=("genome bounds (keep-ratio per searched group)")
    )
    max_ratio: float = Field(1.0, gt=0, le=1, description="largest keep-ratio a gene may take")
    min_channels: int = Field(1, ge=1, description="no channel group keeps fewer channels")
    divisible_by: int = Field(
        1,
        ge=1,
        description="pruned widths are multiples of this (a group kept whole stays as it is)",
    )
    importance: Literal["l1", "bn_gamma"] = Field(
        "l1", description="channel importance for weight inheritance: filter L1 norm or BN |gamma|"
    )
    ignore: list[str] = Field(
        [],
        description=(
            "Source models: module paths (and everything under them) whose channels stay "
            "full. The classifier (any layer whose output is the network's output) always "
            "does."
        ),
    )
    repair: bool = Field(
        True, description=("scale every genome onto the budget (off for optuna-nsga2)")
    )
    budget: BudgetConfig = BudgetConfig()

    @model_validator(mode="after")
    def _bounds(self) -> SpaceConfig:
        if self.min_ratio > self.max_ratio:
            raise ValueError("min_ratio must be <= max_ratio")
        return self


class DistillConfig(_Strict):
    temperature: float = Field(
        4.0, gt=0, description="softmax temperature T of the distillation loss"
    )
    alpha: float = Field(
        0.9,
        ge=0,
        le=1,
        description="weight of the soft (KL) term; 1 - alpha weighs cross-entropy on labels",
    )
    bn_recalibration_batches: int = Field(
        0, ge=0, description=("EagleEye adaptive BN before scoring")
    )


CONTROLS = ("uniform", "global", "torch_pruning")


class ScreenConfig(_Strict):
    """Rung 0 of the search: every candidate scored with no training, only the best distilled."""

    promote: int | None = Field(
        None,
        ge=1,
        description=(
            "candidates distilled after rung 0, the controls included (the rest stop there); "
            "null: no rung 0, every candidate distils"
        ),
    )
    bn_batches: int = Field(
        20, ge=1, description="adaptive BN: training batches BN statistics are estimated on"
    )
    steps: int = Field(0, ge=0, description="distillation steps before the rung-0 score")
    val_images: int = Field(
        2000, ge=10, description="the fixed validation subset rung 0 evaluates on"
    )
    score: Literal["acc", "kd"] = Field(
        "acc", description="rank by accuracy, or by the KD loss to the teacher's logits"
    )
    observe: float = Field(
        0.37,
        ge=0,
        lt=1,
        description=(
            "part of the candidates only screened, none promoted (the controls excepted): a "
            "searcher that learns proposes its best late (the secretary rule's 1/e)"
        ),
    )


class SearchConfig(_Strict):
    algorithm: Literal["optuna-tpe", "optuna-nsga2", "evolution", "random"] = Field(
        "optuna-tpe", description="the searcher proposing genomes"
    )
    num_samples: int = Field(
        16, ge=1, description="trials (candidates) in the search, the controls included"
    )
    max_epochs: int = Field(
        4, ge=1, description="distillation epochs a trial may reach (ASHA stops weak ones earlier)"
    )
    train_subset: int | None = Field(
        None,
        ge=2,
        description=(
            "Images per search epoch: a seeded random subset of the train split (a cheaper "
            "proxy for ranking candidates); None = all. The fine-tune always uses the whole "
            "train split."
        ),
    )
    batch_size: int = Field(128, ge=1, description="trial batch size")
    lr: float = Field(0.05, gt=0, description="trial peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of trials")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay of trials")
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop weak trials at rungs; fifo: every trial runs max_epochs"
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before the first rung")
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung"
    )
    keep_control: bool = Field(
        True, description=("ASHA never stops the uniform control (the yardstick)")
    )
    cpus_per_trial: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per trial (and torch threads it uses)"
    )
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial (fractions share a GPU)")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    generation_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Trials per generation: proposals and ASHA's stops see only earlier generations, "
            "so the same seed gives the same search on any machine, busy or idle "
            "(casd_ray.search.rungs). null: asynchronous (Tune's default; what was seen "
            "depends on timing). Fingerprinted."
        ),
    )
    shared_logits: bool = Field(
        True,
        description=(
            "The teacher's logits for every search batch computed once and shared by all "
            "trials (batches are seeded by (seed, epoch), so they are the same in every "
            "trial)."
        ),
    )
    precise_bn_batches: int = Field(
        20,
        ge=0,
        description=(
            "Precise BN (Wu & Johnson 2021): before each epoch's validation, BN statistics "
            "are re-estimated on this many of the epoch's batches with the epoch's final "
            "weights; the running averages lag behind weights that move fast early in the "
            "schedule, which made epoch-1 scores rank trials almost at random "
            "(benchmarks/search_efficiency.py). 0: off."
        ),
    )
    storage_path: str | None = Field(
        None,
        description=(
            "Where trial checkpoints and Tune's state go (casd_ray.search.storage): null = "
            "the run folder; a shared folder (NFS) or a bucket URI (s3://bucket/prefix) for "
            "multi-node searches."
        ),
    )
    max_failures: int = Field(
        0, ge=0, description=("retries of a failed trial; the search goes on anyway")
    )
    population: int = Field(8, ge=2, description="evolution")
    sample_size: int = Field(3, ge=1, description="evolution tournament")
    mutation_genes: int = Field(2, ge=1, description="evolution: genes perturbed per child")
    amp: bool = Field(True, description="mixed precision when the trial has a GPU")
    controls: list[Literal["uniform", "global", "torch_pruning"]] = Field(
        list(CONTROLS),
        description=(
            "free allocations tried first and never stopped: uniform width, the global "
            "channel ranking, Torch-Pruning's global pruning"
        ),
    )
    screen: ScreenConfig = Field(ScreenConfig(), description="rung 0 (screening)")


class FinetuneConfig(_Strict):
    epochs: int = Field(
        10,
        ge=1,
        description="fine-tune epochs of every compared network (winner, uniform, audit, arms)",
    )
    batch_size: int = Field(128, ge=1, description="fine-tune batch size")
    lr: float = Field(0.05, gt=0, description="fine-tune peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up epochs")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class AuditConfig(_Strict):
    top_k: int = Field(
        5,
        ge=0,
        description=(
            "Proxy-fidelity audit: fine-tune the top_k completed trials (plus winner and "
            "control, already fine-tuned) with the final recipe, and rank-correlate search "
            "score with final validation accuracy. 0 switches it off (each audited trial "
            "costs one fine-tune)."
        ),
    )


class ExperimentConfig(_Strict):
    name: str = Field("quick", description="run folder name: outputs go to output_dir/name")
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="seed of everything random (batches, searcher, inits)",
    )
    output_dir: str = Field("runs", description="where run folders are made")
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
