"""Every experiment YAML loads, validates, and runs the whole pipeline in a smoke size.

The paper-scale configs are far too big for a test, so each runs with an override set
(tiny fake data in the real format, ResNet-8, one epoch per stage, two trials): the config's
searcher, scheduler, granularity, budget and distillation settings still run for real, so
no experiment file rots unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from conftest import rules_of, smoke_overrides

from casd_ray.cli import main
from casd_ray.config_file import load_config
from casd_ray.models.family import spec_for
from casd_ray.widths import space

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))
SHAPES = {  # (in_channels, classes, image size) of each dataset, without loading it
    "fashion_mnist": (1, 10, (28, 28)),
    "cifar10": (3, 10, (32, 32)),
    "cifar100": (3, 100, (32, 32)),
    "imagefolder": (3, 10, (32, 32)),  # the CIFAR-10 JPEG folder of the dev machines
}


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_cifar10_resnet20_is_the_method_evidence_setting():
    cfg = load_config(EXPERIMENTS[0].parent / "cifar10_resnet20.yaml")
    assert (cfg.data.dataset, cfg.model.arch, cfg.space.granularity) == (
        "imagefolder",
        "resnet20",
        "layer",
    )
    assert cfg.space.budget.target == 0.5 and cfg.search.keep_control


def test_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    assert {"cifar10_resnet164.yaml", "cifar100_resnet164.yaml"} <= names
    assert "fashion_mnist_resnet56.yaml" in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_config_validates_at_full_size(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    in_ch, classes, size = SHAPES[cfg.data.dataset]
    teacher = spec_for(cfg.model.arch, in_ch, classes, size, cfg.model.width)
    space.check_budget(rules_of(cfg), teacher)  # the budget is reachable for the real teacher
    assert space.gene_names(teacher, cfg.space.granularity)


@pytest.mark.parametrize(
    "path", [p for p in EXPERIMENTS if p.stem.endswith("resnet164")], ids=lambda p: p.stem
)
def test_paper_configs_follow_the_paper_setting(path):
    cfg = load_config(path)
    assert cfg.model.arch == "resnet164"
    assert cfg.space.granularity == "layer"
    assert cfg.space.budget.target == 0.5
    assert cfg.search.scheduler == "asha"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_pipeline_runs_in_smoke_size(path, tmp_path, ray_session, capsys):
    overrides = smoke_overrides(path, tmp_path)
    argv = ["run", str(path)]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0, capsys.readouterr().err
    cfg = load_config(path, overrides)
    run_dir = cfg.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "uniform", "winner"}
    assert report["search"]["trials"] == 2
    assert report["search"]["searcher"] == cfg.search.algorithm
    for part in ("winner", "uniform"):
        assert (run_dir / part / "model.ts").is_file()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    path = EXPERIMENTS[0]
    overrides = smoke_overrides(path, tmp_path)
    argv = ["run", str(path)]
    for item in [*overrides, "search.num_samples=0"]:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("casd-ray: error: search.num_samples") and "\n" not in err
    assert not (tmp_path / "runs").exists()
