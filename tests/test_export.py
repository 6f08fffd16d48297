"""``python -m edaan_fast.export``: the re-ID model and the translator as ONNX (checked with
onnxruntime against PyTorch on synthetic and real images; ``mask_blend`` as standard
operators) and as ``torch.export`` programs, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edaan_fast.deploy.export import ReIDGraph, TranslatorGraph
from edaan_fast.engine.checkpoint import (
    model_config_to_dict,
    model_from_checkpoint,
    save_checkpoint,
)
from edaan_fast.export import main
from edaan_fast.models import build_model
from tests.conftest import requires_ops
from tests.oracles import market_mini
from tests.test_evaluate_cli import _run_dict, _save

pytestmark = requires_ops
ERROR_PREFIX = "python -m edaan_fast.export: error: "
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("export") / "ckpt.pt", None, seed=11)


def _images(model, n: int, seed: int) -> torch.Tensor:
    """Synthetic normalised images: smooth random pictures, the range real images have."""
    h, w = model.config.image_size
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, h // 8, w // 8, generator=g)
    pixels = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _real_images(ckpt, n: int = 7):
    root = market_mini()
    if root is None:
        return None
    from edaan_fast import FeatureExtractor

    files = sorted((root / "Market-1501-v15.09.15" / "query").glob("*.jpg"))[:n]
    return FeatureExtractor(ckpt, device="cpu").preprocess([str(f) for f in files])


def _needs_onnx():
    """Skip without the ``export`` extra (onnx, onnxscript) and onnxruntime."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, exc_type=ImportError)


def _export(ckpt, out, what, fmt, *flags):
    assert main(["--checkpoint", str(ckpt), "--what", what, "--format", fmt, str(out), "-q",
                 *flags]) == 0
    assert out.is_file()
    return out


def _onnx_run(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _graph(ckpt, what, direction="s2t"):
    model, _ = model_from_checkpoint(ckpt)
    return model, (ReIDGraph(model) if what == "reid" else TranslatorGraph(model, direction))


@pytest.mark.parametrize("what,direction", [("reid", "s2t"), ("translator", "s2t"),
                                            ("translator", "t2s")])
def test_onnx_matches_pytorch(ckpt, tmp_path, what, direction):
    _needs_onnx()
    import onnx

    out = _export(ckpt, tmp_path / "m.onnx", what, "onnx", "--direction", direction)
    model, graph = _graph(ckpt, what, direction)
    batches = [_images(model, 5, seed=1), _images(model, 1, seed=2)]  # not the export's batch
    real = _real_images(ckpt)
    if real is not None:
        batches.append(real)
    for x in batches:
        with torch.no_grad():
            ref = graph(x)
        got = _onnx_run(out, x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, **TOL)
    # only standard operators: mask_blend became Mul/Sub/Add
    nodes = onnx.load(str(out)).graph.node
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}
    ops = {n.op_type for n in nodes}
    if what == "translator":
        assert {"Mul", "Sub", "Add", "Sigmoid"} <= ops
    # the graph computes the model: another model's weights give other outputs
    other = build_model("tiny")
    with torch.no_grad():
        far = (ReIDGraph(other) if what == "reid" else TranslatorGraph(other, direction))(
            batches[0])
    assert (far - _onnx_run(out, batches[0])).abs().max() > 1e-2


def test_onnx_translator_without_attention(tmp_path):
    _needs_onnx()
    path = _save(tmp_path / "noattn.pt", None, no_attention=True, seed=4)
    out = _export(path, tmp_path / "t.onnx", "translator", "onnx")
    model, graph = _graph(path, "translator")
    x = _images(model, 3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(_onnx_run(out, x), graph(x), **TOL)


@pytest.mark.parametrize("what", ["reid", "translator"])
def test_exported_program_matches(ckpt, tmp_path, what):
    out = _export(ckpt, tmp_path / "m.pt2", what, "exported-program")
    module = torch.export.load(str(out)).module()
    model, graph = _graph(ckpt, what)
    for x in (_images(model, 4, seed=6), _images(model, 1, seed=7)):
        with torch.no_grad():
            torch.testing.assert_close(module(x), graph(x), atol=1e-6, rtol=1e-5)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1, err
    return err[len(ERROR_PREFIX):]


def _two_stage(folder, variant="daan", stage=1, seed=0):
    torch.manual_seed(seed)
    model = build_model("tiny")
    state = {"model_config": model_config_to_dict(model.config), "model": model.state_dict(),
             "epoch": 2, "run": _run_dict(None, variant=variant)}
    if stage is not None:
        state["stage"] = stage
    return save_checkpoint(folder, state), model


def test_errors(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt2"
    ep = ["--format", "exported-program"]  # needs no extra
    assert "does not exist" in _error(capsys, ["--checkpoint", str(tmp_path / "no.pt"), *ep,
                                               str(out)])
    direct = _save(tmp_path / "direct.pt", None, variant="direct")
    msg = _error(capsys, ["--checkpoint", str(direct), "--what", "translator", *ep, str(out)])
    assert "direct run, which trains a re-ID model only" in msg
    _export(ckpt, out, "reid", "exported-program")
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--format", "exported-program", str(out)])
    assert "exists; pass --overwrite" in msg
    msg = _error(capsys, ["--checkpoint", str(ckpt), *ep, str(tmp_path / "no" / "m.pt2")])
    assert "does not exist" in msg and str(tmp_path / "no") in msg
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    msg = _error(capsys, ["--checkpoint", str(ckpt), str(tmp_path / "m.onnx")])
    assert 'pip install "edaan_fast[export]"' in msg


def test_two_stage_checkpoint_uses_its_translator(tmp_path, capsys):
    run = tmp_path / "daan"
    final, _ = _two_stage(run / "final.pt", stage=1, seed=0)
    msg = _error(capsys, ["--checkpoint", str(final), "--what", "translator", "--format",
                          "exported-program", str(tmp_path / "t.pt2")])
    assert "re-ID stage of a daan run" in msg and "translator.pt does not exist" in msg
    _, trained = _two_stage(run / "translator.pt", stage=None, seed=1)
    out = _export(final, tmp_path / "t.pt2", "translator", "exported-program")
    x = _images(trained, 2, seed=3)
    with torch.no_grad():
        ref = TranslatorGraph(trained.eval())(x)
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), ref)
        untrained = TranslatorGraph(model_from_checkpoint(final)[0])(x)
    assert (untrained - ref).abs().max() > 1e-2


def test_process_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edaan_fast.export", "--checkpoint",
                           str(tmp_path / "missing.pt"), "--format", "exported-program",
                           str(tmp_path / "m.pt2")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{ERROR_PREFIX}checkpoint {tmp_path / 'missing.pt'} does not exist"]


def test_batch_size_is_dynamic_in_onnx(ckpt, tmp_path):
    _needs_onnx()
    out = _export(ckpt, tmp_path / "r.onnx", "reid", "onnx")
    model, graph = _graph(ckpt, "reid")
    x = _images(model, 9, seed=8)
    got = _onnx_run(out, x)
    assert got.shape == (9, model.config.embedding_dim)
    np.testing.assert_allclose(got[4:5].numpy(), _onnx_run(out, x[4:5]).numpy(), atol=1e-5)
