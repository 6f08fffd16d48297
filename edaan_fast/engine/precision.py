"""The one precision resolver: which autocast dtype a run or a step computes in.

``amp`` off -> float32 (``None``). A forced ``"bfloat16"`` / ``"float16"`` (or the torch dtype)
is taken as given. ``"auto"`` (or ``None``) picks bfloat16 on CUDA devices that support it (no
loss scaling needed), float16 with a grad scaler per optimiser on older GPUs, and bfloat16 on
CPUs. With ``cpu_fallback`` (what a training run asks for), a CPU without native bfloat16
(AVX512-BF16/AMX) trains in float32 instead: PyTorch runs bfloat16 convolutions there through a
slow reference path (measured about 10x slower than float32 on the 2-core AVX2 machine), so
AMP would only slow training down; a warning says so.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["PRECISION_NAMES", "cpu_has_native_bf16", "resolve_precision"]

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


def resolve_precision(amp: bool, amp_dtype: str | torch.dtype | None, device_type: str, *,
                      cpu_fallback: bool = False) -> torch.dtype | None:
    """The autocast dtype (``None`` = float32); see the module docstring.

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
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_fallback and device_type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "--amp: this CPU (%s) has no native bfloat16, so autocast would run the "
            "convolutions through PyTorch's slow reference kernels (about 10x slower than "
            "float32 here); training in float32. Force it with --amp-dtype bfloat16.",
            torch.backends.cpu.get_cpu_capability())
        return None
    return torch.bfloat16
