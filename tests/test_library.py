"""The operator library loader: build record, loud failures, explicit reference switch."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import edaan_fast
from tests.conftest import requires_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


@requires_ops
def test_build_info_names_torch_and_cuda():
    info = edaan_fast.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    assert (info["cuda"] is None) == (not info["with_cuda"])
    assert edaan_fast.has_ops() is True


def test_missing_library_raises_at_first_use_with_versions_and_fix():
    proc = _run(
        """
        import torch
        import edaan_fast, edaan_fast.ops as ops   # importing must not raise or print
        assert edaan_fast.has_ops() is False
        try:
            ops.mask_blend(torch.rand(1, 3, 2, 2), torch.rand(1, 3, 2, 2), torch.rand(1, 1, 2, 2))
        except ops.OpsNotAvailableError as e:
            print(e)
        else:
            raise SystemExit("no error")
        """,
        EDAAN_FAST_LIBRARY="/nonexistent/libedaan_fast_ops.so",
    )
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout
    assert "edaan_fast.mask_blend: the compiled operator library could not be used" in msg
    assert "/nonexistent/libedaan_fast_ops.so" in msg
    assert f"running:     torch {torch.__version__.split('+')[0]}" in msg
    assert "pip install --no-build-isolation -e" in msg
    assert "EDAAN_FAST_OPS=reference" in msg


@requires_ops
def test_mismatched_torch_raises_naming_both_versions():
    proc = _run(
        """
        import torch
        torch.__version__ = "9.9.9"          # pretend another torch is running
        import edaan_fast.ops as ops
        try:
            ops.mask_background(torch.rand(1, 3, 2, 2), torch.rand(1, 1, 2, 2))
        except ops.OpsNotAvailableError as e:
            print(e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "built for torch 2." in proc.stdout and "but torch 9.9.9 is running" in proc.stdout
    assert "running:     torch 9.9.9" in proc.stdout


def test_reference_switch_is_explicit_and_works_without_library():
    proc = _run(
        """
        import torch
        import edaan_fast.ops as ops
        from edaan_fast.ops import reference
        fg, bg, m = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.rand(2, 1, 4, 4)
        assert torch.equal(ops.mask_blend(fg, bg, m), reference.mask_blend(fg, bg, m))
        print("ok")
        """,
        EDAAN_FAST_LIBRARY="/nonexistent/libedaan_fast_ops.so",
        EDAAN_FAST_OPS="reference",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@requires_ops
def test_reference_context_manager_routes_to_reference(monkeypatch):
    from edaan_fast import ops
    from edaan_fast.ops import reference

    calls = []
    monkeypatch.setattr(reference, "mask_background", lambda x, m: calls.append(1) or (1 - m) * x)
    x, m = torch.rand(1, 3, 2, 2), torch.rand(1, 1, 2, 2)
    ops.mask_background(x, m)
    assert calls == []
    with ops.use_reference_ops():
        ops.mask_background(x, m)
    assert calls == [1]
    ops.mask_background(x, m)
    assert calls == [1]


def test_import_is_quiet_and_light():
    proc = _run(
        """
        import sys
        import edaan_fast.ops
        heavy = [m for m in ("matplotlib", "nvidia.dali", "edaan_fast.engine", "edaan_fast.models")
                 if m in sys.modules]
        print(heavy)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert proc.stderr == ""


def test_malloc_thresholds_are_pinned_only_when_asked():
    code = (
        "import sys, edaan_fast, edaan_fast.ops\n"
        "assert 'edaan_fast._allocator' not in sys.modules, 'importing the package pinned malloc'\n"
        "from edaan_fast._allocator import pin_malloc_thresholds\n"
        "print(pin_malloc_thresholds()); print(pin_malloc_thresholds())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first == second  # idempotent
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first.startswith("glibc trim/mmap thresholds pinned at 1024 MiB"), first
    env = dict(os.environ, EDAAN_FAST_GLIBC_DEFAULTS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.startswith("glibc defaults (EDAAN_FAST_GLIBC_DEFAULTS=1)")
