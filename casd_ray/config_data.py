"""The ``data:`` section of the experiment config (:mod:`casd_ray.config` holds the rest).

Its own module because the data keys (datasets, splits, shards and streaming) are the
largest section; :mod:`casd_ray.config` re-exports :class:`DataConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    dataset: Literal["cifar10", "cifar100", "fashion_mnist", "imagefolder", "shards", "memory"] = (
        Field(
            "fashion_mnist",
            description=(
                "memory: arrays handed to the Python API (casd_ray.compress); shards: a folder or "
                "s3:// URI written by `casd-ray data pack` (data.root)"
            ),
        )
    )
    digest: str | None = Field(
        None, description="dataset memory: SHA-256 of the arrays (fingerprinted; set by the API)"
    )
    root: str | None = Field(None, description="None: the dataset's default location")
    download: bool = Field(
        False, description=("CIFAR / Fashion-MNIST only, and only when the network allows")
    )
    val_size: int = Field(5000, ge=1, description="carved from train; selection uses it")
    split_seed: int | None = Field(
        None,
        ge=0,
        lt=2**32,
        description=(
            "Seed of the train/val split (and of test_subset); null = the run seed. Fix it "
            "when one teacher serves several seeds (compare with teacher.checkpoint): the "
            "teacher must never have trained on a validation image."
        ),
    )
    train_subset: int | None = Field(
        None, ge=1, description=("quick runs: first N of the shuffled train")
    )
    test_subset: int | None = Field(
        None,
        ge=1,
        description="quick runs: a seeded N-image subset of the test split (reported only)",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        description=(
            "imagefolder: resize the shorter side to this and centre-crop a square (any image"
            " sizes)"
        ),
    )

    channels: Literal[1, 3] | None = Field(
        None,
        description=(
            "images as this many channels: 3 repeats grayscale to RGB (for a model that takes "
            "RGB), 1 averages RGB to gray; None keeps the data's"
        ),
    )
    stream: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description=(
            "shards: read them a window at a time (stream) or decode them into memory once; "
            "auto streams when the decoded training split exceeds data.memory_limit_gb"
        ),
    )
    memory_limit_gb: float = Field(
        4.0, gt=0, description="shards, stream auto: largest decoded train split kept in memory"
    )
    decode: Literal["trial", "ray_data"] = Field(
        "trial",
        description=(
            "streamed shards: decode in the trial's own threads, or in Ray Data tasks "
            "(data.data_cpus more CPUs reserved per trial)"
        ),
    )
    window: int = Field(
        4096, ge=2, description="streamed shards: images decoded and shuffled together"
    )
    data_cpus: float = Field(
        1.0, ge=1, description="decode ray_data: CPUs of Ray Data tasks, reserved per trial"
    )

    @model_validator(mode="after")
    def _stream_needs_shards(self) -> DataConfig:
        if self.stream == "stream" and self.dataset != "shards":
            raise ValueError(
                "stream: stream reads packed shards; set data.dataset: shards and pack "
                "the folder first (casd-ray data pack SRC DST)"
            )
        return self

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("dataset") != "imagefolder":
            raise ValueError("only for dataset imagefolder (the others have one image size)")
        return v
