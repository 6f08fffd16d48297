"""Loading the compiled operator library, and the explicit switch to the reference ops.

The library is loaded once, quietly: `import edaan_fast._C` (the extension built by setup.py)
or, when ``EDAAN_FAST_LIBRARY`` names a file, that shared library (the CMake build,
``libedaan_fast_ops.so``) through ``torch.ops.load_library``. A failure is kept, not printed:
the first call of a fused op raises :class:`OpsNotAvailableError`, which says what the library
was built for, what is running, and how to rebuild.

Falling back to the pure-PyTorch reference ops (``edaan_fast/ops/reference.py``) is never
silent; it happens only when asked for, with ``EDAAN_FAST_OPS=reference`` in the environment or
:func:`use_reference_ops`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
REBUILD_COMMAND = 'pip install --no-build-isolation -e "<edaan_fast checkout>"'


class OpsNotAvailableError(RuntimeError):
    """The compiled edaan_fast operators cannot be used in this process."""


class _State:
    loaded: bool = False
    tried: bool = False
    source: str | None = None
    error: BaseException | None = None
    info: dict[str, Any] | None = None


_state = _State()
_use_reference: bool = os.environ.get("EDAAN_FAST_OPS", "").strip().lower() == "reference"


def _running() -> dict[str, Any]:
    return {"torch": torch.__version__.split("+")[0], "cuda": torch.version.cuda}


def _recorded_build_info() -> dict[str, Any] | None:
    """What setup.py wrote next to the extension (readable even when the .so does not load)."""
    try:
        return json.loads((_PACKAGE_DIR / "_build_info.json").read_text())
    except (OSError, ValueError):
        return None


def load_library() -> bool:
    """Loads the operator library once; returns whether the fused ops are usable."""
    if _state.tried:
        return _state.loaded
    _state.tried = True
    path = os.environ.get("EDAAN_FAST_LIBRARY")
    try:
        if path:
            _state.source = path
            torch.ops.load_library(path)
        else:
            _state.source = "edaan_fast._C"
            importlib.import_module("edaan_fast._C")
        _state.info = json.loads(torch.ops.edaan_fast._build_info())
        if "cuda_arch_list" not in _state.info and not path:  # built before the op recorded it
            _state.info["cuda_arch_list"] = (_recorded_build_info() or {}).get("cuda_arch_list")
    except (ImportError, OSError, RuntimeError, AttributeError, ValueError) as exc:
        _state.error = exc
        _state.info = None if path else _recorded_build_info()
        return False
    running = _running()
    if _state.info.get("torch") != running["torch"]:
        _state.error = RuntimeError(
            f"the library was built for torch {_state.info.get('torch')} but torch "
            f"{running['torch']} is running"
        )
        return False
    _state.loaded = True
    return True


def has_ops() -> bool:
    """True when the compiled fused ops are loaded and match the running torch."""
    return load_library()


def build_info() -> dict[str, Any] | None:
    """What the operator library was built against: torch, CUDA, whether CUDA kernels exist."""
    load_library()
    return _state.info


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "unknown (no build record)"
    cuda = f"CUDA {info['cuda']}" if info.get("with_cuda") else "no CUDA kernels"
    return f"torch {info.get('torch')}, {cuda}"


def require_ops(op: str) -> None:
    """Raises OpsNotAvailableError, with the build/running versions and the fix, if unusable."""
    if load_library():
        return
    running = _running()
    cuda = f"CUDA {running['cuda']}" if running["cuda"] else "CPU-only"
    raise OpsNotAvailableError(
        f"edaan_fast.{op}: the compiled operator library could not be used.\n"
        f"  loading {_state.source}: {type(_state.error).__name__}: {_state.error}\n"
        f"  built for:   {_describe(_state.info)}\n"
        f"  running:     torch {running['torch']}, {cuda}, Python {sys.version.split()[0]}\n"
        f"Rebuild it against the running torch with\n    {REBUILD_COMMAND}\n"
        f"or use the (slower) pure-PyTorch reference ops explicitly: set EDAAN_FAST_OPS=reference "
        f"or call edaan_fast.ops.set_reference_ops(True)."
    )


def _arch_serves(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST build runs on a GPU of ``capability``: a cubin of the
    same major and no newer minor, or PTX of no newer version (the driver compiles it)."""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        try:
            major, minor = (int(v) for v in entry.removesuffix("+PTX").split(".")[:2])
        except ValueError:
            return True  # a name like "Ampere": cannot tell, let CUDA decide
        if (major == capability[0] and minor <= capability[1]) or (
                ptx and (major, minor) <= capability):
            return True
    return False


def _arch_problem(op: str, info: dict[str, Any] | None, capability: tuple[int, int],
                  device_name: str) -> str | None:
    """Why the library described by ``info`` (the ``_build_info`` op's JSON) cannot run ``op``
    on a GPU of ``capability``, or None when it can (or the build did not record its arches)."""
    if info is None:
        return None
    if not info.get("with_cuda"):
        return (f"edaan_fast.{op}: got a CUDA tensor, but the library was built without CUDA "
                f"kernels ({_describe(info)}). Rebuild with a CUDA toolkit: FORCE_CUDA=1 "
                f"{REBUILD_COMMAND}")
    arch = info.get("cuda_arch_list")
    if arch and not _arch_serves(arch, capability):
        return (f"edaan_fast.{op}: the library was built for CUDA architectures {arch!r}, which "
                f"do not run on {device_name} (compute capability {capability[0]}."
                f"{capability[1]}). Rebuild with TORCH_CUDA_ARCH_LIST=\"{capability[0]}."
                f"{capability[1]}\" FORCE_CUDA=1 {REBUILD_COMMAND}")
    return None


def require_cuda_kernels(op: str, tensor: torch.Tensor) -> None:
    """A clear error for a CUDA tensor when the library was built without CUDA kernels, or
    without kernels for that tensor's GPU (instead of CUDA's "no kernel image"): the
    architectures come from the library's own ``_build_info`` op."""
    if not tensor.is_cuda or _state.info is None:
        return
    problem = _arch_problem(op, _state.info, torch.cuda.get_device_capability(tensor.device),
                            torch.cuda.get_device_name(tensor.device))
    if problem:
        raise OpsNotAvailableError(problem)


def reference_enabled() -> bool:
    """Whether the pure-PyTorch reference ops were explicitly selected."""
    return _use_reference


@contextlib.contextmanager
def use_reference_ops(enabled: bool = True) -> Iterator[None]:
    """Runs the block with the pure-PyTorch reference ops instead of the fused ones.

    For the whole process use :func:`set_reference_ops` or ``EDAAN_FAST_OPS=reference``.
    """
    global _use_reference
    previous = _use_reference
    _use_reference = enabled
    try:
        yield
    finally:
        _use_reference = previous


def set_reference_ops(enabled: bool) -> None:
    """Selects (True) or deselects (False) the pure-PyTorch reference ops for the process."""
    global _use_reference
    _use_reference = enabled
