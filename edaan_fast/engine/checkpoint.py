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
import errno
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "CheckpointWriteError",
    "ResumePoint",
    "check_checkpoint", "load_checkpoint", "load_model_state", "model_config_from_dict",
    "model_config_to_dict", "model_from_checkpoint", "remove_stale_temporaries",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "edaan_fast.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, foreign, too new, or does not fit the model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission, ...); the file it was to
    replace is intact. Attributes: ``path``, ``disk_full``."""

    def __init__(self, message: str, path: Path, disk_full: bool):
        super().__init__(message)
        self.path, self.disk_full = path, disk_full

    def __str__(self) -> str:
        return self.args[0]


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


def model_config_from_dict(data: dict[str, Any], where: str = "checkpoint"):
    """A :class:`ModelConfig` from :func:`model_config_to_dict` output (lists back to tuples).

    Raises:
        CheckpointError: ``data`` is not a mapping, has fields this version does not know, or
            values :class:`ModelConfig` refuses (the message says which).
    """
    from edaan_fast.models import ModelConfig

    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: model_config must be a dict of ModelConfig fields, got "
                              f"{type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise CheckpointError(f"{where}: model_config has unknown fields {unknown}; it was "
                              "written by a newer edaan_fast")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad model_config: "
                              f"{_first_line(exc).removeprefix('ModelConfig: ')}") from None


# ---------------------------------------------------------------------------------- schema

def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {list(value.shape)}"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return f"{type(value).__name__} {value!r:.40}"
    return type(value).__name__


def _require(ckpt: dict, where: str, key: str, expected: str, ok, optional: bool = False,
             use: str = "") -> None:
    if key not in ckpt:
        if optional:
            return
        raise CheckpointError(f"{where} {use}has no {key!r} entry (expected {expected}; keys: "
                              f"{sorted(map(str, ckpt))})"
                              + ("; only a checkpoint.pt or final.pt written by "
                                 "edaan_fast.train holds the training state" if use else ""))
    if not ok(ckpt[key]):
        raise CheckpointError(f"{where}: entry {key!r} must be {expected}; got "
                              f"{_kind(ckpt[key])}")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _dict_of(check) -> Any:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and check(x)
                                                 for k, x in v.items())


def _rank_state(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("rng"), dict)
            and isinstance(v.get("step"), dict))


#: What each kind of checkpoint must hold: ``model`` (evaluation, ``translator.pt``) and
#: ``training`` (``--resume``: ``checkpoint.pt`` / ``final.pt``). ``(key, expected, check,
#: optional)``.
_SCHEMA = {
    "model": [
        ("model_config", "a dict of ModelConfig fields", lambda v: isinstance(v, dict), False),
        ("model", "a non-empty dict of parameter names to tensors",
         lambda v: bool(v) and _dict_of(lambda x: isinstance(x, torch.Tensor))(v), False),
        ("run", "a dict (the run configuration)", lambda v: isinstance(v, dict), True),
        ("epoch", "an integer >= 0", _count, True),
    ],
    "training": [
        ("run", "a dict (the run configuration)", lambda v: isinstance(v, dict), False),
        ("epoch", "an integer >= 0", _count, False),
        ("iteration", "an integer >= 0", _count, True),
        ("global_step", "an integer >= 0", _count, True),
        ("stage", "an integer >= 0 (the stage of the variant)", _count, False),
        ("optimizers", "a dict of optimiser states", _dict_of(lambda x: isinstance(x, dict)),
         False),
        ("schedulers", "a dict of scheduler states", _dict_of(lambda x: isinstance(x, dict)),
         False),
        ("ranks", "a non-empty list of per-process states with 'rng' and 'step' dicts",
         lambda v: isinstance(v, list) and bool(v) and all(map(_rank_state, v)), False),
        ("sampler", "a dict with the 'source' sampler state (a dict) and 'target' (a dict or "
         "None)", lambda v: isinstance(v, dict) and isinstance(v.get("source"), dict)
         and (v.get("target") is None or isinstance(v.get("target"), dict)), False),
        ("metrics", "a dict with a 'history' list", lambda v: isinstance(v, dict)
         and isinstance(v.get("history", []), list), True),
        ("elapsed", "a number of seconds", lambda v: isinstance(v, (int, float))
         and not isinstance(v, bool), True),
    ],
}


def check_checkpoint(ckpt: dict[str, Any], where: str, kind: str = "model") -> dict[str, Any]:
    """Check that ``ckpt`` holds what a ``kind`` of use needs, with the right types; returns it.

    ``kind="model"``: a model to evaluate or translate with (``model_config``, ``model``);
    ``kind="training"``: additionally everything ``--resume`` restores (run, epoch, stage,
    optimiser and scheduler states, per-process RNG and step states, sampler positions). The
    model_config must be one :class:`~edaan_fast.models.ModelConfig` accepts. Whether the
    contents fit a particular run (shapes, stage count, process count) is checked where they
    are loaded (:func:`load_model_state`, the trainer).

    Raises:
        CheckpointError: naming the first entry that is missing or wrong, what was expected
            and what came.
    """
    if kind not in _SCHEMA:
        raise ValueError(f"check_checkpoint: kind must be one of {sorted(_SCHEMA)}, got {kind!r}")
    kinds = ["model"] if kind == "model" else ["model", "training"]
    for k in kinds:
        use = "cannot be resumed: it " if k == "training" else ""
        for key, expected, ok, optional in _SCHEMA[k]:
            if k == "model" and kind == "training" and key == "run":
                continue  # required below
            _require(ckpt, where, key, expected, ok, optional, use)
    model_config_from_dict(ckpt["model_config"], where)
    return ckpt


def load_model_state(model, state: dict[str, Any], where: str) -> None:
    """``model.load_state_dict(state)`` (strict), with a mismatch reported as a
    :class:`CheckpointError` naming the missing, unexpected and wrongly shaped entries."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in own.items()
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} entries, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}, e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"wrong shape: {', '.join(shapes[:3])}")
        raise CheckpointError(f"{where}: the weights do not fit the model its model_config "
                              f"describes: {'; '.join(parts)}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the weights cannot be loaded: {_first_line(exc)}") \
            from None


_TMP_SUFFIX = ".tmp"


def _temporary_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _is_disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _os_error(exc: BaseException | None) -> OSError | None:
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    """What went wrong writing ``path``, in words (torch reports a failed write of its zip
    stream as ``unexpected pos``; the ``OSError`` behind it says why)."""
    folder = path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    free_text = "" if free is None else f", {free / 2 ** 20:.1f} MiB free"
    full = _is_disk_full(exc)
    if full:
        reason = f"the disk is full (no space left on the device holding {folder}{free_text})"
    else:
        cause = _os_error(exc)
        reason = (cause.strerror or str(cause)) if cause is not None else _first_line(exc)
    kept = "the previous checkpoint is intact" if path.exists() else "nothing was written"
    return CheckpointWriteError(f"cannot write checkpoint {path}: {reason}; {kept}", path, full)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus ``format``/``version``) to ``path`` atomically; returns the path.

    The folder is created if needed. The data are written to a temporary file beside ``path``
    (``.<name>.<pid>.<random>.tmp``), flushed with ``fsync`` and renamed over ``path``
    (``os.replace`` is atomic on POSIX and Windows), so readers see either the old file or the
    complete new one. A temporary left by a killed process is removed by
    :func:`remove_stale_temporaries`.

    Raises:
        CheckpointWriteError: the file system refused the write (disk full, no permission,
            ...); the message says why and where, and ``path`` is unchanged.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=_TMP_SUFFIX,
                                   dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError)
                                        and _os_error(exc) is not None):
            raise _write_error(path, exc) from None
        raise
    return path


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_OLD_TEMPORARY = re.compile(r"^\.(?P<name>.+\.pt)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`save_checkpoint` writes that never finished (the
    process was killed mid-write) in ``folder``; returns the removed paths.

    A temporary of a process that is still running (another run writing into the same folder)
    is left alone; files without a process id (written by older versions) are always stale.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is not None:
            if _alive(int(match["pid"])):
                continue
        elif _OLD_TEMPORARY.match(entry.name) is None:
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A training checkpoint read (and checked) once, for a run that continues it: the CLI
    takes the run configuration from it and the trainer its states."""

    path: Path
    checkpoint: dict[str, Any]

    @classmethod
    def read(cls, path: str | os.PathLike) -> ResumePoint:
        """:func:`load_checkpoint` with ``kind="training"``; raises :class:`CheckpointError`."""
        return cls(Path(path), load_checkpoint(path, kind="training"))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: data only).

    ``kind``: ``"model"`` or ``"training"`` also checks the entries that use needs
    (:func:`check_checkpoint`); ``None`` checks only the format and version.

    Raises:
        CheckpointError: the file is missing, empty or truncated, is not an edaan_fast
            checkpoint (or holds objects other than data), has a newer layout version, or
            lacks what ``kind`` needs.
    """
    path = Path(path)
    if path.is_dir():
        hint = next((str(path / n) for n in ("checkpoint.pt", "final.pt") if (path / n).is_file()),
                    None)
        example = hint or "<output-dir>/checkpoint.pt"
        raise CheckpointError(f"checkpoint {path} is a folder; expected a checkpoint file "
                              f"{'such as' if hint else 'like'} {example}")
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
    if kind is not None:
        check_checkpoint(data, f"checkpoint {path}", kind)
    return data


def model_from_checkpoint(checkpoint: str | os.PathLike | dict[str, Any],
                          map_location: Any = "cpu", where: str | None = None):
    """The :class:`~edaan_fast.models.EDAAN` a checkpoint describes, weights loaded, in eval mode.

    ``where`` names a checkpoint given as a dict in error messages. Returns
    ``(model, checkpoint_dict)``.
    """
    from edaan_fast.models import EDAAN

    if isinstance(checkpoint, dict):
        ckpt, where = checkpoint, where or "checkpoint"
    else:
        ckpt, where = load_checkpoint(checkpoint, map_location), f"checkpoint {checkpoint}"
    check_checkpoint(ckpt, where, "model")
    model = EDAAN(model_config_from_dict(ckpt["model_config"], where))
    load_model_state(model, ckpt["model"], where)
    return model.eval(), ckpt
