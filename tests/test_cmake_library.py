"""The CMake build (libedaan_fast_ops.so) passes the op tests when loaded by torch.ops.load_library,
and a C++ program linked against it and libtorch calls the ops through the dispatcher.

The library is found at $EDAAN_FAST_CMAKE_LIBRARY or build-cmake/libedaan_fast_ops.so (as
.ci/run builds it). Without it the tests skip, except under CI, where it must exist.
"""

from __future__ import annotations

import os
import shutil
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


def _library_or_skip() -> Path:
    lib = _library()
    if lib is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the CMake library first (see .ci/run)")
        pytest.skip("CMake library not built (cmake -S . -B build-cmake -G Ninja && cmake --build build-cmake)")
    return lib


def test_op_tests_pass_against_cmake_library():
    lib = _library_or_skip()
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


def _run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"


def test_cpp_program_calls_ops_through_the_dispatcher():
    """tests/cpp/call_ops.cpp: mask_blend and quartet_loss (forward and backward) found with
    c10::Dispatcher::findSchemaOrThrow and checked against values worked out by hand. The
    program is a target of the library's own CMake build (-DEDAAN_FAST_BUILD_TESTS=ON, as
    .ci/run configures it); it is brought up to date here (a no-op when it is), and the build
    folder is reconfigured with the option where it was configured without it."""
    lib = _library_or_skip()
    build = lib.parent
    cmake = shutil.which("cmake")
    if cmake is None or not (build / "CMakeCache.txt").is_file():
        why = ("cmake is not installed" if cmake is None
               else f"{lib} does not sit in its CMake build folder")
        if os.environ.get("CI"):
            pytest.fail(f"CI must build and run tests/cpp/call_ops.cpp, but {why}")
        pytest.skip(why)
    cache = (build / "CMakeCache.txt").read_text()
    if "EDAAN_FAST_BUILD_TESTS:BOOL=ON" not in cache:
        _run([cmake, "-S", str(ROOT), "-B", str(build), "-DEDAAN_FAST_BUILD_TESTS=ON"], 600)
    _run([cmake, "--build", str(build), "--target", "edaan_fast_call_ops"], 1200)
    program = build / "tests" / "cpp" / "edaan_fast_call_ops"
    proc = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok   ") == 6 and "all checks passed" in proc.stdout, proc.stdout


def test_require_ops_turns_op_skips_into_failures(tmp_path):
    """A library that does not load skips the op tests, or fails them under
    EDAAN_FAST_REQUIRE_OPS=1 (what CI sets), naming the loader's error."""
    test = "tests/test_mask_blend.py::test_torch_compile_inductor"
    env = {k: v for k, v in os.environ.items() if k != "EDAAN_FAST_REQUIRE_OPS"}
    env["EDAAN_FAST_LIBRARY"] = str(tmp_path / "missing" / "libedaan_fast_ops.so")
    cmd = [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider", "-rs"]
    skipped = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    failed = subprocess.run(cmd, cwd=ROOT, env={**env, "EDAAN_FAST_REQUIRE_OPS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "EDAAN_FAST_REQUIRE_OPS=1 but the compiled ops do not load" in failed.stdout
    assert "libedaan_fast_ops.so" in failed.stdout  # the loader's error, with the path
