"""Progress bars: drawn on a terminal, switched off on any other stream (a log file, a pipe),
so that logs hold no carriage-return lines; a training log keeps one line per epoch."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import yaml

from edaan_fast._progress import progress_bar, progress_wanted
from tests.test_trainer import MICRO_MODEL


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("EDAAN_FAST_PROGRESS", raising=False)


def _draw(stream, **kwargs) -> list:
    seen = []
    with progress_bar(range(40), file=stream, desc="work", mininterval=0, **kwargs) as bar:
        for i in bar:
            seen.append(i)
    return seen


def test_a_bar_is_drawn_on_a_terminal_only():
    tty, log = Terminal(), io.StringIO()
    assert _draw(tty) == _draw(log) == list(range(40))  # a switched-off bar still iterates
    assert "\r" in tty.getvalue() and "40/40" in tty.getvalue()
    assert log.getvalue() == ""
    off = Terminal()
    assert _draw(off, enabled=False) == list(range(40)) and off.getvalue() == ""
    assert progress_wanted(Terminal()) and not progress_wanted(io.StringIO())


def test_a_closed_or_odd_stream_gets_no_bar():
    closed = io.StringIO()
    closed.close()
    assert not progress_wanted(closed)
    assert not progress_wanted(object())


def test_the_environment_overrides_the_stream(monkeypatch):
    monkeypatch.setenv("EDAAN_FAST_PROGRESS", "1")
    log = io.StringIO()
    _draw(log)
    assert "\r" in log.getvalue()
    monkeypatch.setenv("EDAAN_FAST_PROGRESS", "0")
    tty = Terminal()
    _draw(tty)
    assert tty.getvalue() == ""


def _train_log(tmp_path, name, env=None):
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump({"model": MICRO_MODEL, "batch_size": 8, "epochs": 2,
                                      "iters_per_epoch": 3, "eval_every": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "edaan_fast.train", "--config", str(config), "--progress",
         "--output-dir", str(tmp_path / name)],
        capture_output=True, timeout=600, check=False,  # bytes: text mode would turn \r to \n
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    log = proc.stderr.decode()
    assert proc.returncode == 0, log[-3000:]
    return log


def test_a_training_log_has_one_line_per_epoch_and_no_bar(tmp_path):
    log = _train_log(tmp_path, "piped")  # stderr is a pipe, --progress asked for
    assert "\r" not in log
    epochs = [ln for ln in log.splitlines() if " epoch " in ln and "img/s" in ln]
    assert [ln.split(" epoch ")[1][:3] for ln in epochs] == ["1/2", "2/2"], log[-3000:]
    forced = _train_log(tmp_path, "forced", {"EDAAN_FAST_PROGRESS": "1"})
    assert "\r" in forced and "epoch 1/2" in forced  # the same run draws its bar when told to
