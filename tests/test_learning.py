"""Training learns what it is for: short runs on the embedded synthetic set, scored against
the untrained model of the same seed.

The other trainer tests check contracts (files, exit statuses, resume). These check that the
learning itself works, with margins of about half the gain measured on the intact code, so
that a run that reads nothing from the image or nothing from the labels fails:

- the attention maps learn the person *from the image*: ``position_auc`` (pixels compared at
  the same position only, where a fixed centred map scores exactly 0.5) rises with training;
  ROC-AUC, IoU and centre contrast alone are met by a map that reads nothing
  (docs/attention.md §8);
- the translation of eq. (1) keeps the person and changes the background;
- Direct Transfer and EDAAN raise the target mAP over the untrained evaluation, and the
  re-ID losses make the shared encoder's own features discriminative;
- the metric loss's weight ``λ_metric`` decides how far the metric loss falls;
- the final checkpoint holds the trained model: reloaded, it scores what the run reported;
- the README's command (``python -m edaan_fast.train --amp``), shortened, trains in
  bfloat16 where the CPU has it and beats its untrained evaluation.

One run per configuration (module-scoped fixtures), several checks per run: two EDAAN runs
through the command line (about 70-90 s and 45 s on 2 idle cores) and two in-process Direct
Transfer runs on one thread (5 s each). Every run is seeded, so on a given machine and thread
count it is the same run each time; the thread count (float summation order) and the CPU's
precision under ``--amp`` change the trajectory. The values in the docstrings were measured
on a 2-core AMD EPYC (AVX512-BF16, torch 2.14.1, 2026-12-05) with one and two threads and,
where ``--amp`` is involved, with the CPU's bfloat16 on and forced off (float32).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from edaan_fast.data import build_loader
from edaan_fast.data.synthetic import load_masks
from edaan_fast.engine.checkpoint import model_from_checkpoint
from edaan_fast.engine.precision import cpu_has_native_bf16
from edaan_fast.engine.run_config import RunConfig, load_run_file
from edaan_fast.engine.trainer import Trainer
from edaan_fast.evaluation.evaluator import attention_probe, evaluate_attention, evaluate_model
from edaan_fast.evaluation.report import metrics_dict
from edaan_fast.evaluation.targets import evaluate_target

from .test_trainer import MICRO_MODEL

#: Every run: no periodic evaluation or checkpoint (the end of training does both).
QUIET = {"eval_every": 0, "checkpoint_every": 0, "progress": False}


@dataclass
class Run:
    """A finished run and the scores of its model before training."""

    report: dict[str, Any]
    model: nn.Module                              # the trained model
    untrained: Trainer                            # the same run, not trained
    untrained_metrics: dict[str, float | None]    # target metrics
    untrained_encoder_map: float                  # target mAP of E_S's pooled features
    untrained_attention: dict[str, Any] | None   # Trainer.measure_attention()
    last_epoch_losses: dict[str, float] | None = None  # in-process runs: the last epoch's means


class EncoderFeatures(nn.Module):
    """The shared encoder's own pooled features (the re-ID head's input) as retrieval
    features: what the re-ID losses teach ``E_S``, without the head's embedding layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.reid(x).feature


def encoder_map(model: nn.Module, trainer: Trainer) -> float:
    """Target mAP of ``model``'s encoder features on ``trainer``'s target test split."""
    result = evaluate_model(EncoderFeatures(model), trainer.target,
                            image_size=tuple(trainer.run.image_size), batch_size=128,
                            num_workers=0)
    return float(result.mAP)


def _untrained(run: RunConfig, output_dir: Path) -> dict[str, Any]:
    """The run's model before training (the same seed draws the same weights) and its scores."""
    trainer = Trainer(run.replace(output_dir=str(output_dir)))
    return {"untrained": trainer, "untrained_metrics": trainer.evaluate(),
            "untrained_encoder_map": encoder_map(trainer.model, trainer),
            "untrained_attention": trainer.measure_attention()}


def train_in_process(tmp_path_factory, name: str, **overrides) -> Run:
    """A run in this process, on one thread: the same run whatever the machine's thread count,
    and no thread of a team spin-waiting for one that lost its core to another process (the
    command line sets ``OMP_WAIT_POLICY=PASSIVE`` for that; here torch is loaded already)."""
    folder = tmp_path_factory.mktemp(name)
    run = RunConfig(output_dir=str(folder / "run"), **QUIET, **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = _untrained(run, folder / "untrained")
        trainer = Trainer(run)
        report = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return Run(report=report, model=trainer.model, last_epoch_losses=trainer.last_epoch_losses,
               **before)


def train_command(tmp_path_factory, name: str, *options: str,
                  config: dict[str, Any] | None = None) -> Run:
    """``python -m edaan_fast.train`` as a user runs it, in a new process and a folder of its
    own (so it writes ``runs/default`` there), with ``options`` and ``config`` as a
    ``--config`` file."""
    folder = tmp_path_factory.mktemp(name)
    if config is not None:
        (folder / "short.yaml").write_text(yaml.safe_dump(config))
        options = ("--config", str(folder / "short.yaml"), *options)
    argv = [sys.executable, "-m", "edaan_fast.train", *options, "--no-progress"]
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=1200,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = folder / "runs" / "default"
    report = json.loads((out / "report.json").read_text())
    model, _ = model_from_checkpoint(out / "final.pt")
    before = _untrained(RunConfig.from_dict(load_run_file(out / "config.yaml")),
                        folder / "untrained")
    return Run(report=report, model=model, **before)


@torch.no_grad()
def translation_changes(model: nn.Module, records, image_size) -> dict[str, float]:
    """What eq. (1)'s translation ``x_ST`` changes of held-out source images, on the true
    person pixels and on the background: the mean ``|x_ST - x|`` of each (``person``,
    ``background``), their ratio, and ``passed``: the person's change as a fraction of the
    generator's, ``|x_ST - x| / |G_S(E_S(x)) - x|`` (``1 - A`` on average; 1 when the
    translation ignores the map)."""
    probe = attention_probe(records, 200)
    x = torch.cat([b.images for b in build_loader(probe, train=False, batch_size=100,
                                                  num_workers=0, image_size=image_size)])
    person = load_masks(probe) > 0.5
    was_training = model.training
    model.eval()
    s2t = model.s2t(x)
    model.train(was_training)
    change = (s2t.image.float() - x).abs().mean(dim=1, keepdim=True)
    generated = (s2t.generated.float() - x).abs().mean(dim=1, keepdim=True)
    p, b = float(change[person].mean()), float(change[~person].mean())
    return {"person": p, "background": b, "ratio": p / b,
            "passed": p / float(generated[person].mean())}


# ----------------------------------------------------------------------------- EDAAN, tiny networks

@pytest.fixture(scope="module")
def edaan(tmp_path_factory) -> Run:
    """The default run shortened to 8 epochs of 15 iterations, the attention nets learning
    throughout (``--phase-epoch 8``), in float32 on every machine (``--amp`` would train in
    bfloat16 on some CPUs and float32 on others: two trajectories to keep above the
    thresholds instead of one)."""
    return train_command(tmp_path_factory, "edaan", "--no-amp", "--epochs", "8",
                         "--phase-epoch", "8", "--eval-every", "0", "--checkpoint-every", "0")


@pytest.mark.slow
def test_attention_learns_the_person(edaan):
    """The maps start flat and end person-shaped, and what they keep is read from the image.

    Untrained: spatial std 0.07, A_S AUC 0.54 / IoU 0.21 / position AUC 0.50, A_T AUC 0.58 /
    position AUC 0.53. After the 8 epochs (one thread / two threads): A_S AUC 0.89 / 0.88,
    IoU 0.55 / 0.52, std 0.29, centre contrast +0.31 / +0.27, position AUC 0.80 / 0.79; A_T AUC
    0.80 / 0.80, std 0.28, centre contrast +0.23 / +0.27, position AUC 0.68 / 0.63. A fixed
    centred blob (docs/attention.md §8) meets every threshold here but the position AUC ones:
    AUC 0.92, IoU 0.58, std 0.28, centre contrast +0.48 on both domains, position AUC 0.50."""
    before, after = edaan.untrained_attention, edaan.report["attention_quality"]
    assert before["epoch"] == 0 and after["epoch"] == 8
    s0, t0, s1, t1 = before["A_S"], before["A_T"], after["A_S"], after["A_T"]
    assert s0["spatial_std"] < 0.1 and t0["spatial_std"] < 0.1 and s0["iou"] < 0.3  # flat start
    assert s1["spatial_std"] > 0.2 and t1["spatial_std"] > 0.2, (s1, t1)
    assert s1["auc"] > 0.8 and s1["auc"] > s0["auc"] + 0.2, (s0, s1)
    assert s1["iou"] > 0.35 and s1["iou"] > s0["iou"] + 0.15, (s0, s1)
    assert s1["centre_contrast"] > 0.15, s1
    assert t1["auc"] > 0.7 and t1["auc"] > t0["auc"] + 0.1, (t0, t1)
    assert t1["centre_contrast"] > t0["centre_contrast"] + 0.1, (t0, t1)
    # what the nets read from the image, not where the person usually stands
    assert s1["position_auc"] > 0.7 and s1["position_auc"] > s0["position_auc"] + 0.15, (s0, s1)
    assert t1["position_auc"] > 0.58 and t1["position_auc"] > t0["position_auc"] + 0.05, (t0, t1)


@pytest.mark.slow
def test_translation_keeps_the_person_and_changes_the_background(edaan):
    """Eq. (1): ``x_ST`` keeps the pixels the map keeps. On 200 held-out source images the
    person changes 0.22 / 0.24 times as much as the background (one / two threads; untrained
    1.06), and the translation passes on 0.24 / 0.27 of the generator's change of the person
    (untrained 0.53; 1 when it ignores the map)."""
    source = edaan.untrained.source
    changes = translation_changes(edaan.model, source.query + source.gallery,
                                  tuple(edaan.untrained.run.image_size))
    assert changes["passed"] < 0.38, changes
    assert changes["ratio"] < 0.5, changes


@pytest.mark.slow
def test_final_checkpoint_holds_the_trained_model(edaan):
    """``final.pt``, reloaded, scores exactly what the run reported (target metrics and
    attention), and that is not what the untrained model scores."""
    report, trainer = edaan.report, edaan.untrained
    reloaded = metrics_dict(evaluate_target(edaan.model, trainer.run.to_dict(), trainer.target,
                                            batch_size=128))
    assert reloaded == pytest.approx(report["metrics"], abs=1e-6), (reloaded, report["metrics"])
    held_out = {net: ds.query + ds.gallery
                for net, ds in (("A_S", trainer.source), ("A_T", trainer.target))}
    attention = evaluate_attention(edaan.model, held_out,
                                   image_size=tuple(trainer.run.image_size), batch_size=128)
    for net in ("A_S", "A_T"):
        assert attention[net].to_dict() == pytest.approx(report["attention_quality"][net],
                                                         abs=1e-6), net
        assert (report["attention_quality"][net]["position_auc"]
                != pytest.approx(edaan.untrained_attention[net]["position_auc"], abs=1e-3))
    assert report["metrics"] != pytest.approx(edaan.untrained_metrics, abs=1e-3)


# ----------------------------------------------------------------------------- the README command

@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> Run:
    """The README's command, ``python -m edaan_fast.train --amp``, shortened by a config file
    to 8 epochs of the micro networks of tests/test_trainer.py. Their re-ID learns faster in
    a short run than the ``tiny`` networks': those score target mAP 60.7 untrained and
    60.2-65.9 after 8 epochs (one and two threads, both precisions), within the noise."""
    return train_command(tmp_path_factory, "readme", "--amp",
                         config={"model": MICRO_MODEL, "epochs": 8, **QUIET})


@pytest.mark.slow
def test_readme_command_trains_in_bf16_where_the_cpu_has_it_and_raises_target_map(readme_run):
    """Untrained: mAP 36.7, rank-1 29.0. After the 8 epochs, bfloat16 (one / two threads):
    mAP 47.4 / 51.0, rank-1 41.0 / 46.0; float32: mAP 53.4 / 50.3, rank-1 47.0 / 41.0."""
    report = readme_run.report
    assert report["precision"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert report["variant"] == "edaan" and report["epochs"] == 8
    before, after = readme_run.untrained_metrics, report["metrics"]
    assert after["mAP"] > before["mAP"] + 0.06, (before, after)
    assert after["rank1"] > before["rank1"] + 0.06, (before, after)


@pytest.mark.slow
def test_edaan_reid_losses_train_the_shared_encoder(readme_run):
    """The re-ID losses reach ``E_S`` through the joint objective: the target mAP of its own
    pooled features rises from 61.4 to 67.4 / 74.7 (bfloat16, one / two threads) and 73.8 /
    71.8 (float32)."""
    after = encoder_map(readme_run.model, readme_run.untrained)
    assert after > readme_run.untrained_encoder_map + 0.03, (readme_run.untrained_encoder_map,
                                                           after)


# ----------------------------------------------------------------------------- Direct Transfer

@pytest.fixture(scope="module")
def direct(tmp_path_factory) -> Run:
    """Direct Transfer (source-only re-ID), 8 epochs of 15 iterations."""
    return train_in_process(tmp_path_factory, "direct", variant="direct", epochs=8)


@pytest.fixture(scope="module")
def direct_without_metric_loss(tmp_path_factory) -> Run:
    """The same run with ``λ_metric = 0``."""
    return train_in_process(tmp_path_factory, "direct-no-metric", variant="direct", epochs=8,
                            lambda_metric=0.0)


def test_direct_transfer_raises_target_map(direct):
    """Untrained: mAP 53.1, rank-1 45.0. After 8 epochs: mAP 80.0, rank-1 78.0 (77.3 and
    74.0 when the run had two threads)."""
    before, after = direct.untrained_metrics, direct.report["metrics"]
    assert after["mAP"] > before["mAP"] + 0.13, (before, after)
    assert after["rank1"] > before["rank1"] + 0.15, (before, after)


def test_reid_losses_train_the_shared_encoder(direct):
    """The re-ID losses reach ``E_S``: its own pooled features, without the head, rank the
    target better after training: mAP 71.7 untrained, 87.7 after (88.6 with two
    threads)."""
    after = encoder_map(direct.model, direct.untrained)
    assert after > direct.untrained_encoder_map + 0.08, (direct.untrained_encoder_map, after)


def test_metric_loss_weight_decides_how_far_the_metric_loss_falls(direct,
                                                                 direct_without_metric_loss):
    """The quartet loss (logged whatever its weight), mean of the last epoch: 0.33 with
    ``λ_metric = 1``, 1.25 with 0 (0.32 and 1.00 when the runs had two threads)."""
    with_metric = direct.last_epoch_losses["metric"]
    without = direct_without_metric_loss.last_epoch_losses["metric"]
    assert with_metric < without - 0.35, (with_metric, without)
