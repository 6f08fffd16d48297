"""``python -m edaan_fast.train``: help text, config file + command-line overrides, exit codes
of bad input, and Ctrl-C (exit 130, then ``--resume``); bad inputs and injected faults as a
user meets them, in a separate process: exit status 2 with one line, a finished run never
replaced, a checkpoint write killed or out of disk space."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from edaan_fast import train as cli
from edaan_fast.engine.checkpoint import load_checkpoint, save_checkpoint
from edaan_fast.engine.steps import ReIDStep

from .test_data_readers import bomb_png
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
@pytest.mark.parametrize("output_dir_holds_a_run", [False, True])
def test_bad_options_exit_2_with_one_line(argv, match, output_dir_holds_a_run, capsys):
    if output_dir_holds_a_run:  # a bad option is named first, whatever the folder holds
        os.makedirs("runs/default")
        open("runs/default/checkpoint.pt", "wb").close()
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


# ----------------------------------------------------------------------------- bad input, as
# a user meets it: a separate process, exit status 2 and one line on stderr

PROG_ERROR = "edaan_fast.train: error: "


def _train(argv, *, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "edaan_fast.train", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _error_line(proc, only_line: bool = True) -> str:
    """The error line of a process that exited with status 2 (the whole of stderr when it
    failed before training started; after it, the last line, below the log)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith(PROG_ERROR)]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    if only_line:
        assert len(lines) == 1, proc.stderr[-3000:]
    return errors[0][len(PROG_ERROR):]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, micro_config):
    """A finished micro run (one epoch of one iteration) in its own folder."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = _train(["--config", str(micro_config), "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("size", [["8", "4"], ["16", "8"], ["4", "4"], ["20", "32"]])
def test_too_small_image_size_names_the_smallest_allowed(size):
    msg = _error_line(_train(["--image-size", *size]))
    assert f"image_size ({size[0]}, {size[1]}) is too small" in msg
    assert "the smallest allowed is 24x24" in msg and "PatchGAN" in msg


@pytest.mark.parametrize("model, match", [
    ({"gen_width": -4}, "gen_width must be an integer >= 1; got -4"),
    ({"disc_layers": "three"}, "disc_layers must be an integer >= 1; got 'three'"),
    ({"attn_widths": [8]}, "attn_widths must be two integers >= 1; got (8,)"),
])
def test_bad_model_values_in_a_config_file(tmp_path, model, match):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": model}))
    assert match in _error_line(_train(["--config", str(config)]))


def test_path_and_device_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    msg = _error_line(_train(["--output-dir", str(a_file)]))
    assert f"output_dir {a_file} is a file" in msg
    msg = _error_line(_train(["--output-dir", str(a_file / "run")]))
    assert f"output_dir {a_file / 'run'} is under {a_file}, which is a file" in msg
    msg = _error_line(_train(["--data-root", str(a_file), "--output-dir", str(tmp_path / "o")]))
    assert f"the data root {a_file} is a file; expected a folder" in msg
    msg = _error_line(_train(["--device", "tpu9", "--output-dir", str(tmp_path / "o")]))
    assert "device 'tpu9' is not a torch device" in msg
    msg = _error_line(_train(["--resume", str(tmp_path)]))
    assert f"checkpoint {tmp_path} is a folder; expected a checkpoint file" in msg


def test_a_fresh_run_never_replaces_a_finished_one(finished, micro_config, tmp_path):
    before = {n: (finished / n).read_bytes() for n in ("final.pt", "checkpoint.pt")}
    msg = _error_line(_train(["--config", str(micro_config), "--output-dir", str(finished)]))
    assert f"output_dir {finished} already holds a run (checkpoint.pt, final.pt)" in msg
    assert f"--resume {finished / 'checkpoint.pt'}" in msg and "--overwrite" in msg
    assert {n: (finished / n).read_bytes() for n in before} == before
    # resuming a copy of the checkpoint into that folder would replace its result too
    copy = tmp_path / "copy.pt"
    copy.write_bytes(before["checkpoint.pt"])
    msg = _error_line(_train(["--resume", str(copy), "--output-dir", str(finished)]),
                      only_line=False)  # checked once the checkpoint proved resumable
    assert f"output_dir {finished} holds another run" in msg and "--overwrite" in msg
    assert {n: (finished / n).read_bytes() for n in before} == before


def test_overwrite_starts_over(micro_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("final.pt", "checkpoint.pt", "report.json"):
        (out / name).write_bytes(b"the previous run's")
    proc = _train(["--config", str(micro_config), "--output-dir", str(out), "--overwrite",
                   "--seed", "5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(out / "final.pt")["run"]["seed"] == 5
    assert json.loads((out / "report.json").read_text())["config"]["seed"] == 5


def _crafted(finished, tmp_path, change):
    ckpt = load_checkpoint(finished / "checkpoint.pt")
    change(ckpt)
    ckpt = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    return save_checkpoint(tmp_path / "crafted" / "checkpoint.pt", ckpt)


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _first_weight(change):
    def apply(c):
        key = next(iter(c["model"]))
        c["model"][key] = change(c["model"][key])
    return apply


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("run"), "has no 'run' entry (expected a dict (the run configuration)"),
    (_set("run", "edaan"), "entry 'run' must be a dict (the run configuration); got str"),
    (_set("stage", 7), "stage 7 does not exist in a edaan run (stages 0 joint)"),
    (_set("stage", "joint"), "entry 'stage' must be an integer >= 0"),
    (_first_weight(lambda w: w[..., :1]), "the weights do not fit the model"),
    (_set("model", {}), "entry 'model' must be a non-empty dict of parameter names to tensors"),
    (_set("sampler", None), "entry 'sampler' must be a dict with the 'source' sampler state"),
    (lambda c: c["model_config"].__setitem__("gen_width", "8"),
     "bad model_config: gen_width must be an integer >= 1; got '8'"),
    (_set("ranks", []), "entry 'ranks' must be a non-empty list"),
    (lambda c: c["optimizers"]["G"].__setitem__("param_groups", [{"lr": 1.0}]),
     "its optimiser state cannot be restored"),
])
def test_crafted_checkpoints_are_refused_by_resume(finished, tmp_path, change, match):
    path = _crafted(finished, tmp_path, change)
    msg = _error_line(_train(["--resume", str(path), "--output-dir", str(tmp_path / "o")]),
                      only_line=False)
    assert f"checkpoint {path}" in msg and match in msg, msg


def _market(root, train_image):
    """A Market-1501 folder of 3 x 4 training images made by ``train_image(path)``."""
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True)
    for pid in (2, 7, 9):
        for k in range(4):
            train_image(root / "bounding_box_train" / f"{pid:04d}_c{k % 2 + 1}s1_00{k}451_00.jpg")
        for split, cam in (("query", 1), ("bounding_box_test", 2)):
            Image.new("RGB", (32, 64)).save(root / split / f"{pid:04d}_c{cam}s1_000451_00.jpg")
    return root


def test_a_decompression_bomb_is_reported_by_path_in_training(micro_config, tmp_path):
    root = _market(tmp_path / "market", lambda p: p.write_bytes(bomb_png()))
    proc = _train(["--config", str(micro_config), "--source", "market1501", "--target",
                   "market1501", "--data-root", str(root), "--num-workers", "1",
                   "--output-dir", str(tmp_path / "o")])
    msg = _error_line(proc, only_line=False)
    assert "is too large to decode" in msg and str(root / "bounding_box_train") in msg
    assert "Caught" not in msg and "DatasetError:" not in msg  # the worker's wrapping is gone


def test_a_broken_symlink_named_like_an_image_is_reported(micro_config, tmp_path):
    def link(path):
        path.symlink_to(tmp_path / "gone" / path.name)

    root = _market(tmp_path / "market", lambda p: Image.new("RGB", (32, 64)).save(p))
    bad = root / "bounding_box_train" / "0003_c1s1_000451_00.jpg"
    link(bad)
    msg = _error_line(_train(["--config", str(micro_config), "--source", "market1501",
                              "--data-root", str(root), "--output-dir", str(tmp_path / "o")]))
    assert f"{bad} -> {tmp_path / 'gone' / bad.name}" in msg and "broken symbolic link" in msg


# ----------------------------------------------------------------------------- faults

_HARNESS = """
import io, os, signal, sys
import torch
import edaan_fast.engine.steps as steps
import edaan_fast.engine.trainer as trainer
from edaan_fast import train as cli

real_save = torch.save
saves = []


class Faulty(io.RawIOBase):
    # a file that fails (or kills its process) once 100 kB are written
    def __init__(self, f, fault):
        self.f, self.fault, self.n = f, fault, 0
    def writable(self):
        return True
    def write(self, b):
        self.n += len(b)
        if self.n > 100_000:
            self.fault()
        return self.f.write(b)
    def flush(self):
        self.f.flush()


def save_with_fault(fault, nth):
    def save(obj, f, *args, **kwargs):
        saves.append(1)
        return real_save(obj, Faulty(f, fault) if len(saves) == nth else f, *args, **kwargs)
    torch.save = save


def disk_full():
    raise OSError(28, "No space left on device")


def sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def interrupt_evaluation():
    real = trainer.Trainer.evaluate
    def evaluate(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the final evaluation
        return real(self)
    trainer.Trainer.evaluate = evaluate


def ctrl_c_from_a_terminal():
    real = steps.EDAANTrainStep.__call__
    def step(self, *args, **kwargs):
        log = real(self, *args, **kwargs)
        os.killpg(os.getpgrp(), signal.SIGINT)  # the whole process group: workers too
        return log
    steps.EDAANTrainStep.__call__ = step


{setup}
sys.exit(cli.main(sys.argv[1:]))
"""


def _train_with(setup, argv, **kwargs):
    script = _HARNESS.replace("{setup}", setup)
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          timeout=600, check=False, **kwargs)


def _three_epochs(micro_config, out):
    return ["--config", str(micro_config), "--epochs", "3", "--checkpoint-every", "1",
            "--output-dir", str(out)]


def test_sigkill_during_a_checkpoint_write_resumes_bit_for_bit(micro_config, tmp_path):
    straight = tmp_path / "straight"
    assert _train(_three_epochs(micro_config, straight)).returncode == 0
    out = tmp_path / "killed"
    proc = _train_with("save_with_fault(sigkill, nth=2)", _three_epochs(micro_config, out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint
    stale = list(out.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the half-written file
    proc = _train(["--resume", str(out / "checkpoint.pt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob(".*.tmp"))  # cleaned at start
    a, b = load_checkpoint(straight / "final.pt"), load_checkpoint(out / "final.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"]["history"] == b["metrics"]["history"]


def test_disk_full_during_a_checkpoint_write(micro_config, tmp_path):
    out = tmp_path / "run"
    proc = _train_with("save_with_fault(disk_full, nth=2)", _three_epochs(micro_config, out))
    msg = _error_line(proc, only_line=False)
    assert msg == (f"cannot write checkpoint {out / 'checkpoint.pt'}: the disk is full (no space "
                   f"left on the device holding {out}, " + msg.split(", ", 1)[1])
    assert "MiB free); the previous checkpoint is intact" in msg
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp")) and not (out / "final.pt").exists()


def test_ctrl_c_during_the_final_evaluation_exits_130_and_resumes(micro_config, tmp_path):
    out = tmp_path / "run"
    argv = ["--config", str(micro_config), "--output-dir", str(out)]
    proc = _train_with("interrupt_evaluation()", argv)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "training interrupted during the final evaluation (after 1 epochs)" in proc.stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "final.pt").exists() and not (out / "report.json").exists()
    proc = _train(["--resume", str(out / "checkpoint.pt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(out / "final.pt")["epoch"] == 1 and (out / "report.json").is_file()


def test_ctrl_c_with_loader_workers_warns_once(micro_config, tmp_path):
    out = tmp_path / "run"
    proc = _train_with("ctrl_c_from_a_terminal()",
                       ["--config", str(micro_config), "--num-workers", "2", "--iters-per-epoch",
                        "2", "--output-dir", str(out)], start_new_session=True)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.count("interrupt: finishing this iteration") == 1, proc.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 1
