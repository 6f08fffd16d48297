"""Checkpoint files: atomic writes, data-only loading and one clear error per kind of bad file."""

from __future__ import annotations

import collections
import errno
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

from edaan_fast.engine.checkpoint import (
    CHECKPOINT_VERSION, CheckpointError, CheckpointWriteError, check_checkpoint, load_checkpoint,
    load_model_state, model_config_to_dict, model_from_checkpoint, remove_stale_temporaries,
    save_checkpoint,
)
from edaan_fast.models import build_model


class _Code:
    """A class reference in a pickle: loading it would import (and could run) code."""


@pytest.fixture
def saved(tmp_path):
    model = build_model("tiny")
    path = save_checkpoint(tmp_path / "ckpt.pt", {
        "model_config": model_config_to_dict(model.config), "model": model.state_dict(),
        "run": {"variant": "edaan"}, "epoch": 3})
    return path, model


def test_round_trip(saved):
    path, model = saved
    ckpt = load_checkpoint(path)
    assert ckpt["version"] == CHECKPOINT_VERSION and ckpt["epoch"] == 3
    loaded, _ = model_from_checkpoint(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_failed_write_keeps_the_previous_file(saved):
    path, _ = saved
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a local lambda
        save_checkpoint(path, {"model": lambda: None})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"garbage" * 10, "truncated, corrupt or not a torch file"),
    (b"\x80\x04truncated", "truncated, corrupt or not a torch file"),
    (b"\x80\x02}q\x00", "truncated, corrupt or not a torch file"),
    (b"PK\x03\x04" + b"x" * 50, "truncated, corrupt or not a torch file"),
])
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a torch file"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_code_is_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"format": "edaan_fast.checkpoint", "version": 1, "obj": _Code()}, path)
    with pytest.raises(CheckpointError, match="data, never code.*_Code"):
        load_checkpoint(path)


def test_foreign_and_newer_files(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(collections.OrderedDict(weight=torch.zeros(2)), path)
    with pytest.raises(CheckpointError, match=r"not an edaan_fast checkpoint.*\['weight'\]"):
        load_checkpoint(path)
    torch.save({"format": "edaan_fast.checkpoint", "version": CHECKPOINT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="layout version"):
        load_checkpoint(path)


def test_weights_that_do_not_fit(saved, tmp_path):
    path, model = saved
    ckpt = load_checkpoint(path)
    del ckpt["model"][next(iter(ckpt["model"]))]
    with pytest.raises(CheckpointError, match="missing"):
        model_from_checkpoint(ckpt)


def test_a_folder_is_not_a_checkpoint(tmp_path, saved):
    with pytest.raises(CheckpointError, match="is a folder; expected a checkpoint file") as info:
        load_checkpoint(tmp_path)
    assert str(info.value).startswith(f"checkpoint {tmp_path} is a folder")


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("model_config"), "has no 'model_config' entry"),
    (lambda c: c.__setitem__("model", {"w": [1, 2]}), "entry 'model' must be a non-empty dict"),
    (lambda c: c.__setitem__("run", ["edaan"]), "entry 'run' must be a dict"),
    (lambda c: c.__setitem__("epoch", -1), "entry 'epoch' must be an integer >= 0; got int -1"),
    (lambda c: c["model_config"].__setitem__("image_size", [8, 4]),
     r"bad model_config: image_size \(8, 4\) is too small for the networks: the smallest "
     "allowed is 24x24"),
    (lambda c: c["model_config"].__setitem__("width", 3), r"unknown fields \['width'\]"),
])
def test_model_schema_is_checked_in_one_place(saved, change, match):
    path, _ = saved
    ckpt = load_checkpoint(path)
    change(ckpt)
    with pytest.raises(CheckpointError, match=match):
        check_checkpoint(ckpt, "checkpoint x", "model")
    with pytest.raises(CheckpointError, match=match):
        model_from_checkpoint(ckpt)


def test_training_schema_needs_the_training_state(saved):
    path, _ = saved
    assert check_checkpoint(load_checkpoint(path), "x", "model")["epoch"] == 3
    with pytest.raises(CheckpointError,
                       match=r"checkpoint .*ckpt.pt cannot be resumed: it has no 'stage' entry"):
        load_checkpoint(path, kind="training")


def test_wrong_shaped_weights_are_named(saved):
    path, model = saved
    ckpt = load_checkpoint(path)
    key = next(k for k, v in ckpt["model"].items() if v.dim() == 4)
    ckpt["model"][key] = ckpt["model"][key][:1]
    with pytest.raises(CheckpointError, match=f"wrong shape: {key} "):
        load_model_state(model, ckpt["model"], "checkpoint x")


def test_disk_full_keeps_the_previous_file_and_says_where(saved, monkeypatch):
    path, _ = saved
    before = path.read_bytes()
    real_save = torch.save

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, Full(f)))
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, {"model": build_model("tiny").state_dict()})
    assert info.value.disk_full and info.value.path == path
    assert str(info.value).startswith(
        f"cannot write checkpoint {path}: the disk is full (no space left on the device "
        f"holding {path.parent}, ")
    assert str(info.value).endswith("MiB free); the previous checkpoint is intact")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    files = {
        f".checkpoint.pt.{dead_pid}.abc123.tmp": False,   # killed mid-write: stale
        ".final.pt.k2j_x9.tmp": False,                     # older name, no pid: stale
        f".checkpoint.pt.{os.getpid()}.def456.tmp": True,  # a live writer: kept
        "checkpoint.pt": True, ".config.yaml.tmp123": True, "notes.tmp": True,
    }
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, keep in files.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, k in files.items() if k)
    assert remove_stale_temporaries(tmp_path / "missing") == []
