"""The one precision resolver: which autocast dtype a run or a step computes in (and the
device a command runs on, :func:`device_of`).

Every place that picks an autocast dtype asks this module: the trainer, the training steps
(and so the train-step benchmark), feature extraction (``evaluate --amp``,
``FeatureExtractor``) and translation (``translate --amp``).

``amp`` off -> float32 (``None``). A forced ``"bfloat16"`` / ``"float16"`` (or the torch dtype)
is taken as given. ``"auto"`` (or ``None``) picks:

- on CUDA, bfloat16 where the GPU runs it natively (compute capability 8.0 and newer: Ampere,
  Hopper, Blackwell; no loss scaling needed), else float16 with a grad scaler per optimiser
  (``torch.cuda.is_bf16_supported()`` answers True on Turing, where bfloat16 is emulated);
- on a CPU with native bfloat16 (AVX512-BF16 / AMX), bfloat16: measured faster than float32 on
  a 2-core AVX512-BF16 Xeon for both presets (a training step 1.39x for ``tiny``, 2.63x for
  ``paper``, ``benchmarks/cpu_precision.py``), and no measured loss of accuracy over four
  seeds of the default run (benchmarks/RESULTS.md);
- on other CPUs, with ``cpu_fallback`` (what the trainer, evaluation and translation ask for),
  float32 with a warning: PyTorch runs bfloat16 convolutions there through a slow reference
  path (about 10x slower than float32 on a 2-core AVX2 machine).
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["PRECISION_NAMES", "cpu_has_native_bf16", "cuda_has_native_bf16", "device_of",
           "resolve_precision"]

#: How reports and logs name a resolved precision.
PRECISION_NAMES = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

_FORCED = {"bfloat16": torch.bfloat16, "float16": torch.float16,
           torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def cuda_has_native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether the CUDA ``device`` (default: the current one) computes bfloat16 natively:
    compute capability >= 8.0 (``torch.cuda.is_bf16_supported()`` also counts emulation)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def resolve_precision(amp: bool, amp_dtype: str | torch.dtype | None,
                      device: str | torch.device, *,
                      cpu_fallback: bool = False) -> torch.dtype | None:
    """The autocast dtype (``None`` = float32) on ``device`` (a device or its type name, e.g.
    ``"cuda"`` for the current GPU); see the module docstring.

    Raises:
        ValueError: ``amp_dtype`` is neither ``"auto"``/``None`` nor a 16-bit float type.
    """
    if not amp:
        return None
    if amp_dtype not in (None, "auto"):
        try:
            return _FORCED[amp_dtype]
        except (KeyError, TypeError):
            raise ValueError(f"amp_dtype must be torch.float16 or torch.bfloat16, got "
                             f"{amp_dtype}") from None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if cpu_fallback and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_float32_fallback(torch.backends.cpu.get_cpu_capability())
        return None
    return torch.bfloat16


@functools.lru_cache(maxsize=None)
def _warn_float32_fallback(capability: str) -> None:
    """Said once per process (feature extraction asks per batch)."""
    logger.warning(
        "--amp: this CPU (%s) has no native bfloat16, so autocast would run the convolutions "
        "through PyTorch's slow reference kernels (about 10x slower than float32 here); "
        "running in float32. Force it with --amp-dtype bfloat16.", capability)


def device_of(device: str | torch.device | None, flag: str = "device",
              error: type[Exception] = ValueError) -> torch.device:
    """``device`` as a torch device (default: CUDA when present); ``error`` (naming ``flag``)
    for a name that is no device, or CUDA where there is none."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise error(f"{flag} {str(device)!r} is not a device (expected cpu, cuda or "
                         "cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{flag} {device}: CUDA is not available (torch {torch.__version__}); "
                         "use cpu")
    return dev
