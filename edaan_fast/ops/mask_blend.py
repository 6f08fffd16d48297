"""``mask_blend`` and ``mask_background``: the attention blending of EDAAN eq. (1)/(2).

Paper symbols -> code: in eq. (1), ``x_ST = A_S(x_S) * x_S + (1 - A_S(x_S)) * G_S(E_S(x_S))``
is ``mask_blend(fg=x_S, bg=G_S(E_S(x_S)), mask=A_S(x_S))``; eq. (2) likewise with T and S
swapped. After the first training phase the discriminators see only the background,
``(1 - A(x)) * x`` = ``mask_background(x, A(x))``, computed without materialising a zero image.

Both run as one fused pass forward and one backward pass producing every gradient (the mask
gradient of a broadcast ``[N, 1, H, W]`` mask summed over channels inside the kernel), with
float accumulation for float16/bfloat16.
"""

from __future__ import annotations

import torch

from . import _library, reference
from ._layout import suggest_memory_format

__all__ = ["mask_blend", "mask_background"]


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def mask_blend(fg: torch.Tensor, bg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out = mask * fg + (1 - mask) * bg`` in one pass (EDAAN eq. 1/2).

    Args:
        fg: ``[N, C, H, W]`` foreground image (eq. 1: the real image ``x_S``).
        bg: ``[N, C, H, W]`` background image (eq. 1: the translation ``G_S(E_S(x_S))``).
        mask: ``[N, 1, H, W]`` (broadcast over channels) or ``[N, C, H, W]``, values usually in
            ``[0, 1]`` (eq. 1: the attention ``A_S(x_S)``; 1 keeps ``fg``).

    Returns:
        ``[N, C, H, W]`` in the promoted dtype of the inputs, channels_last if ``bg`` is.
        ``mask == 1`` returns ``fg`` exactly and ``mask == 0`` returns ``bg`` exactly.

    Mixed dtypes (e.g. a float32 image with a bfloat16 generator output under autocast) are
    promoted as eager PyTorch would. float32/float16/bfloat16/float64 are supported.
    """
    dtype = _common_dtype(fg, bg, mask)
    if dtype.is_floating_point:
        fg, bg, mask = fg.to(dtype), bg.to(dtype), mask.to(dtype)
    if _library.reference_enabled():
        return reference.mask_blend(fg, bg, mask)
    _library.require_ops("mask_blend")
    _library.require_cuda_kernels("mask_blend", bg)
    return torch.ops.edaan_fast.mask_blend.default(fg, bg, mask)


def mask_background(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * x`` in one pass: the discriminator's background-only input.

    Same shapes, dtypes and layouts as :func:`mask_blend` with ``fg = 0`` and ``bg = x``, and
    the same header math, without allocating a zero image.
    """
    dtype = _common_dtype(x, mask)
    if dtype.is_floating_point:
        x, mask = x.to(dtype), mask.to(dtype)
    if _library.reference_enabled():
        return reference.mask_background(x, mask)
    _library.require_ops("mask_background")
    _library.require_cuda_kernels("mask_background", x)
    return torch.ops.edaan_fast.mask_background.default(x, mask)


# --- fake (meta) kernels and autograd; registered only when the library is loaded -------------


def _check_fake(op: str, bg: torch.Tensor, mask: torch.Tensor, fg: torch.Tensor | None = None):
    """Shape/device checks for fake tensors (the real kernels run csrc/ops/mask_blend.h)."""
    name = "bg" if fg is not None else "x"
    torch._check(bg.dim() == 4, lambda: f"{op}: {name} must be a 4-D [N, C, H, W] tensor, got {bg.dim()}-D")
    tensors = [t for t in (fg, bg, mask) if t is not None]
    torch._check(
        all(t.device == bg.device for t in tensors),
        lambda: f"{op}: all inputs must be on one device, got {[str(t.device) for t in tensors]}",
    )
    torch._check(
        mask.dim() == 4 and mask.shape[0] == bg.shape[0] and mask.shape[2:] == bg.shape[2:]
        and mask.shape[1] in (1, bg.shape[1]),
        lambda: f"{op}: mask must be [N, 1, H, W] or [N, C, H, W] matching {name} "
        f"{list(bg.shape)}, got {list(mask.shape)}",
    )


def _empty_like_kernel(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device,
                       memory_format=suggest_memory_format(t))


def _mask_grad_like(bg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    elementwise = mask.shape[1] != 1 or bg.shape[1] == 1
    if elementwise:
        fmt = suggest_memory_format(bg)
        return torch.empty(mask.shape, dtype=mask.dtype, device=mask.device, memory_format=fmt)
    return torch.empty(mask.shape, dtype=mask.dtype, device=mask.device)


def _register() -> None:
    lib = "edaan_fast::"

    @torch.library.register_fake(lib + "mask_blend")
    def _(fg, bg, mask):
        _check_fake("mask_blend", bg, mask, fg)
        return _empty_like_kernel(bg)

    @torch.library.register_fake(lib + "_mask_blend_backward")
    def _(grad, fg, bg, mask):
        _check_fake("_mask_blend_backward", bg, mask, fg)
        return _empty_like_kernel(bg), _empty_like_kernel(bg), _mask_grad_like(bg, mask)

    @torch.library.register_fake(lib + "mask_background")
    def _(x, mask):
        _check_fake("mask_background", x, mask)
        return _empty_like_kernel(x)

    @torch.library.register_fake(lib + "_mask_background_backward")
    def _(grad, x, mask):
        _check_fake("_mask_background_backward", x, mask)
        return _empty_like_kernel(x), _mask_grad_like(x, mask)

    # Autograd: csrc/autograd.cpp (one fused backward op per forward).


if _library.load_library():
    _register()
