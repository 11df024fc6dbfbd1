"""Models that used to crash or cost wrong (issue #28): grouped convs, ghost modules, splits.

Each hard shape is a small model written here (built by ``python:tests/test_hard_models.py:…``)
and goes through what a trial does: the uniform candidate on the budget and random ones,
weights inherited, a forward, a rebuild from the widths alone, and the cost model checked
against ``FlopCounterMode`` and ``numel``. A model casd-ray cannot cut exactly is refused by
the pre-flight check in one line that names the layer. Real registry models are in
``benchmarks/model_coverage.py`` (and ``-m slow`` below).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_fake_fashion_mnist, write_run_config  # noqa: E402

from casd_ray.cli import main
from casd_ray.errors import SourceError
from casd_ray.models.cost import measure_flops
from casd_ray.models.family import build_model, flops, group_widths, params, spec_for, with_ignore
from casd_ray.models.graph_family import prefix_genes
from casd_ray.widths import space
from casd_ray.widths.inherit import inherit
from casd_ray.widths.preflight import check_candidate, preflight

HERE = Path(__file__).resolve()
SIZE = 16


def source(name: str, **kwargs) -> tuple[str, dict]:
    return f"python:{HERE}:{name}", kwargs


class GroupedSE(nn.Module):
    """A grouped conv (``groups``) between plain convs, then squeeze-excitation."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.grouped = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, groups=groups), nn.BatchNorm2d(64)
        )
        self.se_reduce, self.se_expand = nn.Conv2d(64, 8, 1), nn.Conv2d(8, 64, 1)
        self.head = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        s = self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True))))
        x = torch.relu(self.head(x * torch.sigmoid(s)))
        return self.fc(x.mean((2, 3)))


class Ghost(nn.Module):
    """GhostNet's module: half the channels from a conv, half from a depthwise conv of those,
    concatenated and added to a shortcut (Torch-Pruning maps two channels onto one)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.primary = nn.Conv2d(16, 8, 1)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        half = self.primary(x)
        x = x + torch.cat([half, self.cheap(half)], 1)
        return self.fc(x.mean((2, 3)))


class SplitConcat(nn.Module):
    """Channels split with ``torch.chunk``, one half convolved, concatenated back."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.branch = nn.Conv2d(16, 16, 3, padding=1)
        self.mix = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(torch.relu(self.stem(x)), 2, dim=1)
        x = torch.relu(self.mix(torch.cat([self.branch(a), b], 1)))
        return self.fc(x.mean((2, 3)))


class Narrow(nn.Module):
    """Slices a fixed number of channels: no pruned candidate can run."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.fc(torch.relu(self.mid(x[:, :8])).mean((2, 3)))


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def spec_of(name: str, ignore: tuple[str, ...] = (), **kwargs):
    arch, kw = source(name, **kwargs)
    spec = spec_for(arch, image_size=(SIZE, SIZE), kwargs=kw)
    return with_ignore(spec, ignore) if ignore else spec


def candidates(spec, target: float = 0.5, n: int = 3):
    """The uniform candidate on the budget and ``n - 1`` random ones, as trials build them."""
    rules = space.SpaceRules("layer", target)
    rng = np.random.default_rng(0)
    genes = space.gene_names(spec, "layer")
    genomes = [space.control_genome(rules, spec)]
    genomes += [{g: float(rng.uniform(0.1, 1.0)) for g in genes} for _ in range(n - 1)]
    return [space.candidate_spec(rules, spec, g) for g in genomes]


def assert_exact(spec, target: float = 0.5) -> None:
    teacher = build_model(spec).eval()
    for student in candidates(spec, target):
        assert space.cost_ratio(student, spec, "flops") <= target
        assert check_candidate(teacher, spec, student) is None
        model = inherit(teacher, spec, student)
        assert flops(student) == measure_flops(model, (3, SIZE, SIZE))
        assert params(student) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_grouped_conv_is_pruned_in_whole_groups_and_costed_exactly(groups):
    spec = spec_of("GroupedSE", groups=groups)
    assert_exact(spec)
    for student in candidates(spec):
        model = build_model(student)
        conv = model.grouped[0]
        assert conv.groups == groups  # every group keeps the same number of channels
        assert conv.in_channels % groups == 0 and conv.out_channels % groups == 0
        assert group_widths(student)["stem.0"] % groups == 0


def test_grouped_conv_inherits_the_same_positions_in_every_group():
    spec = spec_of("GroupedSE", groups=4)
    teacher = build_model(spec).eval()
    student = space.widths_from_ratios(spec, {"stem.0": 0.5})
    model = inherit(teacher, spec, student).eval()
    kept = model.grouped[0].weight
    assert kept.shape == (64, 4, 3, 3)  # 8 input channels per group, 4 of them kept
    x = torch.randn(2, 3, SIZE, SIZE)
    assert model(x).shape == (2, 10)


def test_ghost_module_maps_two_channels_onto_one():
    spec = spec_of("Ghost")
    assert_exact(spec)


def test_split_and_concat_never_crash_nor_miscost():
    """Torch-Pruning mis-traces the chunk: that group stays full, the rest is exact."""
    spec = spec_of("SplitConcat")
    assert "stem" not in group_widths(spec)
    assert_exact(spec, target=0.8)


def test_ignored_layer_keeps_its_input_channels():
    spec = spec_of("GroupedSE", ignore=("grouped",), groups=4)
    assert "stem.0" not in group_widths(spec)  # the group the ignored conv reads stays full
    assert_exact(spec, target=0.8)
    assert build_model(candidates(spec, 0.8)[0]).grouped[0].in_channels == 32


def test_preflight_refuses_in_one_line_naming_the_layer():
    spec = spec_of("Narrow")
    with pytest.raises(SourceError) as err:
        preflight(space.SpaceRules("layer", 0.5), spec)
    line = str(err.value)
    assert "\n" not in line and "mid fails after pruning" in line and "space.ignore" in line


def test_preflight_passes_models_it_can_cut():
    preflight(space.SpaceRules("block", 0.5), spec_of("GroupedSE", groups=4))
    preflight(space.SpaceRules("layer", 0.5), spec_of("Ghost"))


def test_casd_ray_run_refuses_before_the_teacher_trains(tmp_path, capsys):
    """Through the command line: exit 2, one line naming the layer, no run folder."""
    data = write_fake_fashion_mnist(tmp_path / "data", 60, 20)
    cfg = write_run_config(
        tmp_path / "c.yaml", tmp_path / "runs", data, model={"arch": source("Narrow")[0]}
    )
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mid fails after pruning" in err
    assert not (tmp_path / "runs").exists()


def test_stage_granularity_splits_a_features_classifier_model():
    """torchvision's mobilenet_v3_small, vgg, regnet, convnext: ``features`` + ``classifier``
    at the top gave 2 genes, one of them the whole network."""
    names = ["features.0.0", "features.1.block.0", "features.2.block.0", "classifier.0"]
    stage = prefix_genes(names, "stage")
    assert list(stage) == ["features_0", "features_1", "features_2", "classifier_0"]
    assert prefix_genes(["conv1", "layer1.0.a", "layer2.0.a"], "stage") == {
        "conv1": ["conv1"], "layer1": ["layer1.0.a"], "layer2": ["layer2.0.a"]
    }  # fmt: skip


def test_a_channel_mismatch_suggests_data_channels(tmp_path, capsys):
    data = write_fake_fashion_mnist(tmp_path / "data", 60, 20)
    arch = source("Ghost")[0]
    cfg = write_run_config(tmp_path / "c.yaml", tmp_path / "runs", data, model={"arch": arch})
    assert main(["run", str(cfg), "--set", "model.kwargs={in_channels: 3}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set data.channels: 3" in err


def test_data_channels_repeats_grayscale_to_rgb(tmp_path):
    from casd_ray.config import DataConfig
    from casd_ray.data.load import load_dataset

    root = write_fake_fashion_mnist(tmp_path / "data", 60, 20)
    cfg = DataConfig(dataset="fashion_mnist", root=str(root), val_size=10, channels=3)
    splits = load_dataset(cfg, 0)
    assert splits.in_channels == 3 and splits.x_test.shape[1] == 3
    assert np.array_equal(splits.x_train[:, 0], splits.x_train[:, 2])
    assert len(splits.mean) == len(splits.std) == 3


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["torchvision:regnet_y_400mf", "timm:ghostnet_100"])
def test_casd_ray_run_compresses_the_models_that_crashed(arch, tmp_path, capsys):
    """Issue #28's two registry models end to end: every trial within budget, the exports'
    measured FLOPs equal to the cost model's, the reload equal (``-m slow``: minutes)."""
    import pandas as pd
    import yaml
    from test_own_models import write_mixed_images

    from casd_ray import load_compressed
    from casd_ray.models.family import spec_from_json

    images = write_mixed_images(tmp_path / "images")
    cfg = {
        "name": "hard",
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "imagefolder", "root": str(images), "val_size": 9, "image_size": 32},
        "model": {"arch": arch},
        "teacher": {"epochs": 1, "batch_size": 16, "lr": 0.02},
        "space": {"budget": {"target": 0.5}},
        "search": {"num_samples": 3, "max_epochs": 1, "batch_size": 16, "lr": 0.02},
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 0.02},
        "audit": {"top_k": 0},
    }
    path = tmp_path / "hard.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "hard"
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 3 and trials["error"].isna().all()
    for row in trials.itertuples():
        assert row.flops_ratio <= 0.5
        spec = spec_from_json(row.widths)
        assert row.flops == measure_flops(build_model(spec), (3, 32, 32))
    for part in ("winner", "uniform"):
        summary = json.loads((run / "report.json").read_text())["models"][part]
        assert summary["flops"] == summary["flops_measured"]
        assert summary["params"] == summary["params_measured"]
        model = load_compressed(run / part).eval()
        assert model(torch.zeros(2, 3, 32, 32)).shape[0] == 2


# ------------------------------------------------------------------ the registries, timm's habit

sys.path.insert(0, str(HERE.parent.parent / "benchmarks"))
import model_coverage  # noqa: E402

# a few seconds each: a ghost module, grouped convs, and a model Torch-Pruning cannot trace
FAST = {
    "timm:ghostnet_100": "exact",
    "torchvision:regnet_x_400mf": "exact",
    "torchvision:shufflenet_v2_x0_5": "refused",
}


@pytest.mark.parametrize(
    "arch",
    [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in model_coverage.models()],
)
def test_registry_model_compresses_exactly_or_is_refused_up_front(arch):
    """Every torchvision classification model and a timm model per family (``-m slow``; a
    fast subset by default): exact, or one line before training — never a crash."""
    row = model_coverage.check(arch, 32, 0.5, max_params=150_000_000, timeout=0, samples=1)
    assert row["outcome"] in {"exact", "refused", "too big"}, row
    assert row["outcome"] == FAST.get(arch, row["outcome"]), row
    assert "\n" not in row.get("line", "")


@pytest.mark.parametrize("name", ["GroupedSE", "Ghost"])
def test_export_of_a_grouped_candidate_reloads_equal(name, tmp_path):
    """widths.json rebuilds the grouped candidate; TorchScript and ONNX give its outputs."""
    import onnxruntime

    from casd_ray import load_compressed
    from casd_ray.artifacts.network import ONNX_FILE, load_torchscript, save_compressed

    spec = spec_of(name)
    student = candidates(spec, n=2)[1]
    model = inherit(build_model(spec).eval(), spec, student).eval()
    save_compressed(model, student, tmp_path / "net")
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(load_compressed(tmp_path / "net").eval()(x), want)
        assert torch.allclose(load_torchscript(tmp_path / "net")(x), want, atol=1e-5)
    session = onnxruntime.InferenceSession(str(tmp_path / "net" / ONNX_FILE))
    (got,) = session.run(None, {"images": x.numpy()})
    assert np.abs(got - want.numpy()).max() <= 1e-4 * (1 + float(want.abs().max()))
