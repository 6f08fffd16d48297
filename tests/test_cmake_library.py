"""The CMake build (libedaan_fast_ops.so) passes the op tests when loaded by torch.ops.load_library.

The library is found at $EDAAN_FAST_CMAKE_LIBRARY or build-cmake/libedaan_fast_ops.so (as
.ci/run builds it). Without it the test skips, except under CI, where it must exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OP_TEST_FILES = sorted(
    str(p.relative_to(ROOT))
    for name in ("test_mask_blend.py", "test_metric_losses.py", "test_rank_eval.py",
                 "test_reranking.py")
    if (p := ROOT / "tests" / name).exists()
)


def _library() -> Path | None:
    path = Path(os.environ.get("EDAAN_FAST_CMAKE_LIBRARY", ROOT / "build-cmake" / "libedaan_fast_ops.so"))
    return path if path.exists() else None


def test_op_tests_pass_against_cmake_library():
    lib = _library()
    if lib is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the CMake library first (see .ci/run)")
        pytest.skip("CMake library not built (cmake -S . -B build-cmake -G Ninja && cmake --build build-cmake)")
    env = {**os.environ, "EDAAN_FAST_LIBRARY": str(lib)}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import edaan_fast.ops._library as L; assert L.load_library(), L._state.error; print(L._state.source)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(lib)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OP_TEST_FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
