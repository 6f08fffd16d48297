"""The ONNX form of the fused operators, for ``torch.onnx.export(dynamo=True)``: each op as
standard ONNX operators, so an exported model runs on any ONNX runtime without our library.

``mask_blend(fg, bg, mask)`` (EDAAN eq. 1/2) becomes ``Add(Mul(mask, fg), Mul(Sub(1, mask),
bg))`` -- the formula of :func:`edaan_fast.ops.reference.mask_blend`, with the ``[N, 1, H, W]``
mask broadcast over channels by ONNX's own broadcasting. ``mask_background`` (training only)
becomes ``Mul(Sub(1, mask), x)``. Needs ``onnxscript`` (``pip install "edaan_fast[export]"``),
imported only when :func:`onnx_translation_table` is called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _library

__all__ = ["onnx_translation_table"]


def onnx_translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for :func:`torch.onnx.export`: our ops -> onnxscript
    functions of standard ONNX operators (empty when the library is not loaded, i.e. when a
    model cannot hold our ops)."""
    from onnxscript import opset18 as op

    def mask_blend(fg, bg, mask):
        one = op.CastLike(1.0, mask)
        return op.Add(op.Mul(mask, fg), op.Mul(op.Sub(one, mask), bg))

    def mask_background(x, mask):
        return op.Mul(op.Sub(op.CastLike(1.0, mask), mask), x)

    if not _library.load_library():
        return {}
    return {torch.ops.edaan_fast.mask_blend.default: mask_blend,
            torch.ops.edaan_fast.mask_background.default: mask_background}
