"""The teacher stage: train once, reuse, resume after an interruption, load a checkpoint."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ensure_teacher, tiny_config, write_fake_fashion_mnist

from casd_ray.artifacts.network import load_network, numpy_to_state, state_to_numpy
from casd_ray.data.load import load_dataset
from casd_ray.errors import ArtifactError, ConfigError, StageMismatch
from casd_ray.models.family import flops
from casd_ray.pipeline.plan import fingerprints
from casd_ray.pipeline.run import execute
from casd_ray.pipeline.stages.teacher import make_teacher, teacher_spec

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


# The pipeline's teacher stage with one intra-op thread (conftest.ensure_teacher): the suite
# shares two cores with other processes, where a second thread mostly spins waiting.
def ensure(cfg, log=lambda _: None):
    return ensure_teacher(cfg, log=log, num_threads=1)


def _execute(cfg, **kw) -> None:
    """``pipeline.execute(cfg, ["teacher"], ...)`` on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        execute(cfg, ["teacher"], **kw)
    finally:
        torch.set_num_threads(threads)


def _logs(cfg) -> list[str]:
    out: list[str] = []
    ensure(cfg, log=out.append)
    return out


def _stage_status(cfg) -> str:
    return json.loads((cfg.run_dir / "stages.json").read_text())["teacher"]["status"]


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
    assert json.loads((folder / "settings.json").read_text()) == fingerprints(cfg)["teacher"]
    assert _stage_status(cfg) == "done"
    assert not art.model.training

    mtime = (folder / "model.pt").stat().st_mtime_ns
    again: list[str] = []
    art2 = ensure(cfg, log=again.append)
    assert not any(m.startswith("teacher epoch") for m in again)
    assert any(m.startswith("stage 1/1 teacher: reusing") for m in again)
    assert (folder / "model.pt").stat().st_mtime_ns == mtime
    assert art2.metrics == metrics
    x = _images(cfg)
    with torch.no_grad():
        assert torch.allclose(art.model(x), art2.model(x), atol=1e-6)

    # changed later stages reuse the teacher
    later = cfg.model_copy(update={"search": cfg.search.model_copy(update={"num_samples": 99})})
    assert any("reusing" in m for m in _logs(later))
    # changed teacher settings are refused (one line naming the key), and nothing is touched
    changed = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"lr": 0.01})})
    refused: list[str] = []
    with pytest.raises(StageMismatch, match=r"teacher\.lr: 0\.1 -> 0\.01") as err:
        ensure(changed, log=refused.append)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    assert "--fresh teacher" in str(err.value)
    assert not any(m.startswith("teacher epoch") for m in refused)
    assert (folder / "model.pt").stat().st_mtime_ns == mtime
    assert json.loads((folder / "metrics.json").read_text()) == metrics

    # --fresh teacher: the old teacher moves under previous/<time>/, a new one is trained
    fresh: list[str] = []
    _execute(changed, fresh="teacher", log=fresh.append)
    assert sum(m.startswith("teacher epoch") for m in fresh) == 2
    (old,) = (cfg.run_dir / "previous").glob("*/teacher")
    assert (old / "model.pt").stat().st_mtime_ns == mtime
    assert json.loads((old / "metrics.json").read_text()) == metrics
    assert json.loads((folder / "settings.json").read_text()) == fingerprints(changed)["teacher"]
    assert any("reusing" in m for m in _logs(changed))  # the new teacher is now the reused one


def test_num_threads_applies_to_the_call_only(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root, epochs=1)
    data = load_dataset(cfg.data, cfg.seed)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # differs from the call's 1, so a leak would show
    seen: list[int] = []
    try:
        make_teacher(
            data,
            cfg.model,
            cfg.teacher,
            cfg.seed,
            tmp_path / "teacher",
            settings=fingerprints(cfg)["teacher"],
            log=lambda _: seen.append(torch.get_num_threads()),
            num_threads=1,
        )
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_interrupted_run_resumes_from_last_epoch(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root, epochs=3)

    def stop_after_first_epoch(msg: str) -> None:
        if msg.startswith("teacher epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ensure(cfg, log=stop_after_first_epoch)
    folder = cfg.run_dir / "teacher"
    assert (folder / "last.pt").is_file()
    assert not (folder / "settings.json").exists()  # not finished: nothing claims to be reusable
    assert _stage_status(cfg) == "running"

    logs: list[str] = []
    resumed = ensure(cfg, log=logs.append)
    assert any("resuming" in m and "epoch 1/3" in m for m in logs)
    assert [m.split(":")[0] for m in logs if m.startswith("teacher epoch")] == [
        "teacher epoch 2/3",
        "teacher epoch 3/3",
    ]
    assert _stage_status(cfg) == "done"

    # the resumed teacher equals one trained without interruption (same seeded batches)
    straight = ensure(cfg.model_copy(update={"name": "straight"}))
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-5), k


def test_resume_file_from_other_settings_or_corrupt_is_ignored(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root, epochs=2)

    def stop(msg: str) -> None:
        if msg.startswith("teacher epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ensure(cfg, log=stop)
    folder = cfg.run_dir / "teacher"
    assert (folder / "last.pt").is_file()

    # through the pipeline, other settings are refused before last.pt is touched
    other = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"lr": 0.02})})
    with pytest.raises(StageMismatch, match=r"teacher\.lr"):
        ensure(other)
    assert (folder / "last.pt").is_file()

    # the stage itself never continues a last.pt made with other settings
    data = load_dataset(other.data, other.seed)

    def stage(settings: dict) -> list[str]:
        out: list[str] = []
        make_teacher(
            data,
            other.model,
            other.teacher,
            other.seed,
            folder,
            settings=settings,
            log=out.append,
            num_threads=1,
        )
        return out

    logs = stage(fingerprints(other)["teacher"])
    assert any("ignoring" in m for m in logs)
    assert not any("resuming" in m for m in logs)
    assert sum(m.startswith("teacher epoch") for m in logs) == 2

    # a corrupt last.pt (a torn write) is ignored with a log line: training starts over
    folder.joinpath("last.pt").write_bytes(b"not a checkpoint")
    logs = stage(fingerprints(other)["teacher"])
    assert any("ignoring" in m and "last.pt" in m for m in logs)
    assert sum(m.startswith("teacher epoch") for m in logs) == 2
    assert not (folder / "last.pt").exists()


def test_checkpoint_folder_and_state_dict_file_load(tmp_path, data_root):
    src = ensure(_cfg(tmp_path, data_root, name="src"))
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
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        ensure(missing)
    assert not missing.run_dir.exists()  # refused before anything is written
    src = ensure(_cfg(tmp_path, data_root, name="src", epochs=1))
    spec = src.spec.model_copy(update={"num_classes": 3})
    other = tmp_path / "three_classes"
    other.mkdir()
    spec.save(other / "widths.json")
    from casd_ray.models.family import build_model

    torch.save(build_model(spec).state_dict(), other / "model.pt")
    wrong = _cfg(tmp_path, data_root, name="w", checkpoint=str(other))
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        ensure(wrong)
    # any bad file is a ConfigError naming the field, never a torch/pickle traceback
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    bad = _cfg(tmp_path, data_root, name="g", checkpoint=str(garbage))
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        ensure(bad)


def test_teacher_spec_fits_the_data(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root)
    data = load_dataset(cfg.data, cfg.seed)
    spec = teacher_spec(cfg.model, data)
    assert (spec.in_channels, spec.num_classes, tuple(spec.image_size)) == (
        data.in_channels,
        data.num_classes,
        tuple(data.image_size),
    )


def test_load_network_and_numpy_state_round_trip(tmp_path, data_root):
    art = ensure(_cfg(tmp_path, data_root, epochs=1))
    net = load_network(art.path)
    model, spec = net.model, net.spec
    assert spec == art.spec and net.path == art.path and net.metrics == art.metrics
    assert not model.training
    assert load_network(art.path / "model.pt").spec == spec
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
    clone = load_network(art.path).model
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    clone.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(clone(x), art.model(x), atol=1e-6)

    with pytest.raises(ArtifactError, match="widths.json"):
        load_network(tmp_path)
    torn = tmp_path / "torn"
    shutil.copytree(art.path, torn)
    (torn / "model.pt").write_bytes(b"torn")
    with pytest.raises(ArtifactError, match="model.pt"):
        load_network(torn)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, data_root):
    """D4: a teacher.checkpoint with widths.json beside it silently overrode model.arch."""
    src = ensure(_cfg(tmp_path, data_root, name="src4", epochs=1))
    for model in ({"arch": "resnet8", "width": 8}, {"arch": "resnet14", "width": 4}):
        cfg = _cfg(tmp_path, data_root, name="other", checkpoint=str(src.path))
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=model)})
        with pytest.raises(ConfigError, match=r"^teacher.checkpoint: .*model.arch"):
            ensure(cfg)
        assert not cfg.run_dir.exists()  # refused before anything is written
