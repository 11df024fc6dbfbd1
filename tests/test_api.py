"""The Python API: ``casd_ray.compress`` on a model and data held in memory, as a notebook
user calls it — a real (tiny) run through every stage on a shared local Ray instance."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from torch import nn
from torch.utils.data import TensorDataset

import casd_ray
from casd_ray.errors import ArtifactError, ConfigError, DataError
from casd_ray.models.cost import measure_flops


class SmallNet(nn.Module):
    """A CNN defined here, not importable by any factory name: the API must handle it."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _data(n: int, seed: int) -> TensorDataset:
    """Three classes told apart by which colour channel is bright (+ noise), float images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 12, 12, generator=g) * 0.5
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


CONFIG = {
    "name": "api",
    "teacher": {"epochs": 1, "batch_size": 32},
    "space": {"granularity": "layer", "min_channels": 2},
    "search": {"num_samples": 3, "max_epochs": 1, "batch_size": 32, "max_concurrent": 2},
    "finetune": {"epochs": 1, "batch_size": 32},
    "audit": {"top_k": 0},
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _data(240, 0)
    for _ in range(3):
        for i in range(0, 240, 40):
            x, y = data.tensors[0][i : i + 40], data.tensors[1][i : i + 40]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def first(local_ray, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    logs: list[str] = []
    result = casd_ray.compress(
        trained, _data(240, 0), _data(60, 1), test=_data(60, 2), budget={"flops": 0.5},
        config=CONFIG, output_dir=out, log=logs.append,
    )  # fmt: skip
    return out, result, logs


def test_compress_returns_a_model_within_the_budget(first, trained):
    _, result, _ = first
    teacher_flops = measure_flops(trained, (3, 12, 12))
    for net in (result.model, result.winner, result.uniform):
        assert measure_flops(net, (3, 12, 12)) <= 0.5 * teacher_flops
    assert result.choice in ("winner", "uniform")
    assert len(result.trials) == 3 and result.trials["completed"].any()
    assert result.report_path.is_file() and "Deploy" in result.report_path.read_text()
    assert result.preprocessing["mean"] == [0.0, 0.0, 0.0]  # float images: used as given
    assert trained.head.in_features == 32  # the caller's model is never pruned in place


def test_saved_result_reloads_to_the_same_outputs(first, tmp_path):
    _, result, _ = first
    folder = result.save(tmp_path / "deploy")
    x = _data(8, 3).tensors[0]
    with torch.no_grad():
        want = result.model(x)
        same_session = casd_ray.load_compressed(folder)  # this session knows SmallNet
        assert torch.allclose(same_session(x), want, atol=1e-5)
        from casd_ray.models.names import OBJECTS

        saved = dict(OBJECTS)
        OBJECTS.clear()  # as in a new Python session
        try:
            with pytest.raises(ArtifactError, match="pass model="):
                casd_ray.load_compressed(folder)
            again = casd_ray.load_compressed(folder, model=SmallNet())
        finally:
            OBJECTS.update(saved)
        assert torch.allclose(again(x), want, atol=1e-5)
        scripted = torch.jit.load(str(folder / "model.ts"))
        assert torch.allclose(scripted(x), want, atol=1e-5)
    assert {"mean", "std", "classes", "formula"} <= set(
        __import__("json").loads((folder / "preprocessing.json").read_text())
    )
    with pytest.raises(ArtifactError, match="not empty"):
        result.save(folder)  # nothing already written is overwritten


def test_a_second_call_on_the_same_folder_reuses_every_stage(first, trained):
    out, result, _ = first
    logs: list[str] = []
    again = casd_ray.compress(
        trained, _data(240, 0), _data(60, 1), test=_data(60, 2), budget={"flops": 0.5},
        config=CONFIG, output_dir=out, log=logs.append,
    )  # fmt: skip
    for stage in ("teacher", "search", "finetune"):
        assert any(f"{stage}: reusing" in line for line in logs), (stage, logs)
    assert again.choice == result.choice
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_other_data_is_refused_by_the_finished_teacher(first, trained):
    out, _, _ = first
    with pytest.raises(ConfigError, match="teacher"):
        casd_ray.compress(
            trained, _data(200, 5), _data(60, 1), budget={"flops": 0.5}, config=CONFIG,
            output_dir=out, log=lambda _: None,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": {"latency_ms": 3}}, ConfigError, "budget"),
        ({"budget": 1.5}, ConfigError, "space.budget.target"),
        ({"val": np.zeros((4, 3, 12, 12))}, DataError, "val"),
        ({"train": "/no/such/folder"}, DataError, "train"),
        ({"augment": "mixup"}, DataError, "augment"),
        ({"config": {"search": {"num_sample": 3}}}, ConfigError, "search.num_sample"),
    ],
)
def test_bad_arguments_are_one_line_errors(trained, tmp_path, kwargs, error, match):
    args = {"train": _data(60, 0), "val": _data(20, 1), "budget": 0.5, "config": CONFIG}
    args.update(kwargs)
    with pytest.raises(error, match=match) as err:
        casd_ray.compress(trained, output_dir=tmp_path, log=lambda _: None, **args)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_torchvision_example_runs(tmp_path):
    """examples/compress_torchvision.py, as a user runs it (its smoke size)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "compress_torchvision.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke-test", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "reloaded network gives the same outputs: True" in run.stdout
    assert (tmp_path / "torchvision-example-deploy" / "model.ts").is_file()
