"""Export: a compressed model rebuilds from widths.json + model.pt alone, and as TorchScript."""

from __future__ import annotations

import json

import pytest
import torch

import casd_ray
from casd_ray.artifacts.network import (
    FILES,
    ONNX_FILE,
    is_complete,
    load_compressed,
    load_torchscript,
    save_compressed,
)
from casd_ray.errors import ArtifactError
from casd_ray.models.family import build_model, spec_for, with_group_widths


def _trained_like(spec):
    """A model with non-default weights and BN statistics (what an export really holds)."""
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move BN running stats away from their initial values
            model(torch.randn(8, spec.in_channels, *spec.image_size))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def pruned_spec():
    spec = spec_for("resnet8", in_channels=1, num_classes=10, image_size=(28, 28), width=8)
    return with_group_widths(spec, {"stage1": 11, "stage0.block0.conv1": 3, "stage2": 20})


def test_reload_reproduces_outputs_exactly(tmp_path, pruned_spec):
    model = _trained_like(pruned_spec)
    out = save_compressed(model, pruned_spec, tmp_path / "winner", {"test_acc": 0.5})
    assert is_complete(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, ONNX_FILE])
    x = torch.randn(5, 1, 28, 28)
    reloaded = load_compressed(out)
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.equal(load_compressed(out / "model.pt")(x), model(x))
    assert json.loads((out / "metrics.json").read_text()) == {"test_acc": 0.5}
    assert json.loads((out / "widths.json").read_text())["stages"] == list(pruned_spec.stages)


def test_torchscript_loads_and_reproduces_outputs(tmp_path, pruned_spec):
    model = _trained_like(pruned_spec)
    save_compressed(model, pruned_spec, tmp_path)
    scripted = load_torchscript(tmp_path)
    x = torch.randn(3, 1, 28, 28)  # a batch size other than the traced one
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-6)


def test_onnx_runs_in_onnxruntime_and_reproduces_outputs(tmp_path, pruned_spec):
    import onnxruntime

    model = _trained_like(pruned_spec)
    save_compressed(model, pruned_spec, tmp_path)
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE))
    x = torch.randn(7, 1, 28, 28)  # the batch axis is dynamic
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=0, atol=1e-5)


def test_package_level_load_compressed(tmp_path, pruned_spec):
    save_compressed(_trained_like(pruned_spec), pruned_spec, tmp_path)
    assert casd_ray.load_compressed is load_compressed
    assert casd_ray.load_compressed(tmp_path).spec == pruned_spec


def test_export_leaves_the_model_and_folder_clean(tmp_path, pruned_spec):
    model = _trained_like(pruned_spec).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_compressed(model, pruned_spec, tmp_path)
    save_compressed(model, pruned_spec, tmp_path)  # overwrite in place
    assert model.training  # the caller's model is not switched to eval
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_or_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(ArtifactError, match="widths.json: missing"):
        load_compressed(tmp_path)
    spec = spec_for("resnet8", width=4)
    save_compressed(build_model(spec), spec, tmp_path)
    (tmp_path / "model.pt").write_bytes(b"torn")
    with pytest.raises(ArtifactError, match="model.pt: not a readable state dict"):
        load_compressed(tmp_path)
    other = spec_for("resnet8", width=8)
    torch.save(build_model(other).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ArtifactError, match="does not fit the architecture in widths.json"):
        load_compressed(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exports_are_readable_by_others_as_the_umask_allows(tmp_path, pruned_spec, umask, mode):
    """Also seen: outputs were written mode 0600, unreadable by others on a shared cluster."""
    import os
    import stat

    before = os.umask(umask)
    try:
        out = save_compressed(_trained_like(pruned_spec), pruned_spec, tmp_path / "w", {})
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, mode)


def test_load_compressed_returns_the_preprocessing_and_stays_a_module(tmp_path, pruned_spec):
    """The deployable folder carries its preprocessing; load_compressed still returns the
    nn.Module it always did, with a ``preprocessing`` attribute (None for an older folder)."""
    pre = {"mean": [0.5], "std": [0.25], "shape": [1, 28, 28], "classes": list("abcdefghij")}
    model = _trained_like(pruned_spec)
    out = save_compressed(model, pruned_spec, tmp_path / "w", {}, preprocessing=pre)
    net = load_compressed(out)
    assert isinstance(net, torch.nn.Module) and net.preprocessing == pre
    (out / "preprocessing.json").unlink()
    assert load_compressed(out).preprocessing is None


def test_verify_export_refuses_what_load_compressed_would(tmp_path, pruned_spec):
    """D10: what the report tells a user to deploy is loaded and run once first."""
    from casd_ray.artifacts.network import verify_export

    out = save_compressed(_trained_like(pruned_spec), pruned_spec, tmp_path / "w", {})
    assert verify_export(out).spec == pruned_spec
    (out / "model.pt").write_bytes(b"garbled")
    with pytest.raises(ArtifactError, match="model.pt"):
        verify_export(out)
