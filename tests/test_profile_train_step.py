"""The training-step profile (benchmarks/profile_train_step.py): its attribution adds up, the
FLOP count matches an independent count, and bad input gets one line and status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._step import make_step
from benchmarks.profile_train_step import GROUPS, KINDS, classify, profile_one, step_flops
from edaan_fast.engine.execution import ExecutionOptions

pytestmark = pytest.mark.requires_ops


def test_classify_names_the_kinds():
    assert classify("aten::mkldnn_convolution") == "convolution/matmul"
    assert classify("aten::convolution_backward") == "convolution/matmul"
    assert classify("aten::addmm") == "convolution/matmul"
    assert classify("aten::native_batch_norm_backward") == "normalisation"
    assert classify("aten::reflection_pad2d_backward") == "data movement"
    assert classify("aten::_to_copy") == "data movement"
    assert classify("aten::cat") == "data movement"
    assert classify("aten::threshold_backward") == "elementwise/reduction"
    assert classify("aten::sigmoid") == "elementwise/reduction"
    assert classify("edaan_fast::mask_blend") == "elementwise/reduction"
    assert classify("autograd::engine::evaluate_function: ConvolutionBackward0") is None
    assert classify("net::G") is None


@pytest.fixture(scope="module")
def profile_row():
    torch.manual_seed(0)
    return profile_one("tiny", 8, "cpu", "fp32", steps=1, options=ExecutionOptions(),
                       gemm_size=512)


def test_profile_attribution_adds_up(profile_row):
    row = profile_row
    wall = row["profiled_step_ms"]
    nets = {g: sum(row["networks_ms"][g].values()) for g in GROUPS}
    named = sum(v for g, v in nets.items() if g != "rest")
    # the networks' forward + backward ranges never overlap: together within the step
    assert named <= 1.01 * wall, (named, wall)
    for g in ("A", "E", "G", "D"):
        assert row["networks_ms"][g]["forward"] > 0 and row["networks_ms"][g]["backward"] > 0, g
    # the op kinds (exclusive times) plus the host overhead are the step
    assert sum(row["kinds_ms"][k] for k in KINDS) == pytest.approx(wall, rel=0.01)
    # a float32 step of these networks is convolution bound: the largest kind by far
    conv = row["kinds_ms"]["convolution/matmul"]
    assert conv > 0.4 * wall and conv == max(row["kinds_ms"].values()), row["kinds_ms"]
    assert 0 < row["fraction_of_peak"] < 1, row


def test_step_flops_match_an_independent_count():
    """D's forward FLOPs equal six separate forwards (two in the generator step, four in the
    discriminator step); the whole step is forward + backward: between 2x and 3x forward."""
    setup = make_step("tiny", 8, "cpu", "fp32")
    total, forward = step_flops(setup)
    x = torch.rand(8, 3, 64, 32)
    with FlopCounterMode(display=False) as counter:
        setup.model.discriminator_S(x)
    assert forward["D"] == 6 * counter.get_total_flops()
    assert 2.0 * sum(forward.values()) < total < 3.0 * sum(forward.values())


def test_bad_precision_is_one_line_and_status_2():
    done = subprocess.run([sys.executable, "-m", "benchmarks.profile_train_step",
                           "--precision", "fp8"], check=False, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("profile_train_step")]
    assert len(lines) == 1 and "fp8" in lines[0], done.stderr


def test_gpu_grid_rehearses_on_the_cpu_and_refuses_a_missing_gpu():
    """The GPU throughput grid's code paths on the CPU (one fixed batch and the trainer's
    loader), its table, and one line with status 2 where no GPU is visible."""
    from benchmarks.gpu_throughput import grid, markdown, measure_row

    rows = [measure_row("tiny", 8, "fp32", False, source, "cpu", steps=1, warmup=1)
            for source in ("memory", "torch")]
    for row in rows:
        assert row["images_per_s"] > 0 and row["tflop_per_step"] > 0, row
        row.update(peak_tflops=1.0, fraction_of_peak=row["achieved_tflops"])
    table = markdown([*rows, {"precision": "bf16", "compile": True, "input": "dali",
                              "skipped": "budget spent"}])
    assert table.count("\n") == 4 and "not run: budget spent" in table
    order = grid(["fp32", "bf16"], [False, True], ["memory", "torch"])
    assert [c for _, c, _ in order] == [False] * 4 + [True] * 4  # eager rows first
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput"], check=False,
                              capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1] == (
            "gpu_throughput: error: no CUDA device is visible"), done.stderr
