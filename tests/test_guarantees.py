"""The promises of docs/guarantees.md that no other test file holds, each checked as a user
meets it: the command in a separate process, its exit status and its one line on stderr, the
faults injected for real (a terminal's Ctrl-C sent to the process group, a ``SIGKILL`` in the
middle of a write, a write that fails with ``ENOSPC`` or ``EACCES``). Also: every test that
docs/guarantees.md names exists.

Every run is a micro model (``tests.test_trainer.MICRO_MODEL``) on the embedded synthetic set,
one or two iterations per epoch, no periodic evaluation.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edaan_fast.data import render
from edaan_fast.engine.checkpoint import load_checkpoint, model_config_to_dict, save_checkpoint
from edaan_fast.engine.precision import cpu_has_native_bf16
from edaan_fast.engine.run_config import PAPER_ATTENTION, RunConfig
from edaan_fast.engine.steps import DISCRIMINATOR_TERMS, GENERATOR_TERMS
from edaan_fast.evaluation.report import METRIC_KEYS
from edaan_fast.metrics.features import Features, save_features
from edaan_fast.models import build_model

from .conftest import requires_ops

CHECKOUT = Path(__file__).resolve().parents[1]
TRAIN_ERROR = "edaan_fast.train: "
EVALUATE_ERROR = "python -m edaan_fast.evaluate: error: "


# ----------------------------------------------------------------------------- helpers

#: The script of a command that :func:`_run` runs with ``setup``: fault-injection helpers,
#: the test's ``setup`` lines (which call them), then the command's own ``main``.
_HARNESS = """
import hashlib, io, json, os, signal, sys
import numpy as np
import torch
import edaan_fast.engine.stages as stages
import edaan_fast.engine.trainer as trainer

steps = []
real_run_step = trainer.Trainer._run_step


def ctrl_c():
    os.killpg(os.getpgrp(), signal.SIGINT)  # a terminal's Ctrl-C: the whole process group


def fingerprint(path, into="fingerprint.json"):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(into, "w") as f:
        json.dump({"sha256": digest, "mtime_ns": os.stat(path).st_mtime_ns}, f)


def around_step(n, before=None, after=None):
    # call before(trainer) / after(trainer) around the n-th training step (1-based)
    def run_step(self, batch):
        steps.append(1)
        if len(steps) == n and before is not None:
            before(self)
        log = real_run_step(self, batch)
        if len(steps) == n and after is not None:
            after(self)
        return log
    trainer.Trainer._run_step = run_step


def on_next_fsync(action, into="fsynced.json"):
    # run action() at the next fsync, once the data are written: say which file it was
    real = os.fsync
    def fsync(fd):
        os.fsync = real
        with open(into, "w") as f:
            json.dump(os.readlink(f"/proc/self/fd/{fd}"), f)
        action()
        return real(fd)
    os.fsync = fsync


def record_updates(into="updates.json"):
    # on a NonFiniteLossError: which parameters, buffers and optimiser states the failing
    # step changed
    from edaan_fast.engine.steps import NonFiniteLossError
    inner = trainer.Trainer._run_step
    def snapshot(self):
        state = {"parameters": dict(self.model.named_parameters()),
                 "buffers": dict(self.model.named_buffers()), "optimizers": {}}
        for name, opt in self.optimizers.items():
            for i, s in opt.state_dict()["state"].items():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        state["optimizers"][f"{name}.{i}.{k}"] = v
        return {kind: {k: v.detach().clone() for k, v in d.items()}
                for kind, d in state.items()}
    def run_step(self, batch):
        steps.append(1)
        before = snapshot(self)
        try:
            return inner(self, batch)
        except NonFiniteLossError:
            after = snapshot(self)
            report = {kind: sorted(k for k in before[kind] if k not in after[kind]
                                   or not torch.equal(before[kind][k], after[kind][k]))
                      for kind in before}
            report.update(step=len(steps), parameters_seen=len(before["parameters"]),
                          optimizer_states_seen=len(before["optimizers"]))
            with open(into, "w") as f:
                json.dump(report, f)
            raise
    trainer.Trainer._run_step = run_step


class Faulty(io.RawIOBase):
    # a file that runs fault() once `after` bytes are written through it
    def __init__(self, f, fault, after):
        self.f, self.fault, self.after, self.n = f, fault, after, 0
    def writable(self):
        return True
    def write(self, b):
        self.n += len(b)
        if self.n > self.after:
            self.fault()
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)


def savez_with_fault(fault, after):
    real = np.savez
    def savez(file, *args, **kwargs):
        return real(Faulty(file, fault, after), *args, **kwargs)
    np.savez = savez


def record_stage_data(into="stage_data.json"):
    # the folders of the images each training stage reads
    real = stages.stage_records
    seen = {}
    def stage_records(stage, *args, **kwargs):
        records = real(stage, *args, **kwargs)
        seen[stage.name] = sorted({os.path.dirname(r.path) for r in records})
        with open(into, "w") as f:
            json.dump(seen, f)
        return records
    stages.stage_records = stage_records


def refuse_permission(nth):
    # the nth checkpoint write finds its folder closed to it
    import tempfile
    real, calls = tempfile.mkstemp, []
    def mkstemp(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".checkpoint.pt."):
            calls.append(1)
            if len(calls) == nth:
                raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)
    tempfile.mkstemp = mkstemp


def sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full():
    raise OSError(28, "No space left on device")


{setup}
from {module} import main
sys.exit(main(sys.argv[1:]))
"""


def _command(command: str, argv, setup: str = "") -> list[str]:
    module = f"edaan_fast.{command}"
    if not setup:
        return [sys.executable, "-m", module, *map(str, argv)]
    script = _HARNESS.replace("{setup}", setup).replace("{module}", module)
    return [sys.executable, "-c", script, *map(str, argv)]


#: One thread per command: two of them can run side by side on a 2-core machine.
_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run(command: str, argv, cwd, setup: str = "", timeout: int = 300):
    """``python -m edaan_fast.<command> argv`` in a process group of its own (so that a
    Ctrl-C sent to the group reaches it and its loader workers, not pytest); with ``setup``,
    the same ``main`` after those lines of :data:`_HARNESS`."""
    return subprocess.run(_command(command, argv, setup), capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=cwd, env=_ENV,
                          start_new_session=True)


class _Background:
    """:func:`_run` started without waiting for it: :meth:`wait` returns its result."""

    def __init__(self, command: str, argv, cwd: Path):
        self.out, self.err = cwd / "background.out", cwd / "background.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(_command(command, argv), stdout=out, stderr=err,
                                         cwd=cwd, env=_ENV, start_new_session=True)

    def wait(self, timeout: int = 300) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                           self.out.read_text(), self.err.read_text())


def _last_line(proc, status: int, prefix: str) -> str:
    """The one line the command wrote for the user at exit ``status``: the last line of
    stderr, the only one with ``prefix`` (log lines come before it), with no traceback."""
    tail = proc.stderr[-3000:]
    assert proc.returncode == status, tail
    assert "Traceback" not in proc.stderr, tail
    lines = proc.stderr.splitlines()
    ours = [ln for ln in lines if ln.startswith(prefix)]
    assert len(ours) == 1 and lines[-1] == ours[0], tail
    return ours[0][len(prefix):]


def _fingerprint(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "mtime_ns": path.stat().st_mtime_ns}


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())




def _two_epochs(micro_config, out, *extra):
    """Two epochs of two iterations, a checkpoint after each epoch."""
    return ["--config", micro_config, "--epochs", "2", "--iters-per-epoch", "2",
            "--checkpoint-every", "1", "--output-dir", out, *extra]


# ----------------------------------------------------------------------------- Ctrl-C twice

@pytest.fixture(scope="module")
def ctrl_c_twice_during_the_write(micro_config, tmp_path_factory):
    """A run whose second Ctrl-C comes while the checkpoint that the first one asked for is
    being written (after the data, before the rename)."""
    tmp = tmp_path_factory.mktemp("twice_write")
    setup = ("around_step(3, after=lambda t: (fingerprint(t.output_dir / 'checkpoint.pt'), "
             "ctrl_c(), on_next_fsync(ctrl_c)))")
    proc = _run("train", _two_epochs(micro_config, tmp / "run"), tmp, setup)
    return proc, tmp


def test_a_second_ctrl_c_stops_at_once_without_writing(micro_config, tmp_path):
    """The second Ctrl-C comes in the middle of an iteration (the first asked to finish it):
    the run stops there, writes nothing, and the epoch-1 checkpoint stays as it was."""
    out = tmp_path / "run"
    setup = ("around_step(3, before=lambda t: (fingerprint(t.output_dir / 'checkpoint.pt'), "
             "ctrl_c(), ctrl_c()))")
    proc = _run("train", _two_epochs(micro_config, out), tmp_path, setup)
    line = _last_line(proc, 130, TRAIN_ERROR)
    assert "interrupted in the middle of an iteration (epoch 2, iteration 0)" in line, line
    assert "nothing was written" in line and "--resume" not in line, line
    assert _fingerprint(out / "checkpoint.pt") == json.loads(
        (tmp_path / "fingerprint.json").read_text())
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["global_step"]) == (1, 0, 2)
    assert not (out / "final.pt").exists() and not (out / "report.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_a_second_ctrl_c_during_the_checkpoint_write_keeps_the_last_one(
        ctrl_c_twice_during_the_write):
    proc, tmp = ctrl_c_twice_during_the_write
    out = tmp / "run"
    written = Path(json.loads((tmp / "fsynced.json").read_text()))
    assert written.parent == out and written.name.startswith(".checkpoint.pt."), written
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _fingerprint(out / "checkpoint.pt") == json.loads(
        (tmp / "fingerprint.json").read_text())
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == 2  # epoch 1's
    assert not (out / "final.pt").exists() and not list(out.glob(".*.tmp"))


def test_a_second_ctrl_c_during_the_checkpoint_write_says_what_happened(
        ctrl_c_twice_during_the_write):
    proc, _ = ctrl_c_twice_during_the_write
    line = _last_line(proc, 130, TRAIN_ERROR)
    assert "before training started" not in line, line
    assert "epoch 2" in line and re.search("nothing (was )?written", line), line


# ----------------------------------------------------------------------------- NaN / inf

@pytest.fixture(scope="module")
def non_finite_run(micro_config, tmp_path_factory):
    """``--lr 1e30``: the first step throws the weights to ~1e30 (finite, checkpointed after
    epoch 1); the second step's losses overflow."""
    tmp = tmp_path_factory.mktemp("non_finite")
    argv = ["--config", micro_config, "--epochs", "2", "--checkpoint-every", "1", "--lr", "1e30",
            "--output-dir", tmp / "run"]
    proc = _run("train", argv, tmp, "record_updates()")
    updates = json.loads((tmp / "updates.json").read_text())
    assert updates["step"] == 2, updates
    assert updates["parameters_seen"] > 50 and updates["optimizer_states_seen"] > 50, updates
    return proc, tmp / "run", updates


def test_a_non_finite_loss_exits_1_naming_the_step_and_term(non_finite_run):
    """The run stops before the step changes a weight or an optimiser state, and writes no
    checkpoint of it: the last one is epoch 1's, finite."""
    proc, out, updates = non_finite_run
    line = _last_line(proc, 1, TRAIN_ERROR + "error: ")
    named = re.match(r"non-finite (generator|discriminator) loss at training step \d+: (\w+) = "
                     r"(nan|inf|-inf) ", line)
    assert named and named[2] in GENERATOR_TERMS + DISCRIMINATOR_TERMS, line
    assert "Nothing was updated" in line, line
    assert updates["parameters"] == [] and updates["optimizers"] == [], updates
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 1)
    assert all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "final.pt").exists() and not (out / "report.json").exists()


def test_a_non_finite_loss_leaves_the_model_buffers_as_they_were(non_finite_run):
    _, _, updates = non_finite_run
    assert updates["buffers"] == [], updates["buffers"]


def test_a_checkpoint_write_without_permission_exits_2(micro_config, tmp_path):
    out = tmp_path / "run"
    argv = ["--config", micro_config, "--epochs", "2", "--checkpoint-every", "1",
            "--output-dir", out]
    line = _last_line(_run("train", argv, tmp_path, "refuse_permission(nth=2)"), 2,
                      TRAIN_ERROR + "error: ")
    assert line == (f"cannot write checkpoint {out / 'checkpoint.pt'}: Permission denied; the "
                    "previous checkpoint is intact"), line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "final.pt").exists() and not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- evaluate

@pytest.fixture(scope="module")
def evaluation_checkpoint(tmp_path_factory):
    """An untrained tiny model's checkpoint of a run on the embedded set's target (rendered
    into the default data cache, as a default run uses it)."""
    render(None, "tiny", seed=0)
    torch.manual_seed(0)
    model = build_model("tiny")
    run = RunConfig(epochs=1).resolve().to_dict()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", {
        "model_config": model_config_to_dict(model.config), "model": model.state_dict(),
        "epoch": 1, "run": run})


#: The first batch of feature extraction sends Ctrl-C.
_CTRL_C_WHILE_EXTRACTING = """
import edaan_fast.evaluation.evaluator as evaluator
real_features = evaluator.model_features
def model_features(*args, **kwargs):
    ctrl_c()
    return real_features(*args, **kwargs)
evaluator.model_features = model_features
"""


@requires_ops
def test_evaluate_exits_130_on_ctrl_c(evaluation_checkpoint, tmp_path):
    proc = _run("evaluate", ["--checkpoint", evaluation_checkpoint, "--num-workers", "2",
                             "--no-progress", "--output", tmp_path / "r.json"],
                tmp_path, _CTRL_C_WHILE_EXTRACTING)
    assert not (tmp_path / "r.json").exists()
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("python -m edaan_fast.evaluate: "), \
        proc.stderr[-3000:]


@requires_ops
def test_evaluate_exits_1_with_a_traceback_on_an_internal_error(evaluation_checkpoint,
                                                               tmp_path):
    setup = ("import edaan_fast.evaluation.evaluator as evaluator\n"
             "def broken(*args, **kwargs):\n"
             "    raise RuntimeError('an internal error')\n"
             "evaluator.model_features = broken\n")
    proc = _run("evaluate", ["--checkpoint", evaluation_checkpoint, "--num-workers", "0",
                             "--no-progress"], tmp_path, setup)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "RuntimeError: an internal error"


@requires_ops
@pytest.mark.parametrize("fault, previous", [
    ("sigkill", True), ("sigkill", False), ("disk_full", True)],
    ids=["sigkill-over_a_previous_file", "sigkill-new_file", "disk_full-over_a_previous_file"])
def test_a_features_write_that_dies_leaves_the_old_file_or_none(evaluation_checkpoint,
                                                                tmp_path, fault, previous):
    """``--export-features``: the writer is killed (``SIGKILL``) or the disk fills once 20 kB
    of the ~150 kB file are on their way to it."""
    npz = tmp_path / "feats.npz"
    old = b"the previous export"
    if previous:
        npz.write_bytes(old)
    proc = _run("evaluate", ["--checkpoint", evaluation_checkpoint, "--num-workers", "0",
                             "--no-progress", "--export-features", npz],
                tmp_path, f"savez_with_fault({fault}, after=20_000)")
    temporaries = list(tmp_path.glob(".feats.npz.*.tmp"))
    if fault == "sigkill":
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0  # half written
    else:
        line = _last_line(proc, 2, EVALUATE_ERROR)
        assert line == f"cannot write features file {npz}: No space left on device", line
        assert not temporaries
    if previous:
        assert npz.read_bytes() == old
    else:
        assert not npz.exists()


@pytest.mark.parametrize("writer", [
    "checkpoint",
    "features",
])
def test_files_are_fsynced_before_they_replace_the_old_one(tmp_path, monkeypatch, writer):
    """Atomic also across a power cut: the temporary's data reach the disk (``fsync``)
    before it is renamed over the file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / ("ckpt.pt" if writer == "checkpoint" else "feats.npz")
    if writer == "checkpoint":
        save_checkpoint(target, {"model": {"w": torch.randn(3)}, "epoch": 1})
    else:
        f = Features(torch.randn(4, 8), torch.arange(4), torch.zeros(4, dtype=torch.int64))
        save_features(target, "market", "synthetic", {"target": (f, f)}, {})
    renames = [e for e in events if e[0] == "replace" and e[2] == str(target)]
    assert len(renames) == 1, events
    temporary = renames[0][1]
    assert Path(temporary).parent == tmp_path and temporary != str(target)
    assert ("fsync", temporary) in events[:events.index(renames[0])], events


# ----------------------------------------------------------------------------- exact resume

def _interrupted_and_resumed(micro_config, tmp, *extra):
    """Ctrl-C after the third step (epoch 2, mid-epoch), then ``--resume``; returns the
    output folder."""
    out = tmp / "resumed"
    proc = _run("train", _two_epochs(micro_config, out, *extra), tmp,
                "around_step(3, after=lambda t: ctrl_c())")
    line = _last_line(proc, 130, TRAIN_ERROR)
    assert f"--resume {out / 'checkpoint.pt'}" in line, line
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == 3
    proc = _run("train", ["--resume", out / "checkpoint.pt"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_resume_is_exact(straight: Path, resumed: Path) -> None:
    _same_weights(straight / "final.pt", resumed / "final.pt")
    a, b = _report(straight), _report(resumed)
    for key in ("metrics", "evaluations", "attention_quality", "precision", "config"):
        if key == "config":
            a[key].pop("output_dir"), b[key].pop("output_dir")
        assert a[key] == b[key], key


def test_resume_under_amp_is_bit_for_bit(micro_config, tmp_path):
    """``--amp`` (bfloat16 autocast on a CPU with native bfloat16; forced elsewhere)."""
    amp = ["--amp"] if cpu_has_native_bf16() else ["--amp", "--amp-dtype", "bfloat16"]
    straight = tmp_path / "straight"
    uninterrupted = _Background("train", _two_epochs(micro_config, straight, *amp), tmp_path)
    try:
        resumed = _interrupted_and_resumed(micro_config, tmp_path, *amp)
    finally:
        proc = uninterrupted.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _report(straight)["precision"] == "bfloat16"
    _assert_resume_is_exact(straight, resumed)


@pytest.fixture(scope="module")
def no_augmentation(tmp_path_factory, micro_config):
    """The micro run without the random flip and shift: the only draws of the loader
    workers' own random streams."""
    path = tmp_path_factory.mktemp("no_aug") / "micro.yaml"
    config = yaml.safe_load(micro_config.read_text())
    path.write_text(yaml.safe_dump({**config, "flip_p": 0.0, "pad": 0}))
    return path


def test_resume_with_loader_workers_is_exact_but_for_their_augmentation(no_augmentation,
                                                                        tmp_path):
    """With ``--num-workers 2`` the promise excludes the workers' augmentation streams (they
    restart); everything else -- sample order of both loaders, weights, optimisers, image
    pools, schedules -- continues exactly, so without augmentation the resumed run equals
    the uninterrupted one bit for bit."""
    workers = ["--num-workers", "2"]
    straight = tmp_path / "straight"
    uninterrupted = _Background("train", _two_epochs(no_augmentation, straight, *workers),
                                tmp_path)
    try:
        resumed = _interrupted_and_resumed(no_augmentation, tmp_path, *workers)
    finally:
        proc = uninterrupted.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _report(straight)["config"]["num_workers"] == 2
    _assert_resume_is_exact(straight, resumed)


# ----------------------------------------------------------------------------- variants

def _finished(proc, out: Path, method: str) -> dict:
    """The report of a finished run, checked: exit 0, the table row, metrics in [0, 1]."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"| {method} | synthetic-source → synthetic-target |" in proc.stdout, proc.stdout
    report = _report(out)
    assert set(report["metrics"]) == set(METRIC_KEYS)
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values()), report["metrics"]
    assert f"| {method} |" in (out / "report.md").read_text()
    return report


def test_cyclegan_variant_end_to_end(micro_config, tmp_path):
    """Two stages: an attention-free translator, saved to translator.pt; the source set
    translated into translated/; a re-ID module trained on those translations only."""
    out = tmp_path / "run"
    proc = _run("train", ["--config", micro_config, "--variant", "cyclegan", "--output-dir",
                          out], tmp_path, "record_stage_data()")
    report = _finished(proc, out, "CycleGAN")
    assert (report["variant"], report["attention"], report["epochs"]) == ("cyclegan", False, 2)
    translator = load_checkpoint(out / "translator.pt")
    assert translator["epoch"] == 1 and translator["run"]["variant"] == "cyclegan"
    assert not any(k.startswith(("attention_S.", "attention_T.")) for k in translator["model"])
    count = json.loads((out / "translated" / ".complete.json").read_text())["count"]
    pngs = list((out / "translated").glob("*.png"))
    assert count == len(pngs) > 100
    stages = json.loads((tmp_path / "stage_data.json").read_text())
    assert len(stages) == 2 and stages["reid"] == [str(out / "translated")], stages
    final = load_checkpoint(out / "final.pt")
    assert (final["stage_name"], final["epoch"]) == ("reid", 2)
    assert set(final["optimizers"]) == {"reid"}


#: Records which metric loss modules the training steps call.
_RECORD_METRIC_LOSSES = """
import atexit
import edaan_fast.losses.metric as metric
called = set()
for cls in (metric.QuartetLoss, metric.TripletLoss):
    def forward(self, *args, _real=cls.forward, **kwargs):
        called.add(type(self).__name__)
        return _real(self, *args, **kwargs)
    cls.forward = forward
atexit.register(lambda: json.dump(sorted(called), open("metric_losses.json", "w")))
"""


def test_triplet_metric_loss_end_to_end(micro_config, tmp_path):
    out = tmp_path / "run"
    proc = _run("train", ["--config", micro_config, "--metric-loss", "triplet", "--output-dir",
                          out], tmp_path, _RECORD_METRIC_LOSSES)
    report = _finished(proc, out, "EDAAN with Triplet")
    assert (report["variant"], report["metric_loss"]) == ("edaan", "triplet")
    assert json.loads((tmp_path / "metric_losses.json").read_text()) == ["TripletLoss"]


def test_paper_attention_flag_sets_the_printed_setting_and_explicit_options_win(
        micro_config, tmp_path):
    defaults = RunConfig().resolve().to_dict()
    departures = {k for k, v in PAPER_ATTENTION.items() if defaults[k] != v}
    assert len(departures) >= 4  # the flag has something to restore
    out = tmp_path / "run"
    proc = _run("train", ["--config", micro_config, "--paper-attention",
                          "--attention-lr-scale", "3", "--output-dir", out], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    expected = {**PAPER_ATTENTION, "attention_lr_scale": 3.0}
    assert {k: saved[k] for k in expected} == expected
    # the explicit scale reached the optimiser: the attention nets' own group at 3 x lr
    groups = load_checkpoint(out / "final.pt")["optimizers"]["G"]["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([2e-4, 6e-4])


# ----------------------------------------------------------------------------- the table

GUARANTEES = CHECKOUT / "docs" / "guarantees.md"


def _test_names(path: Path) -> set[str]:
    """The test functions of a test file: module-level ``test_*`` and ``Test*.test_*``."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {n for n in names if n.split("::")[-1].startswith("test")}


def _exists(node: str) -> bool:
    """Whether ``node`` (``test_file.py::test_name``, maybe ``[param]``) is a test of
    ``tests/``."""
    file, _, name = node.partition("::")
    path = CHECKOUT / "tests" / file
    return bool(re.fullmatch(r"test_\w+\.py", file) and name and path.is_file()
                and name.split("[")[0] in _test_names(path))


def guarantee_rows(text: str) -> list[tuple[str, list[str]]]:
    """``(first cell, test node ids)`` of every row of every table with a "Checked by"
    column; ids are the backticked ``test_*.py::name`` of that cell, ``::name`` continuing
    the file named before it."""
    rows, column = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if column is None:
            column = cells.index("Checked by") if "Checked by" in cells else -1
            continue
        if column < 0 or set(line) <= set("|-: "):
            continue
        ids, current = [], None
        for ref in re.findall(r"`([^`]+)`", cells[column]):
            file, _, name = ref.partition("::")
            current = file or current
            ids.append(f"{current}::{name}" if name else ref)
        rows.append((cells[0], ids))
    return rows


def test_every_guarantee_names_tests_that_exist():
    text = GUARANTEES.read_text()
    rows = guarantee_rows(text)
    assert len(rows) >= 18, rows  # both tables were read
    unnamed = [guarantee for guarantee, ids in rows if not ids]
    assert not unnamed, f"docs/guarantees.md: these rows name no test: {unnamed}"
    # the rows' tests, and those the prose names (the known gaps)
    named = [(guarantee, node) for guarantee, ids in rows for node in ids]
    named += [("prose", node) for node in re.findall(r"`(test_\w+\.py::[\w\[\]-]+)`", text)]
    missing = [f"{guarantee}: {node}" for guarantee, node in named if not _exists(node)]
    assert not missing, "docs/guarantees.md names tests that do not exist: " + "; ".join(missing)


def test_the_guarantee_table_check_can_fail():
    text = ("| You can rely on | What happens | Checked by |\n|---|---|---|\n"
            "| A | a | `test_guarantees.py::test_every_guarantee_names_tests_that_exist`, "
            "`::test_no_such_test` |\n| B | b | nothing |\n\nprose\n")
    rows = guarantee_rows(text)
    assert rows == [("A", ["test_guarantees.py::test_every_guarantee_names_tests_that_exist",
                           "test_guarantees.py::test_no_such_test"]), ("B", [])]
    assert [_exists(node) for node in rows[0][1]] == [True, False]
    assert not _exists("test_guarantees.py") and not _exists("test_nowhere.py::test_x")
    assert _exists("test_trainer.py::test_phase_switch_scales_the_papers_30_of_200_epochs[200-30]")
    # a pipe escaped inside a cell does not shift the columns
    rows = guarantee_rows("| a | b \\| c | Checked by |\n|---|---|---|\n"
                          "| x \\| y | z | `t.py::u` |")
    assert rows == [("x \\| y", ["t.py::u"])]
