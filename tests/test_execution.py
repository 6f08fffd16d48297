"""How the training step executes (edaan_fast.engine.execution): ``--compile`` for every
variant, Adam's fused kernel, the channels-last option, one host sync per step."""

from __future__ import annotations

import copy

import pytest
import torch

from edaan_fast.engine.execution import ExecutionOptions, prepare_model, to_layout
from edaan_fast.engine.run_config import RunConfig
from edaan_fast.engine.stages import Stage, build_optimizers
from edaan_fast.engine.steps import EDAANTrainStep, NonFiniteLossError
from edaan_fast.engine.trainer import Trainer, train
from edaan_fast.losses import EDAANObjective
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


# ----------------------------------------------------------------------------- host syncs


def _fused(params):
    return torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.999), fused=True)


def _count_reads(monkeypatch) -> list[str]:
    """Records every tensor -> Python read (the host syncs of a step on a GPU)."""
    reads: list[str] = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


@requires_ops
def test_a_step_with_fused_optimisers_reads_the_device_once(monkeypatch):
    """The non-finite check waits for the end of the step: one read of all terms and flags;
    with Adam's per-parameter loop it reads after each forward (two phases + the end)."""
    from tests.test_train_step import batch, make

    counts = {}
    for name, adam in (("fused", _fused), ("loop", torch.optim.Adam)):
        model, objective = make()
        step = EDAANTrainStep(model, objective)
        opts = (adam(model.generator_parameters()), adam(model.discriminator_parameters()))
        step(*batch(), *opts)  # optimiser state, lazy initialisation
        reads = _count_reads(monkeypatch)
        log = step(*batch(1), *opts)
        monkeypatch.undo()
        counts[name] = list(reads)
        assert all(torch.isfinite(torch.tensor(v)) for v in log.values()), log
    assert counts["fused"] == ["tolist"], counts
    assert len(counts["loop"]) >= 3, counts


class _InfLoss(torch.nn.Module):
    def forward(self, emb, labels):
        return emb.sum() * 0 + float("inf")


@requires_ops
def test_deferred_check_raises_and_updates_nothing():
    """With fused optimisers a non-finite term is named at the end of the step, and neither
    optimiser moved a weight or its state (they skipped on the device flag); the re-ID head's
    BatchNorm statistics are put back."""
    from tests.test_train_step import batch, make

    model, objective = make()
    step = EDAANTrainStep(model, objective)
    opts = (_fused(model.generator_parameters()), _fused(model.discriminator_parameters()))
    step(*batch(), *opts)  # a good step first: the optimisers hold state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = [copy.deepcopy(o.state_dict()) for o in opts]
    step.objective = EDAANObjective(_InfLoss())
    step.num_steps = 7
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite generator loss at training step 7: metric = inf.*"
                             r"Nothing was updated"):
        step(*batch(1), *opts)
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    for opt, state in zip(opts, states):
        now = opt.state_dict()["state"]
        for i, entry in state["state"].items():
            for key, value in entry.items():
                assert torch.equal(now[i][key], value), (i, key)
        assert not hasattr(opt, "found_inf")
