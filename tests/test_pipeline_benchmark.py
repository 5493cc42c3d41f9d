"""The pipeline efficiency benchmark runs end to end (a smoke test: one tiny case per schedule
kind that splits or interleaves), and its synthetic sleep stage costs what it says."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.pipeline_efficiency import SleepLayer, main


def test_sleep_layer_costs_its_forward_input_and_weight_gradient_apart():
    layer = SleepLayer(4, 0.02, 0.03, 0.05)
    x = torch.ones(2, 4, requires_grad=True)
    out = layer(x)  # autograd.grad's first call sets itself up (a third of a second): not a pass's cost
    torch.autograd.grad(out, [x], torch.ones_like(out))
    began = time.perf_counter()
    out = layer(x)
    forward = time.perf_counter() - began
    began = time.perf_counter()
    torch.autograd.grad(out, [x], torch.ones_like(out), retain_graph=True)
    input_grad = time.perf_counter() - began
    began = time.perf_counter()
    torch.autograd.backward(out, torch.ones_like(out), inputs=[layer.weight])
    weight_grad = time.perf_counter() - began
    # Each pass sleeps its own time and not the other's (0.03 + 0.05 for the input gradient would
    # mean the weight branch ran too).
    assert 0.02 <= forward < 0.04 and 0.03 <= input_grad < 0.07 and 0.05 <= weight_grad < 0.07


@pytest.mark.timeout(120)
def test_benchmark_measures_each_schedule_near_its_bound(capsys):
    results = main(["--stages", "2", "--micro-batches", "2", "--schedules", "zb-h1", "interleaved-1f1b",
                    "--op-ms", "10", "--steps", "1"])
    assert set(results) == {("zb-h1", 2, 2), ("interleaved-1f1b", 2, 2)}
    for figures in results.values():
        assert 0 < figures["efficiency"] <= 1.05 * figures["bound"] and figures["ratio"] > 0.5
    assert "ratio" in capsys.readouterr().out
