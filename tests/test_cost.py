"""Measured cost: FlopCounterMode FLOPs match the analytic count; latency is a median per batch."""

from __future__ import annotations

import torch

from casd_ray.models.cost import cpu_latency, measure_flops
from casd_ray.models.family import build_model, flops, spec_for, with_group_widths


def test_measured_flops_match_analytic_for_a_pruned_net():
    spec = spec_for("resnet8", in_channels=3, num_classes=7, image_size=(20, 24), width=6)
    spec = with_group_widths(spec, {"stage1": 5, "stage2.block0.conv1": 9})
    model = build_model(spec).train()
    assert measure_flops(model, (3, 20, 24)) == flops(spec)
    assert model.training  # mode restored


def test_cpu_latency_reports_medians_and_restores_threads():
    model = build_model(spec_for("resnet8", in_channels=1, image_size=(16, 16), width=4))
    threads = torch.get_num_threads()
    lat = cpu_latency(model, (1, 16, 16), batch_sizes=(1, 4), repeats=5, threads=1)
    assert torch.get_num_threads() == threads
    assert lat["threads"] == 1
    assert set(lat["batch_ms"]) == {"1", "4"} and lat["runs"] == {"1": 5, "4": 5}
    assert all(v > 0 for v in lat["batch_ms"].values())
    assert abs(lat["per_image_ms"]["4"] - lat["batch_ms"]["4"] / 4) < 1e-3
