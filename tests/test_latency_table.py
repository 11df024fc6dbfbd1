"""The per-layer latency table: what it times, how it interpolates, how it is fitted to whole
networks, and that it travels with the run's latency model. Devices without noise (a cost
formula per layer) stand in for measurement where a test asserts a number."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from casd_ray.config import ExperimentConfig, LatencyConfig
from casd_ray.models import latency
from casd_ray.models.family import build_model, spec_for
from casd_ray.pipeline import latency as pipeline_latency
from casd_ray.widths import latency_model as lm
from casd_ray.widths import latency_table as lt
from casd_ray.widths import space

SMALL = spec_for("resnet8", width=8)
QUICK = {"min_run_time": 0.02, "batch_size": 8}


def _device_ms(net: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Milliseconds on a device without noise whose kernels are slow on narrow inputs, as
    SIMD kernels are (a convolution of fewer than 16 input channels per group runs at
    in/16 of the speed): every conv, BN and linear layer costs a fixed call overhead plus
    its compute time. A sum of whole-network FLOPs, activations and parameters cannot tell
    where the narrow layers are; a table of layers can."""
    net = net.eval().to("meta")
    total = [0.0]

    def hook(m, inp, out):
        macs = out[0].numel() * (m.weight[0].numel() if hasattr(m, "weight") else 1)
        speed = min(1.0, m.in_channels / m.groups / 16) if isinstance(m, torch.nn.Conv2d) else 1
        total[0] += 0.01 + macs / 2e6 / speed

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.BatchNorm2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, *shape[1:], device="meta"))
    return total[0]


def _noiseless_device(monkeypatch) -> None:
    def whole(spec, dep):
        return latency.Latency(_device_ms(build_model(spec), dep.shape), 0.0, 1)

    def layer(key, build, dep):
        return latency.Latency(_device_ms(build(), dep.shape), 0.0, 1)

    smallest = space.widths_from_ratios(SMALL, dict.fromkeys(space.group_names(SMALL), 1e-12))
    ends = {"t": SMALL, "s": smallest}
    monkeypatch.setattr(lm, "measure_spec", whole)
    monkeypatch.setattr(lt, "measure_cached", layer)
    monkeypatch.setattr(
        lm,
        "measure_together",
        lambda nets, dep: {k: {"median_ms": _device_ms(build_model(ends[k]), dep.shape)}
                           for k in nets},
    )  # fmt: skip


def test_the_table_times_each_position_at_a_grid_of_whole_blocks():
    positions = lt.table_positions(SMALL, step=8, min_channels=8)
    grids = {name: (g_in, g_out) for name, _key, g_in, g_out in positions}
    assert grids["stem"] == ((3,), (8,))  # the image's channels never change
    assert grids["stages.2.0.conv2"] == ((8, 16, 24, 32), (8, 16, 24, 32))
    assert all(w % 8 == 0 for _n, _k, g_in, g_out in positions[1:] for w in g_in + g_out)
    # positions of one shape share their entries
    keys = lt.table_keys(positions)
    assert len(keys) == len(set(keys)) < sum(len(a) * len(b) for _n, _k, a, b in positions)
    wide = lt._widths(1280, 8, 8)
    assert len(wide) <= lt.MAX_POINTS and wide[0] == 8 and wide[-1] == 1280


def test_a_device_bilinear_in_the_widths_is_predicted_exactly_off_the_grid(monkeypatch):
    """Between grid points a layer's entry is bilinear in (in, out): a device whose layers
    cost a + b * in * out is predicted exactly at widths the table never timed."""

    def layer(key, build, dep):
        cin, cout, kh, kw = dep.shape[1], build()[0].out_channels, *build()[0].kernel_size
        return latency.Latency(0.05 + 1e-4 * cin * cout * kh * kw, 0.0, 1)

    monkeypatch.setattr(lt, "measure_cached", layer)
    dep = latency.Deployment("torch", (8, 3, 32, 32))
    table = lt.measure_table(SMALL, dep, step=8, min_channels=8)

    def truth(spec) -> float:
        layers = lt.conv_layers(spec.model_dump_json())
        return sum(0.05 + 1e-4 * k[0] * k[1] * k[2] * k[3] for _n, k in layers)

    for spec in lm.random_specs(SMALL, 8, seed=4, min_channels=8):  # widths off the grid
        assert table.layers_ms(spec) == pytest.approx(truth(spec), rel=1e-9)
    assert table.predict_ms(SMALL) == pytest.approx(truth(SMALL))  # unfitted: (0, 1)


def test_depthwise_convolutions_are_timed_along_one_width(monkeypatch):
    """A depthwise convolution (MobileNetV2's) has one width, in = out = groups: its grid is
    one-dimensional and a user's model pruned by Torch-Pruning keeps its positions' names."""
    mobilenet = spec_for("torchvision:mobilenet_v2")
    positions = lt.table_positions(mobilenet, step=8, min_channels=8)
    depthwise = [(k, a) for _n, k, a, _b in positions if k[10] > 1]
    assert len(depthwise) == 17 and all(k[10] == k[0] == k[1] for k, _a in depthwise)

    def cost(key: lt.Key) -> float:  # linear in the width for depthwise, bilinear otherwise
        return 0.02 + 1e-6 * key[0] * key[1] / key[10] * key[2] * key[3] * key[11] * key[12]

    entries = tuple((k, cost(k)) for k in lt.table_keys(positions))
    table = lt.LatencyTable(positions, entries)
    for spec in lm.random_specs(mobilenet, 2, seed=1, min_channels=8, divisible_by=4):
        truth = sum(cost(k) for _n, k in lt.conv_layers(spec.model_dump_json()))
        assert table.layers_ms(spec) == pytest.approx(truth, rel=1e-9)


def test_the_table_error_on_a_small_model_is_bounded_and_below_the_features_model(monkeypatch):
    """On a noiseless device the network is the sum of its layers (plus the classifier):
    the table, fitted to whole networks, predicts within 3 %, the features model not as well
    where narrow layers are slow."""
    _noiseless_device(monkeypatch)
    cfg = LatencyConfig(runtime="torch", fit_networks=12, check_networks=30, **QUICK)
    features = lm.build_latency_model(SMALL, cfg, 0.6, log=lambda _: None)
    logs: list[str] = []
    model = lm.with_table(features, SMALL, cfg, 0.6, log=logs.append)
    err = model.error
    assert err["predictor"] == "table" and err["networks"] == 30
    assert err["mape_pct"] < 3 and err["worst_pct"] < 6, err
    assert err["mape_pct"] < err["features"]["mape_pct"]
    assert model.table is not None and model.target_ratio == pytest.approx(0.6)
    assert model.ratio(SMALL) == pytest.approx(1.0)
    assert "latency table" in logs[0] and "features model there" in logs[0]


def test_a_model_with_its_table_survives_the_run_folder(monkeypatch):
    _noiseless_device(monkeypatch)
    cfg = LatencyConfig(runtime="torch", fit_networks=6, check_networks=2, **QUICK)
    model = lm.with_table(lm.build_latency_model(SMALL, cfg, 0.6, log=lambda _: None), SMALL,
                          cfg, 0.6, log=lambda _: None)  # fmt: skip
    again = lm.LatencyModel.from_dict(json.loads(json.dumps(model.as_dict())))
    assert again == model
    for spec in lm.random_specs(SMALL, 4, seed=1):
        assert again.ratio(spec) == model.ratio(spec)
    old = {k: v for k, v in model.as_dict().items() if k != "table"}  # before the field
    assert lm.LatencyModel.from_dict(old).table is None


def test_a_run_predicts_with_a_table_timed_on_the_device(tmp_path):
    """The default predictor: a real run measures the table on its runtime (here eager torch)
    and its latency file keeps it; ``predictor: features`` keeps the fit alone."""
    budget = {"metric": "latency", "target": 0.9, "latency": {
        "runtime": "torch", "fit_networks": 4, "check_networks": 4, "calibrate_networks": 0,
        **QUICK}}  # fmt: skip
    # in whole blocks of 8: a grid of 42 convolutions (82 of any width: ~30 s on a busy CPU)
    cfg = ExperimentConfig(output_dir=str(tmp_path), space={"budget": budget, "divisible_by": 8})
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    model = pipeline_latency.with_latency(cfg, rules, SMALL, lambda _: None).latency
    assert model.table is not None and model.error["predictor"] == "table"
    assert len(model.table.entries) == 42 and model.error["step"] == 8
    assert all(ms > 0 for _k, ms in model.table.entries)
    assert np.isfinite(model.error["mape_pct"]) and np.isfinite(model.error["features"]["mape_pct"])
    budget["latency"]["predictor"] = "features"
    cfg = ExperimentConfig(
        output_dir=str(tmp_path / "f"), space={"budget": budget, "divisible_by": 8}
    )
    assert pipeline_latency.with_latency(cfg, rules, SMALL, lambda _: None).latency.table is None
