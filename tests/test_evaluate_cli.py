"""``python -m edaan_fast.evaluate``: the default run's target, JSON and features files, the
CUHK03 and PRID2011 protocols, re-ranking, figures, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import edaan_fast.data as data_module
from edaan_fast.data import ReIDDataset, build_dataset, render
from edaan_fast.engine.checkpoint import model_config_to_dict, save_checkpoint
from edaan_fast.evaluate import build_parser, main, plan_from_dataset
from edaan_fast.evaluation.evaluator import evaluate_model
from edaan_fast.metrics.features import ReRanking, evaluate_features, load_features
from edaan_fast.models import build_model
from tests.conftest import requires_ops
from tests.test_evaluate import _numpy_market

pytestmark = requires_ops

METRIC_KEYS = {"rank1", "rank5", "rank10", "mAP", "mINP"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ERROR_PREFIX = "python -m edaan_fast.evaluate: error: "


def _run_dict(root, **overrides):
    run = {"variant": "edaan", "attention": True, "preset": "tiny", "metric_loss": "quartet",
           "source": "synthetic", "target": "synthetic",
           "data_root": None if root is None else str(root),
           "source_root": None, "target_root": None, "seed": 0, "image_size": [64, 32],
           "epochs": 1, "batch_size": 16, "amp": False, "loader": "torch"}
    run.update(overrides)
    return run


def _save(path, root, *, no_attention=False, seed=0, **run):
    torch.manual_seed(seed)
    model = build_model("tiny", no_attention=no_attention)
    save_checkpoint(path, {"model_config": model_config_to_dict(model.config),
                           "model": model.state_dict(), "epoch": 3,
                           "run": _run_dict(root, attention=not no_attention, **run)})
    return path


@pytest.fixture(scope="module")
def synthetic_cache():
    """The embedded set's default cache (``$EDAAN_FAST_DATA`` or ``~/.cache/edaan_fast``), as a
    default run uses it: rendered once, then reused by every test session. The runs below
    record ``data_root=None``, i.e. this cache."""
    render(None, "tiny", seed=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_cache):
    return _save(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", synthetic_cache)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt):
    """One evaluation of the default run's target, with JSON report and features file."""
    out = tmp_path_factory.mktemp("exported")
    rc = main(["--checkpoint", str(ckpt), "--output", str(out / "report.json"),
               "--export-features", str(out / "feats.npz"), "--num-workers", "0", "-q"])
    assert rc == 0
    return json.loads((out / "report.json").read_text()), out / "feats.npz"


def _npz_metrics(path, prefix=""):
    z = np.load(path)
    qf, gf = z[f"{prefix}query_features"].astype(np.float64), z[
        f"{prefix}gallery_features"].astype(np.float64)
    d = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    return _numpy_market(d, z[f"{prefix}query_pids"], z[f"{prefix}gallery_pids"],
                         z[f"{prefix}query_camids"], z[f"{prefix}gallery_camids"])


def _check_metrics(metrics, ref, tol=1e-6):
    assert set(metrics) == METRIC_KEYS
    for k in METRIC_KEYS:
        assert 0.0 <= metrics[k] <= 1.0
        assert metrics[k] == pytest.approx(ref[k], abs=tol), k


def _check_independent(metrics, ref):
    """Against the float64 numpy ranking: CMC exactly; AP/INP up to float32 near-ties (an
    untrained model's features lie close together, so a positive and a negative can swap)."""
    for k in ("rank1", "rank5", "rank10"):
        assert metrics[k] == pytest.approx(ref[k], abs=1e-6), k
    for k in ("mAP", "mINP"):
        assert metrics[k] == pytest.approx(ref[k], abs=1e-4), k


def test_default_target_report_matches_an_independent_ranking(exported, ckpt, synthetic_cache,
                                                              capsys):
    report, npz = exported
    assert report["checkpoint"] == str(ckpt) and report["features"] is None
    assert (report["dataset"], report["protocol"]) == ("synthetic", "market")
    assert report["method"] == "EDAAN with Quartet" and report["epoch"] == 3
    assert report["run"]["variant"] == "edaan" and report["options"]["rerank"] is None
    assert (report["num_query"], report["num_gallery"]) == (100, 110)  # tiny preset's split
    _check_independent(report["metrics"], _npz_metrics(npz))
    _, _, feats, _ = load_features(npz)
    _check_metrics(report["metrics"], evaluate_features(*feats["target"]).as_metrics(), 1e-12)
    assert report["results"]["target"] == report["metrics"]
    assert report["cmc"][0] == pytest.approx(report["metrics"]["rank1"])
    # the run's target scored the way the trainer scores it for report.json: the same numbers
    from edaan_fast.engine.checkpoint import model_from_checkpoint

    model, ckpt_dict = model_from_checkpoint(ckpt)
    target = build_dataset("synthetic", root=synthetic_cache, domain="target", preset="tiny",
                           seed=0)
    try:
        from edaan_fast.evaluation.targets import evaluate_target
    except ImportError:  # the library call the trainer's evaluation is built on
        res = evaluate_model(model, target, image_size=(64, 32), batch_size=128, num_workers=0)
    else:
        res = evaluate_target(model, ckpt_dict["run"], target)
    for k, v in res.as_metrics().items():
        assert report["metrics"][k] == pytest.approx(v, abs=1e-7), k
    # exported features evaluate to the same report without a model
    out = npz.parent / "again.json"
    assert main(["--features", str(npz), "--output", str(out), "-q"]) == 0
    again = json.loads(out.read_text())
    assert again["metrics"] == report["metrics"] and again["features"] == str(npz)
    assert again["method"] == "EDAAN with Quartet"
    table = capsys.readouterr().out
    assert "synthetic-source → synthetic-target (market protocol" in table
    assert "Method             |   R-1 |   R-5 |  R-10 |   mAP |  mINP" in table
    r1 = f"{100 * report['metrics']['rank1']:5.1f}"
    assert f"EDAAN with Quartet | {r1} |" in table


def test_rerank_and_metric_options_reach_the_ranking(exported, tmp_path):
    _, npz = exported
    out = tmp_path / "rr.json"
    assert main(["--features", str(npz), "--rerank", "--k1", "5", "--k2", "2",
                 "--lambda-value", "0.2", "--output", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert report["options"]["rerank"] == {"k1": 5, "k2": 2, "lambda_value": 0.2}
    _, _, feats, _ = load_features(npz)
    q, g = feats["target"]
    ref = evaluate_features(q, g, rerank=ReRanking(5, 2, 0.2)).as_metrics()
    _check_metrics(report["metrics"], ref)
    plain = evaluate_features(q, g).as_metrics()
    assert report["metrics"] != pytest.approx(plain)
    assert main(["--features", str(npz), "--metric", "cosine", "--output", str(out), "-q"]) == 0
    cos = evaluate_features(q, g, metric="cosine").as_metrics()
    _check_metrics(json.loads(out.read_text())["metrics"], cos)


def _fake_datasets(synthetic_cache, calls):
    """build_dataset stand-in: CUHK03 / PRID2011 shaped splits made of synthetic images."""
    target = build_dataset("synthetic", root=synthetic_cache, domain="target", preset="tiny",
                           seed=0)
    test = target.query + target.gallery

    def fake(name, root=None, **kwargs):
        calls.append((name, kwargs))
        if name == "cuhk03":  # classic: query = gallery = the test images
            return ReIDDataset("cuhk03", root, [], test, list(test), info=dict(kwargs))
        if name == "prid2011":
            a = [r for r in test if r.camid == 0]
            b = [r for r in test if r.camid == 1]
            q, g = (a, b) if kwargs["direction"] == "a2b" else (b, a)
            return ReIDDataset("prid2011", root, [], q, g, info=dict(kwargs))
        return build_dataset(name, root, **kwargs)

    return fake


def test_prid2011_both_directions_through_the_cli(ckpt, synthetic_cache, tmp_path, monkeypatch,
                                                  capsys):
    calls = []
    monkeypatch.setattr(data_module, "build_dataset", _fake_datasets(synthetic_cache, calls))
    out, npz = tmp_path / "prid.json", tmp_path / "prid.npz"
    assert main(["--checkpoint", str(ckpt), "--dataset", "prid2011", "--data-root",
                 str(tmp_path), "--prid-split-seed", "4", "--output", str(out),
                 "--export-features", str(npz), "--num-workers", "0", "-q"]) == 0
    assert [(n, k["direction"], k["seed"]) for n, k in calls if n == "prid2011"] == [
        ("prid2011", "a2b", 4), ("prid2011", "b2a", 4)]
    report = json.loads(out.read_text())
    assert report["protocol"] == "prid2011" and set(report["results"]) == {"a2b", "b2a", "mean"}
    _, _, feats, _ = load_features(npz)
    for direction in ("a2b", "b2a"):
        _check_independent(report["results"][direction], _npz_metrics(npz, f"{direction}_"))
        _check_metrics(report["results"][direction],
                       evaluate_features(*feats[direction]).as_metrics(), 1e-12)
    for k in METRIC_KEYS:
        assert report["metrics"][k] == pytest.approx(
            (report["results"]["a2b"][k] + report["results"]["b2a"][k]) / 2)
    table = capsys.readouterr().out
    for row in ("EDAAN with Quartet cam1/cam2", "EDAAN with Quartet cam2/cam1",
                "EDAAN with Quartet mean"):
        assert row in table


def test_cuhk03_protocols_through_the_cli(ckpt, synthetic_cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data_module, "build_dataset", _fake_datasets(synthetic_cache, calls))
    out, npz = tmp_path / "c.json", tmp_path / "c.npz"
    assert main(["--checkpoint", str(ckpt), "--dataset", "cuhk03", "--data-root", str(tmp_path),
                 "--cuhk03-repeats", "3", "--seed", "2", "--output", str(out),
                 "--export-features", str(npz), "--num-workers", "0", "-q"]) == 0
    assert calls[-1] == ("cuhk03", {"protocol": "classic", "split_id": 0,
                                    "image_type": "detected"})
    report = json.loads(out.read_text())
    assert report["protocol"] == "cuhk03" and report["options"]["cuhk03_repeats"] == 3
    _, _, feats, _ = load_features(npz)
    assert torch.equal(feats["target"][0].features, feats["target"][1].features)  # read once
    ref = evaluate_features(*feats["target"], "cuhk03", repeats=3, seed=2).as_metrics()
    _check_metrics(report["metrics"], ref)
    # 767/700: the single-query protocol, split options passed to the reader
    args = build_parser().parse_args(["--dataset", "cuhk03", "--data-root", str(tmp_path),
                                      "--cuhk03-protocol", "new", "--cuhk03-image-type",
                                      "labeled"])
    plan = plan_from_dataset(args, {})
    assert plan.protocol == "market"
    assert calls[-1] == ("cuhk03", {"protocol": "new", "split_id": 0, "image_type": "labeled"})


def _png_shape(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    Image.open(path).verify()
    return np.asarray(Image.open(path).convert("RGB")).shape


def test_figures(ckpt, synthetic_cache, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    other = _save(tmp_path / "noattn.pt", synthetic_cache, no_attention=True, seed=1)
    figs, out = tmp_path / "figs", tmp_path / "f.json"
    assert main(["--checkpoint", str(ckpt), "--figures", str(figs), "--compare-checkpoint",
                 str(other), "--figure-queries", "3", "--figure-images", "2", "--output",
                 str(out), "--num-workers", "0", "-q"]) == 0
    report = json.loads(out.read_text())
    names = sorted(p.split("/")[-1] for p in report["figures"])
    assert names == sorted(p.name for p in figs.iterdir()) == [
        "attention_source.png", "attention_target.png", "rank_list.png",
        "rank_list_compare.png", "translation_s2t.png", "translation_t2s.png", "tsne.png",
        "tsne_compare.png"]
    row = 20 + 128 + 2 * 4  # labels + 128 x 64 cells with 4-pixel frames
    assert _png_shape(figs / "rank_list.png") == (3 * row + 2 * 8, 11 * 72 + 16 + 9 * 4, 3)
    # 64 x 32 inputs are shown 3x enlarged (192 x 96): 4 columns / 3 columns, 2 rows
    # image, attention, foreground, background and the true person (synthetic masks)
    assert _png_shape(figs / "attention_target.png") == (20 + 2 * 192 + 4, 5 * 96 + 4 * 4, 3)
    assert _png_shape(figs / "attention_source.png") == (20 + 2 * 192 + 4, 5 * 96 + 4 * 4, 3)
    assert _png_shape(figs / "translation_s2t.png") == (20 + 2 * 192 + 4, 3 * 96 + 2 * 4, 3)
    assert _png_shape(figs / "tsne.png") == (800, 800, 3)


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    return lines[0][len(ERROR_PREFIX):]


def test_bad_checkpoints(ckpt, tmp_path, capsys):
    assert "nope.pt does not exist" in _error(capsys, ["--checkpoint", str(tmp_path / "nope.pt")])
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert "is truncated, corrupt or not a torch file" in _error(capsys, ["--checkpoint",
                                                                          str(cut)])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, foreign)
    msg = _error(capsys, ["--checkpoint", str(foreign)])
    assert "is not an edaan_fast checkpoint" in msg and "'state_dict'" in msg


@pytest.mark.parametrize("flags, message", [
    (["--expect-variant", "daan"], "is from a variant 'edaan' run, expected variant 'daan'"),
    (["--expect-preset", "paper"], "is from a preset 'tiny' run, expected preset 'paper'"),
    (["--no-expect-attention"], "is a model with attention, expected one without attention"),
])
def test_checkpoint_of_another_kind(ckpt, capsys, flags, message):
    assert message in _error(capsys, ["--checkpoint", str(ckpt), *flags])


def test_dataset_without_query_split(ckpt, tmp_path, capsys):
    root = tmp_path / "market"
    for split in ("bounding_box_train", "bounding_box_test", "query"):
        (root / split).mkdir(parents=True)
    for split in ("bounding_box_train", "bounding_box_test"):
        Image.new("RGB", (8, 16)).save(root / split / "0002_c1s1_000451_03.jpg")
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--dataset", "market1501", "--data-root",
                          str(root)])
    assert f"no images (.jpg/.png) in {root / 'query'}" in msg and "expected layout" in msg


def test_bad_features_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.arange(5)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, query_features=rng.normal(size=(5, 64)), query_pids=ids,
             query_camids=ids * 0, gallery_features=rng.normal(size=(5, 32)), gallery_pids=ids,
             gallery_camids=ids * 0 + 1)
    msg = _error(capsys, ["--features", str(mismatch)])
    assert msg.startswith(f"features file {mismatch}: ") and "(64 vs 32) must match" in msg
    no_query = tmp_path / "gallery_only.npz"
    np.savez(no_query, gallery_features=rng.normal(size=(5, 8)), gallery_pids=ids,
             gallery_camids=ids)
    assert "has no query split: expected arrays query_features" in _error(
        capsys, ["--features", str(no_query)])
    strangers = tmp_path / "strangers.npz"
    np.savez(strangers, query_features=rng.normal(size=(5, 8)), query_pids=ids,
             query_camids=ids * 0, gallery_features=rng.normal(size=(5, 8)),
             gallery_pids=ids + 10, gallery_camids=ids * 0 + 1)
    assert "no query has a positive in the gallery" in _error(capsys, ["--features",
                                                                       str(strangers)])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    assert "cannot be read as .npz" in _error(capsys, ["--features", str(junk)])
    assert "give exactly one of --checkpoint" in _error(capsys, ["--features", str(junk),
                                                                 "--checkpoint", str(junk)])


def test_cli_process_reports_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "run" / "ckpt.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"\x80\x04truncated")
    proc = subprocess.run([sys.executable, "-m", "edaan_fast.evaluate", "--checkpoint", str(bad)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"{ERROR_PREFIX}checkpoint {bad} cannot be read")


# ----------------------------------------------------------------------------- bad input, as
# a user meets it: a separate process, exit status 2 and one line on stderr


def _evaluate(argv):
    return subprocess.run([sys.executable, "-m", "edaan_fast.evaluate", *argv],
                          capture_output=True, text=True, timeout=300, check=False)


def _process_error(argv) -> str:
    proc = _evaluate(argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), proc.stderr[-3000:]
    return lines[0][len(ERROR_PREFIX):]


def _features_file(path, q_features=None, q_pids=None):
    rng = np.random.default_rng(0)
    ids = np.arange(5)
    np.savez(path, query_features=rng.normal(size=(5, 8)) if q_features is None else q_features,
             query_pids=ids if q_pids is None else q_pids, query_camids=ids * 0,
             gallery_features=rng.normal(size=(5, 8)), gallery_pids=ids,
             gallery_camids=ids * 0 + 1)
    return path


def test_output_paths_that_cannot_be_written(ckpt, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    msg = _process_error(["--checkpoint", str(ckpt), "--output", str(tmp_path)])
    assert msg == f"--output {tmp_path} is a folder; expected a file path"
    msg = _process_error(["--checkpoint", str(ckpt), "--export-features",
                          str(a_file / "feats.npz")])
    assert msg == (f"--export-features {a_file / 'feats.npz'}: {a_file} is a file, so nothing "
                   "can be written under it")
    msg = _process_error(["--checkpoint", str(ckpt), "--data-root", str(a_file)])
    assert f"the data root {a_file} is a file; expected a folder" in msg


def test_bad_features_files_through_a_process(tmp_path):
    npy = tmp_path / "feats.npy"
    np.save(npy, np.zeros((5, 8)))
    assert _process_error(["--features", str(npy)]).startswith(
        f"features file {npy} is a single .npy array; expected an .npz archive")
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _process_error(["--features", str(noise)])
    assert msg.startswith(f"features file {noise} cannot be read as .npz: it is not a zip "
                          "archive") and "pickle" not in msg
    no_columns = _features_file(tmp_path / "empty_dim.npz", q_features=np.zeros((5, 0)))
    assert "query_features must be [N, D] with D >= 1, got shape [5, 0]" in _process_error(
        ["--features", str(no_columns)])
    pids_2d = _features_file(tmp_path / "pids_2d.npz", q_pids=np.arange(5).reshape(5, 1))
    assert ("query_pids must be 1-D with one id per row of query_features ([5]), got shape "
            "[5, 1]") in _process_error(["--features", str(pids_2d)])
    q = np.random.default_rng(1).normal(size=(5, 8))
    q[3, 2] = np.inf
    infinite = _features_file(tmp_path / "inf.npz", q_features=q)
    msg = _process_error(["--features", str(infinite)])
    assert "qf holds infinite values (row 3 of 5); features must be finite" in msg
    assert "NaN" not in msg


def test_checkpoint_with_a_bad_model_config(tmp_path):
    model = build_model("tiny")
    config = model_config_to_dict(model.config)
    config["gen_width"] = "16"
    bad = save_checkpoint(tmp_path / "bad.pt", {"model_config": config,
                                                "model": model.state_dict(), "epoch": 1,
                                                "run": _run_dict(None)})
    assert _process_error(["--checkpoint", str(bad)]) == (
        f"checkpoint {bad}: bad model_config: gen_width must be an integer >= 1; got '16'")
    run_text = save_checkpoint(tmp_path / "run_text.pt", {
        "model_config": model_config_to_dict(model.config), "model": model.state_dict(),
        "run": "edaan"})
    assert _process_error(["--checkpoint", str(run_text)]) == (
        f"checkpoint {run_text}: entry 'run' must be a dict (the run configuration); got str "
        "'edaan'")


def test_expect_preset_offers_every_training_preset():
    """``evaluate`` keeps its own list (it does not import the trainer); it must name them all."""
    from edaan_fast.engine.run_config import RUN_PRESETS
    from edaan_fast.evaluate import build_parser
    action = next(a for a in build_parser()._actions if "--expect-preset" in a.option_strings)
    assert tuple(action.choices) == tuple(RUN_PRESETS)
