"""Checkpoints: atomic writes, data-only loading, clear errors, and the model they describe.

A checkpoint is a plain ``dict`` saved with :func:`torch.save` and read back with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only, so
loading one never runs code. Its keys:

=================  ==========================================================================
``format``         ``"edaan_fast.checkpoint"`` (anything else is a foreign file)
``version``        the layout version (:data:`CHECKPOINT_VERSION`); newer files are refused
``model_config``   the :class:`~edaan_fast.models.ModelConfig` fields (tuples as lists)
``model``          the :class:`~edaan_fast.models.EDAAN` ``state_dict``
``run``            the resolved run configuration (variant, preset, source, target, ...)
``epoch``          completed epochs
(trainer extras)   optimiser, scheduler, scaler, pool, sampler and RNG states, metrics
=================  ==========================================================================

:func:`save_checkpoint` writes to a temporary file in the destination folder, flushes it to
disk and renames it over the destination, so a crash or Ctrl-C mid-write leaves the previous
checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "load_checkpoint",
    "model_config_from_dict", "model_config_to_dict", "model_from_checkpoint", "save_checkpoint",
]

CHECKPOINT_FORMAT = "edaan_fast.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, foreign, too new, or does not fit the model."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no message"


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (what YAML/JSON round-trip)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_config_to_dict(config) -> dict[str, Any]:
    """The fields of a :class:`ModelConfig` as plain data (tuples become lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def model_config_from_dict(data: dict[str, Any]):
    """A :class:`ModelConfig` from :func:`model_config_to_dict` output (lists back to tuples)."""
    from edaan_fast.models import ModelConfig

    known = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CheckpointError(f"checkpoint model_config has unknown fields {unknown}; it was "
                              "written by a newer edaan_fast")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return ModelConfig(**kwargs)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus ``format``/``version``) to ``path`` atomically; returns the path.

    The folder is created if needed. The data are written to a temporary file beside ``path``,
    flushed with ``fsync`` and renamed over ``path`` (``os.replace`` is atomic on POSIX and
    Windows), so readers see either the old file or the complete new one.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: data only).

    Raises:
        CheckpointError: the file is missing, empty or truncated, is not an edaan_fast
            checkpoint (or holds objects other than data), or has a newer layout version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch warns before some of the errors handled below
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "global" in text.lower():  # a class or function reference: code, not data
            detail = next((ln.strip() for ln in text.splitlines() if "global" in ln.lower()),
                          _first_line(exc))
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain data, so it is "
                f"not loaded (a checkpoint is data, never code): {detail}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({path.stat().st_size} bytes): it is truncated, "
            "corrupt or not a torch file (the unpickler stopped at an invalid byte)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, KeyError,
            ValueError, TypeError, AttributeError) as exc:  # what a garbled pickle can raise
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({path.stat().st_size} bytes): it is truncated, "
            f"corrupt or not a torch file ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        keys = sorted(map(str, data))[:8] if isinstance(data, dict) else []
        raise CheckpointError(
            f"{path} is not an edaan_fast checkpoint (format {found!r}"
            + (f", keys {keys}" if keys else "") + f"; expected format {CHECKPOINT_FORMAT!r}, "
            "written by edaan_fast.train)"
        )
    version = data.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has layout version {version!r}; this edaan_fast "
                              f"reads versions <= {CHECKPOINT_VERSION}: upgrade edaan_fast")
    return data


def model_from_checkpoint(checkpoint: str | os.PathLike | dict[str, Any],
                          map_location: Any = "cpu"):
    """The :class:`~edaan_fast.models.EDAAN` a checkpoint describes, weights loaded, in eval mode.

    Returns ``(model, checkpoint_dict)``.
    """
    from edaan_fast.models import EDAAN

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint,
                                                                           map_location)
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint has no {key!r} entry (keys: {sorted(ckpt)})")
    model = EDAAN(model_config_from_dict(ckpt["model_config"]))
    try:
        result = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"checkpoint weights do not fit its model_config: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            "checkpoint weights do not fit the model its model_config describes: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval(), ckpt
