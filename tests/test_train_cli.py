"""``python -m edaan_fast.train``: help text, config file + command-line overrides, exit codes
of bad input, and Ctrl-C (exit 130, then ``--resume``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from edaan_fast import train as cli
from edaan_fast.engine.checkpoint import load_checkpoint
from edaan_fast.engine.trainer import ReIDStep

from .test_trainer import MICRO_MODEL

MICRO_ARGS = ["--batch-size", "8", "--iters-per-epoch", "2", "--eval-every", "0",
              "--no-progress"]


def test_help_explains_every_option_and_the_schedule_rule():
    out = subprocess.run([sys.executable, "-m", "edaan_fast.train", "--help"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for option in ("--source", "--target", "--data-root", "--source-root", "--target-root",
                   "--preset", "--variant", "--no-attention", "--metric-loss", "--amp",
                   "--loader", "--epochs", "--batch-size", "--seed", "--output-dir", "--resume",
                   "--compile", "--config", "--checkpoint-every", "--eval-every"):
        assert option in text, option
    assert "round(30/200 * epochs)" in text
    assert "edaan,daan,cyclegan,direct" in text.replace(" ", "").replace("{", "").replace("}",
                                                                                           "")
    # every option has its own help line
    actions = [a for a in cli.build_parser()._actions if a.option_strings]
    assert all(a.help for a in actions), [a.option_strings for a in actions if not a.help]


def test_config_file_then_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"variant": "direct", "epochs": 5, "batch-size": 16,
                                      "seed": 3, "model": MICRO_MODEL}))
    out = tmp_path / "out"
    status = cli.main(["--config", str(config), "--epochs", "1", *MICRO_ARGS,
                       "--output-dir", str(out)])
    assert status == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["variant"], saved["epochs"], saved["batch_size"], saved["seed"]) == \
        ("direct", 1, 8, 3)  # file < command line; untouched file values kept
    assert saved["model"] == MICRO_MODEL
    assert load_checkpoint(out / "checkpoint.pt")["run"] == saved


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "10"], "batch_size must be a multiple of num_instances"),
    (["--epochs", "0"], "epochs must be an integer >= 1; got 0"),
    (["--source", "market1501"], "needs a folder: pass --data-root"),
])
def test_bad_options_exit_2_with_one_line(argv, match, capsys):
    assert cli.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and err.startswith("edaan_fast.train: error:")


def test_truncated_or_foreign_checkpoint_exits_2(tmp_path, capsys):
    truncated = tmp_path / "checkpoint.pt"
    truncated.write_bytes(b"PK\x03\x04 not a whole zip file")
    assert cli.main(["--resume", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read" in err and "truncated" in err
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_a_checkpoint_then_resumes(tmp_path, monkeypatch, capsys):
    real_step = ReIDStep.__call__
    calls = []

    def step_then_ctrl_c(self, *args, **kwargs):
        log = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return log

    monkeypatch.setattr(ReIDStep, "__call__", step_then_ctrl_c)
    out = tmp_path / "out"
    argv = ["--variant", "direct", "--epochs", "1", *MICRO_ARGS, "--output-dir", str(out)]
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump({"model": MICRO_MODEL}))
    assert cli.main(["--config", str(config), *argv]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and str(out / "checkpoint.pt") in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 1)
    assert cli.main(["--resume", str(out / "checkpoint.pt"), "--no-progress"]) == 0
    assert len(calls) == 2 and (out / "report.json").is_file()
