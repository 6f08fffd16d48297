"""Checkpoint files: atomic writes, data-only loading and one clear error per kind of bad file."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch

from edaan_fast.engine.checkpoint import (
    CHECKPOINT_VERSION, CheckpointError, load_checkpoint, model_config_to_dict,
    model_from_checkpoint, save_checkpoint,
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
