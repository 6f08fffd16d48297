"""The export job behind ``python -m edaan_fast.export``: a checkpoint's re-ID model or
translator as a deployable graph, ONNX or a ``torch.export`` program.

``reid``: images ``[N, 3, H, W]`` (normalised, the model's size) -> the retrieval features
``[N, embedding_dim]`` (``encoder_S`` + embedding, what evaluation ranks). ``translator``:
images -> their translation ``[N, 3, H, W]`` (eq. 1 for ``s2t``, eq. 2 for ``t2s``), normalised
like the input. The batch size is dynamic in both formats.

ONNX uses the ``torch.export``-based exporter; the fused ops become standard ONNX operators
(:mod:`edaan_fast.ops.onnx`), so any ONNX runtime runs the file. An exported program keeps the
fused ``mask_blend`` op: load it with ``import edaan_fast`` (which registers the op) before
``torch.export.load``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .translation import DIRECTIONS, TranslationError, check_choice, load_translator

logger = logging.getLogger("edaan_fast.export")

__all__ = ["EXPORT_FORMATS", "EXPORT_WHAT", "ExportOptions", "ReIDGraph", "TranslatorGraph",
           "export_graph", "run_export"]

EXPORT_WHAT = ("reid", "translator")
EXPORT_FORMATS = ("onnx", "exported-program")
EXPORT_HINT = 'ONNX export needs onnx and onnxscript: pip install "edaan_fast[export]"'


class ReIDGraph(nn.Module):
    """Images -> retrieval features (the test-time path ``embedding(pool(E_S(x)))``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.reid(images).embedding


class TranslatorGraph(nn.Module):
    """Images -> their translation into the other domain (eq. 1 ``s2t`` or eq. 2 ``t2s``)."""

    def __init__(self, model: nn.Module, direction: str = "s2t"):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.model = model.eval()
        self.direction = direction
        self.train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.direction == "s2t":
            return self.model.translate_s2t(images)
        return self.model.translate_t2s(images)


@dataclass
class ExportOptions:
    """Every option of an export (the CLI's flags, same names and defaults)."""

    checkpoint: Path
    output: Path
    what: str = "reid"
    format: str = "onnx"
    direction: str = "s2t"
    opset: int = 18
    overwrite: bool = False


def _example(model: nn.Module) -> torch.Tensor:
    h, w = model.config.image_size
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def export_graph(graph: nn.Module, example: torch.Tensor, output: Path, fmt: str,
                 opset: int = 18) -> Path:
    """Write ``graph`` (one image batch in, one tensor out) as ``fmt`` at ``output``, with a
    dynamic batch dimension; written under a temporary name, then renamed."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    suffix = ".onnx" if fmt == "onnx" else ".pt2"  # what torch.export.save expects
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp{suffix}")
    try:
        if fmt == "onnx":
            from edaan_fast.ops.onnx import onnx_translation_table

            torch.onnx.export(graph, (example,), str(tmp), dynamo=True, opset_version=opset,
                              input_names=["images"], output_names=["output"],
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False,
                              custom_translation_table=onnx_translation_table())
        else:
            program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(tmp))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def _check(opts: ExportOptions) -> None:
    check_choice("--what", opts.what, EXPORT_WHAT)
    check_choice("--format", opts.format, EXPORT_FORMATS)
    check_choice("--direction", opts.direction, DIRECTIONS)
    out = Path(opts.output)
    if out.is_dir():
        raise TranslationError(f"output {out} is a folder; expected a file path")
    if out.exists() and not opts.overwrite:
        raise TranslationError(f"output {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise TranslationError(f"output {out}: the folder {out.parent} does not exist")
    if opts.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise TranslationError(EXPORT_HINT) from None


def run_export(opts: ExportOptions) -> Path:
    """Everything ``python -m edaan_fast.export`` does; returns the written file."""
    from edaan_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint

    _check(opts)
    if opts.what == "translator":
        model, _, _ = load_translator(opts.checkpoint)
        graph = TranslatorGraph(model, opts.direction)
    else:
        model, _ = model_from_checkpoint(load_checkpoint(opts.checkpoint, kind="model"),
                                         where=f"checkpoint {opts.checkpoint}")
        graph = ReIDGraph(model)
    with torch.no_grad():
        path = export_graph(graph, _example(model), Path(opts.output), opts.format, opts.opset)
    logger.info("wrote %s (%s, %s, input [batch, 3, %d, %d])", path, opts.what, opts.format,
                *model.config.image_size)
    return path
