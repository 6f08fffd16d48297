"""Shared test fixtures: devices, dtypes and the one tolerance table of the op tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch

import edaan_fast


def _cuda_missing() -> str | None:
    """Why the CUDA tests cannot run here (None: they can)."""
    if not (edaan_fast.build_info() or {}).get("with_cuda", False):
        return "the compiled library has no CUDA kernels (rebuild with FORCE_CUDA=1)"
    if not torch.cuda.is_available():
        return "no visible CUDA device"
    return None


CUDA_MISSING = _cuda_missing()
HAS_CUDA = CUDA_MISSING is None
#: EDAAN_FAST_REQUIRE_CUDA=1 (what a GPU machine's check sets): a test marked ``cuda`` that
#: cannot run fails instead of skipping, so a build without CUDA kernels or an invisible GPU
#: does not pass for a green run.
REQUIRE_CUDA = os.environ.get("EDAAN_FAST_REQUIRE_CUDA", "0") == "1"

# Every test that needs a GPU carries the ``cuda`` marker (``-m cuda`` selects them); the
# runtest hook below skips or fails them where CUDA is missing.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Tolerance of a fused op against the float64 reference, by the dtype the op runs in.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _ops_missing() -> str | None:
    """Why the compiled ops cannot be used here, with the loader's error (None: they can)."""
    if edaan_fast.has_ops():
        return None
    from edaan_fast.ops._library import _state

    return (f"the compiled ops do not load (from {_state.source}: "
            f"{type(_state.error).__name__}: {_state.error})")


OPS_MISSING = _ops_missing()
#: EDAAN_FAST_REQUIRE_OPS=1 (what CI sets): a test marked ``requires_ops`` fails instead of
#: skipping when the compiled library does not load, so a broken build cannot leave whole op
#: test modules skipped in a green run.
REQUIRE_OPS = os.environ.get("EDAAN_FAST_REQUIRE_OPS", "0") == "1"

# A test (or a module, through ``pytestmark``) that needs the compiled ops carries the
# ``requires_ops`` marker; the runtest hook below skips or fails it where they do not load.
requires_ops = pytest.mark.requires_ops
requires_cuda = pytest.mark.cuda


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_ops: needs the compiled fused ops (skipped where they do not load; "
        "fails instead under EDAAN_FAST_REQUIRE_OPS=1)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_ops") is not None and OPS_MISSING is not None:
        if REQUIRE_OPS:
            pytest.fail(f"EDAAN_FAST_REQUIRE_OPS=1 but {OPS_MISSING}", pytrace=False)
        pytest.skip(OPS_MISSING)
    if item.get_closest_marker("cuda") is not None and CUDA_MISSING is not None:
        if REQUIRE_CUDA:
            pytest.fail(f"EDAAN_FAST_REQUIRE_CUDA=1 but {CUDA_MISSING}", pytrace=False)
        pytest.skip(f"needs CUDA: {CUDA_MISSING}")


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty working directory, so nothing a user left in the
    checkout (``runs/default`` of an interrupted ``python -m edaan_fast.train``) changes a test,
    and no test writes into the checkout (checked at the end of the session, below)."""
    monkeypatch.chdir(tmp_path)


CHECKOUT = Path(__file__).resolve().parents[1]
#: What a build or a test tool may write in the checkout; everything else must stay as it was.
_BUILD_OUTPUTS = {".git", "build", "build-cmake", "dist", ".pytest_cache", ".benchmarks",
                  ".ruff_cache", "__pycache__", ".eggs"}


def _checkout_files() -> dict[str, int]:
    """``{relative path: mtime_ns}`` of the checkout's files outside build outputs."""
    found = {}
    for folder, dirs, files in os.walk(CHECKOUT):
        dirs[:] = [d for d in dirs if d not in _BUILD_OUTPUTS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".so", ".pyc")) or name == "_build_info.json":
                continue
            path = os.path.join(folder, name)
            try:
                found[os.path.relpath(path, CHECKOUT)] = os.stat(path).st_mtime_ns
            except OSError:
                pass
    return found


def _tracked_files() -> set[str]:
    """The files git tracks (edited by hand while the tests run, they are not the tests'
    doing); empty outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(CHECKOUT), "ls-files", "-z"], capture_output=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {p for p in out.decode(errors="replace").split("\0") if p}


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a test created, changed or removed a file in the checkout (a run folder,
    a cache, an output), other than edits to tracked files."""
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    after = _checkout_files()
    tracked = _tracked_files()
    changed = sorted(p for p in after if before.get(p) != after[p]
                     and not (p in before and p in tracked))
    removed = sorted(set(before) - set(after))
    if changed or removed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = ("the tests wrote into the checkout " + str(CHECKOUT) + ": "
                + ", ".join([*changed[:10], *(f"{p} (removed)" for p in removed[:10])]))
        if reporter is not None:
            reporter.write_line("ERROR: " + text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or $EDAAN_FAST_SHARED_DATA); None if absent."""
    env = os.environ.get("EDAAN_FAST_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def micro_config(tmp_path_factory):
    """A ``--config`` file of a micro run (``tests.test_trainer.MICRO_MODEL``, batch 8): one
    epoch of one iteration, evaluated only at the end."""
    import yaml

    from tests.test_trainer import MICRO_MODEL

    path = tmp_path_factory.mktemp("micro") / "micro.yaml"
    path.write_text(yaml.safe_dump({"model": MICRO_MODEL, "batch_size": 8, "epochs": 1,
                                    "iters_per_epoch": 1, "eval_every": 0, "progress": False}))
    return path


@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs each test, reproducible on failure."""
    return torch.Generator().manual_seed(1234)


@contextlib.contextmanager
def reduced_precision_float32_gemms(device):
    """Runs the block with what torch.set_float32_matmul_precision("medium") switches on:
    TF32 float32 GEMMs on CUDA, bfloat16 ones in oneDNN on a CPU. Skips where the hardware has
    no such mode, and also where a plain GEMM under the setting is as accurate as float32 (the
    setting only allows the lower precision: oneDNN does not use it on every CPU that has
    bfloat16 instructions); there the block would only compare a function with itself."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            pytest.skip("TF32 needs compute capability 8.0+: float32 GEMMs stay float32 here")
        backend, reduced = torch.backends.cuda.matmul, "tf32"
    else:
        from edaan_fast.engine.precision import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            pytest.skip("no native bfloat16 on this CPU (AVX512-BF16/AMX): oneDNN keeps float32 "
                        "GEMMs in float32, so the setting cannot change anything here")
        backend, reduced = torch.backends.mkldnn.matmul, "bf16"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(32, 512, generator=g).to(device) for _ in range(2))
    exact = a.double() @ b.double().T
    before = backend.fp32_precision
    backend.fp32_precision = reduced
    try:
        err = float(((a @ b.T).double() - exact).abs().max() / exact.abs().max())
        # float32 products summed in float32: ~3e-7 of the largest entry; TF32 (10-bit)
        # inputs: ~3e-4; bfloat16 (8-bit) inputs: ~3e-3
        if err < 3e-5:
            pytest.skip(f"fp32_precision={reduced!r} left a plain float32 GEMM in float32 "
                        f"precision here (relative error {err:.1e}): nothing to compare")
        yield
    finally:
        backend.fp32_precision = before
