"""The teacher stage: train once, reuse, resume after an interruption, load a checkpoint."""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_fake_fashion_mnist

from casd_ray.config import ConfigError
from casd_ray.data import load_dataset
from casd_ray.models import flops
from casd_ray.teacher import (
    ensure_teacher,
    load_teacher,
    numpy_to_state,
    state_to_numpy,
)

# One intra-op thread: the suite shares two cores with other processes, where a second
# thread mostly spins waiting for the first.
ensure = partial(ensure_teacher, num_threads=1)
FILES = {"model.pt", "widths.json", "data.json", "metrics.json", "settings.json"}


class Interrupt(Exception):
    """Raised from the log callable to stop training like a Ctrl-C would."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n=160, n_test=40)


def _cfg(tmp_path: Path, data_root: Path, name: str = "tiny", **teacher):
    cfg = tiny_config(tmp_path / "runs", data_root, teacher={"epochs": 2, **teacher})
    return cfg.model_copy(update={"name": name})


def _images(cfg) -> torch.Tensor:
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_trains_writes_every_file_then_reuses(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root)
    logs: list[str] = []
    art = ensure(cfg, log=logs.append)
    folder = cfg.run_dir / "teacher"
    assert art.path == folder
    assert {p.name for p in folder.iterdir()} >= FILES
    assert not (folder / "last.pt").exists()  # the finished teacher supersedes the resume file
    assert not list(folder.glob("*.tmp"))
    epoch_lines = [m for m in logs if m.startswith("teacher epoch")]
    assert len(epoch_lines) == 2
    assert all(k in epoch_lines[0] for k in ("loss", "acc", "img/s", "ETA"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) >= {"val_acc", "test_acc", "val_loss", "epochs", "seconds", "flops"}
    assert metrics["epochs"] == 2 and metrics["flops"] == flops(art.spec)
    assert 0 <= metrics["test_acc"] <= 1
    assert json.loads((folder / "data.json").read_text())["sizes"]["test"] == 40
    assert not art.model.training

    mtime = (folder / "model.pt").stat().st_mtime_ns
    again: list[str] = []
    art2 = ensure(cfg, log=again.append)
    assert not any(m.startswith("teacher epoch") for m in again)
    assert any("reusing" in m for m in again)
    assert (folder / "model.pt").stat().st_mtime_ns == mtime
    assert art2.metrics == metrics
    x = _images(cfg)
    with torch.no_grad():
        assert torch.allclose(art.model(x), art2.model(x), atol=1e-6)

    # changed teacher settings retrain; changed later stages do not
    later = cfg.model_copy(update={"search": cfg.search.model_copy(update={"num_samples": 99})})
    assert any("reusing" in m for m in _logs(later))
    changed = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"lr": 0.01})})
    assert sum(m.startswith("teacher epoch") for m in _logs(changed)) == 2


def test_num_threads_applies_to_the_call_only(tmp_path, data_root):
    before = torch.get_num_threads()
    seen = []
    ensure_teacher(
        _cfg(tmp_path, data_root, epochs=1),
        log=lambda _: seen.append(torch.get_num_threads()),
        num_threads=1,
    )
    assert seen[-1] == 1
    assert torch.get_num_threads() == before


def _logs(cfg) -> list[str]:
    out: list[str] = []
    ensure(cfg, log=out.append)
    return out


def test_interrupted_run_resumes_from_last_epoch(tmp_path, data_root):
    data = load_dataset(_cfg(tmp_path, data_root).data, 0)
    cfg = _cfg(tmp_path, data_root, epochs=3)

    def stop_after_first_epoch(msg: str) -> None:
        if msg.startswith("teacher epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ensure(cfg, data, log=stop_after_first_epoch)
    folder = cfg.run_dir / "teacher"
    assert (folder / "last.pt").is_file()
    assert not (folder / "settings.json").exists()  # not finished: nothing claims to be reusable

    logs: list[str] = []
    resumed = ensure(cfg, data, log=logs.append)
    assert any("resuming" in m and "epoch 1/3" in m for m in logs)
    assert [m.split(":")[0] for m in logs if m.startswith("teacher epoch")] == [
        "teacher epoch 2/3",
        "teacher epoch 3/3",
    ]

    # the resumed teacher equals one trained without interruption (same seeded batches)
    straight = ensure(cfg.model_copy(update={"name": "straight"}), data, log=lambda _: None)
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-5), k


def test_resume_file_from_other_settings_is_ignored(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root, epochs=2)

    def stop(msg: str) -> None:
        if msg.startswith("teacher epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ensure(cfg, log=stop)
    other = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"lr": 0.02})})
    logs = _logs(other)
    assert any("ignoring" in m for m in logs)
    assert sum(m.startswith("teacher epoch") for m in logs) == 2


def test_checkpoint_folder_and_state_dict_file_load(tmp_path, data_root):
    src = ensure(_cfg(tmp_path, data_root, name="src"), log=lambda _: None)
    x = _images(None)
    with torch.no_grad():
        expected = src.model(x)

    for name, ckpt in (("from_dir", src.path), ("from_file", tmp_path / "bare.pt")):
        if name == "from_file":
            torch.save(src.model.state_dict(), ckpt)  # a bare state dict, no widths.json beside
        cfg = _cfg(tmp_path, data_root, name=name, checkpoint=str(ckpt))
        logs: list[str] = []
        art = ensure(cfg, log=logs.append)
        assert not any(m.startswith("teacher epoch") for m in logs)
        assert {p.name for p in art.path.iterdir()} >= FILES
        assert art.metrics["test_acc"] == pytest.approx(src.metrics["test_acc"])
        with torch.no_grad():
            assert torch.allclose(art.model(x), expected, atol=1e-6)


def test_checkpoint_errors_name_the_field(tmp_path, data_root):
    missing = _cfg(tmp_path, data_root, name="m", checkpoint=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="teacher.checkpoint"):
        ensure(missing, log=lambda _: None)
    src = ensure(_cfg(tmp_path, data_root, name="src", epochs=1), log=lambda _: None)
    spec = src.spec.model_copy(update={"num_classes": 3})
    other = tmp_path / "three_classes"
    other.mkdir()
    spec.save(other / "widths.json")
    from casd_ray.models import build_model

    torch.save(build_model(spec).state_dict(), other / "model.pt")
    wrong = _cfg(tmp_path, data_root, name="w", checkpoint=str(other))
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        ensure(wrong, log=lambda _: None)


def test_load_teacher_and_numpy_state_round_trip(tmp_path, data_root):
    art = ensure(_cfg(tmp_path, data_root, epochs=1), log=lambda _: None)
    model, spec = load_teacher(art.path)
    assert spec == art.spec
    assert load_teacher(art.path / "model.pt")[1] == spec
    x = _images(None)
    with torch.no_grad():
        assert torch.allclose(model(x), art.model(x), atol=1e-6)

    arrays = state_to_numpy(art.model.state_dict())
    assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays.values())
    for a in arrays.values():
        a.flags.writeable = False  # as the Ray object store hands them out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = numpy_to_state(arrays)
    clone, _ = load_teacher(art.path)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    clone.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(clone(x), art.model(x), atol=1e-6)

    with pytest.raises(FileNotFoundError, match="widths.json"):
        load_teacher(tmp_path)
