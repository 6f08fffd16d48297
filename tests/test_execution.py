"""How the training step executes (edaan_fast.engine.execution): ``--compile`` for every
variant, Adam's fused kernel, the channels-last option."""

from __future__ import annotations

import pytest
import torch

from edaan_fast.engine.execution import ExecutionOptions, prepare_model, to_layout
from edaan_fast.engine.run_config import RunConfig
from edaan_fast.engine.stages import Stage, build_optimizers
from edaan_fast.engine.trainer import Trainer, train
from edaan_fast.models import build_model

from .conftest import requires_ops
from .test_trainer import micro, weights


@requires_ops
@pytest.mark.parametrize("variant, extra", [
    ("daan", {}),                     # two stages: a fresh model compiled for the re-ID stage
    ("direct", {}),                   # the re-ID step only (E_S + head)
    ("edaan", {"attention": False}),  # no attention nets
    ("cyclegan", {}),
])
def test_compile_works_for_every_variant(tmp_path, monkeypatch, variant, extra):
    """Each variant trains compiled through the phase switch (epoch 2 of 2: attention frozen,
    discriminators on backgrounds) and ends where the eager run ends. Backend ``aot_eager``:
    Dynamo's capture and AOTAutograd without inductor's minutes of C++ compilation (the
    inductor run is ``test_trainer.py``'s slow tier)."""
    real_compile = torch.nn.Module.compile
    compiled = []

    def compile_with_aot_eager(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return real_compile(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    try:
        report = train(micro(tmp_path, variant=variant, compile=True, checkpoint_every=0,
                             **extra))
    finally:
        torch._dynamo.reset()
    eager = train(micro(tmp_path, "eager", variant=variant, checkpoint_every=0, **extra))
    assert "Encoder" in compiled and "ReIDHead" in compiled, compiled
    final, reference = weights(tmp_path / "run" / "final.pt"), weights(
        tmp_path / "eager" / "final.pt")
    assert final.keys() == reference.keys()  # plain names, no "_orig_mod."
    for key in final:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    assert report["metrics"] == pytest.approx(eager["metrics"], abs=1e-4)


def test_adam_runs_as_one_fused_kernel_with_the_loops_result():
    """The trainer's optimisers are fused; one step of each from the same gradients agrees
    with Adam's per-parameter loop to float rounding."""
    run = RunConfig().resolve()
    models = [build_model("tiny", num_ids=4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused, _ = build_optimizers(Stage("joint", 1), models[0], run)
    loop, _ = build_optimizers(Stage("joint", 1), models[1], run, fused=False)
    assert all(g["fused"] for g in fused["G"].param_groups + fused["D"].param_groups)
    assert not any(g["fused"] for g in loop["G"].param_groups)
    gen = torch.Generator().manual_seed(0)
    for model in models:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        gen.manual_seed(0)
    before = [p.detach().clone() for p in models[0].parameters()]
    for opts in (fused, loop):
        opts["G"].step()
        opts["D"].step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert all(not torch.equal(a, b) for a, b in zip(models[0].parameters(), before))


def test_trainer_builds_fused_optimisers(tmp_path):
    trainer = Trainer(micro(tmp_path))
    assert all(g["fused"] for o in trainer.optimizers.values() for g in o.param_groups)


def test_channels_last_option_puts_weights_and_images_in_nhwc():
    model = prepare_model(build_model("tiny", num_ids=4), ExecutionOptions(channels_last=True))
    conv = model.encoder_S.body[0][1].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = to_layout(torch.rand(2, 3, 64, 32), ExecutionOptions(channels_last=True))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = torch.rand(2, 3, 64, 32)
    assert to_layout(plain, ExecutionOptions()) is plain
