"""The training steps, both behind one call signature (:meth:`EDAANTrainStep.run_batch`):
:class:`EDAANTrainStep` is one EDAAN iteration -- the generator step, then the discriminator
step (paper §III, §IV-B) -- and :class:`ReIDStep` one re-ID-only iteration, in float32 or
under autocast.

What one call of :class:`EDAANTrainStep` does, given a labelled source batch ``(x_S, y_S)``, an
unlabelled target batch ``x_T`` and the caller's two optimisers:

1. **Generator step.** ``set_requires_grad([D_S, D_T], False)``; the attention nets get
   ``requires_grad = phase.train_attention`` (frozen, receiving no gradient, after the first 30
   epochs). Forward ``model(x_S, x_T)``, the generator terms of eq. (9)
   (:meth:`EDAANObjective.generator_losses`), backward, ``optimizer_G.step()``.
2. **Discriminator step.** ``set_requires_grad([D_S, D_T], True)``; the translations of step 1,
   detached, go through the image pools (50 images each, as CycleGAN): ``D_T`` scores real
   ``x_T`` against pooled ``x_ST``, ``D_S`` real ``x_S`` against pooled ``x_TS`` (LSGAN), on whole
   images or, with ``phase.masked_discriminator``, on backgrounds ``(1 - A(x)) * x``. The pools
   store each translation with its mask, so the phase decides at use what the discriminator sees.

The trainer owns the optimisers (and their schedule); this object owns only what a resumed run
must restore with the model: the two image pools and the grad scalers
(:meth:`state_dict` / :meth:`load_state_dict`).

Precision (``amp``): float32 by default. ``amp=True`` runs the forward passes under
``torch.autocast`` in the dtype of :func:`~edaan_fast.engine.precision.resolve_precision`:
bfloat16 on CPU and on CUDA devices that support it; float16 on older GPUs, with one
``GradScaler`` per optimiser (so a discriminator overflow does not skip the generator's update).
``amp_dtype`` forces either. The losses themselves are reduced in float32.

Non-finite rule: a NaN/inf loss term raises :class:`NonFiniteLossError` naming the step, the
phase (generator or discriminator), the term and its value, in every precision, and the step
updates nothing: a forward overflow is not something loss scaling can repair, and training on
would corrupt the weights silently. With fused optimisers in one process (the trainer's Adam,
no float16 scaler) the check costs no host synchronisation until the end of the step: each
optimiser is handed a device flag (``found_inf``, as a grad scaler does) and skips its update
when a term of its phase (or of the generator phase) is not finite; all terms come to the host
in one transfer at the end, where the error is raised and the running statistics are put back.
Otherwise (float16, DDP, unfused optimisers) every term is read after each forward pass and
*before* its backward. Under
float16 with a ``GradScaler``, non-finite *gradients* are the scaler's normal business: the
optimiser step is skipped, the scale lowered, and the result reports ``skipped_G`` /
``skipped_D`` = 1; that is not an error. In float32/bfloat16 the losses are the check (gradients
are not scanned, which would cost a pass over every parameter).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edaan_fast.losses.identity import id_loss
from edaan_fast.losses.objective import EDAANObjective
from edaan_fast.models.blocks import set_requires_grad

from .image_pool import ImagePool
from .precision import resolve_precision

__all__ = ["EDAANTrainStep", "NonFiniteLossError", "Phase", "ReIDStep"]


def _scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale as a tensor on its device (``get_scale()`` would sync)."""
    return scaler._get_scale_async()


class NonFiniteLossError(FloatingPointError):
    """A loss term came out NaN or infinite; the message names the step and the term."""


def _running_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, copy)`` of every normalisation layer's running statistics: a forward pass in
    train mode updates them before the losses can be checked (a few KB in these models). The
    layers are found once per model (a walk over every layer each step would be host work on
    the hot path); their buffers are read each time, as ``.to()`` replaces them."""
    layers = _NORM_LAYERS.get(model)
    if layers is None:
        layers = [m for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        _NORM_LAYERS[model] = layers
    return [(b, b.clone()) for m in layers for b in m.buffers()]


#: model -> its normalisation layers (weakly held: the entry goes with the model).
_NORM_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list[nn.Module]]" = \
    weakref.WeakKeyDictionary()


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)


@dataclass(frozen=True)
class Phase:
    """The two schedule flags of §IV-B.

    Attributes:
        train_attention: the attention nets learn (first 30 epochs) or are frozen.
        masked_discriminator: the discriminators see backgrounds only (after 30 epochs).
        refine_target_attention: while the attention nets are frozen, ``A_T`` still learns
            from ``target_attention_refinement`` alone (``--attention-refine``; not in the
            paper).
    """

    train_attention: bool = True
    masked_discriminator: bool = False
    refine_target_attention: bool = False

    @classmethod
    def for_epoch(cls, epoch: int, attention_epochs: int = 30,
                  whole_image_epochs: int = 30, refine: bool = False) -> "Phase":
        """The paper's schedule: 0-based ``epoch`` < 30 -> (train attention, whole images);
        ``refine`` turns on ``refine_target_attention`` once the attention nets freeze."""
        return cls(train_attention=epoch < attention_epochs,
                   masked_discriminator=epoch >= whole_image_epochs,
                   refine_target_attention=refine and epoch >= attention_epochs)


GENERATOR_TERMS = ("gan_s2t", "gan_t2s", "cycle", "attention", "smoothness", "area", "metric",
                   "id", "refine", "guide", "total")
DISCRIMINATOR_TERMS = ("d_S", "d_T", "d_total")


class EDAANTrainStep:
    """Callable training step; see the module docstring.

    Args:
        model: an :class:`edaan_fast.models.EDAAN` (discriminators included).
        objective: the :class:`edaan_fast.losses.EDAANObjective`.
        amp: run under autocast (see the module docstring for the dtype).
        amp_dtype: force ``torch.float16`` or ``torch.bfloat16``.
        pool_size: image pool size (CycleGAN: 50; 0 disables).
        seed: seed of the pools' random generators.
        init_scale: initial scale of the fp16 grad scalers (``GradScaler``'s default 2**16).
        gradient_sync: called as ``gradient_sync(optimizer)`` after each backward and before
            the optimiser (or scaler) step, e.g. the trainer's all-reduce of the gradients over
            DDP ranks; it must leave every rank with the same gradients, so that an fp16 scaler
            reaches the same skip decision everywhere.
        guide: a :class:`~edaan_fast.engine.mask_guidance.MaskGuidance`: while the attention
            nets learn (and for ``A_T`` while it refines), the generator step adds
            ``objective.weights.mask_guidance`` times their cross-entropy against person masks
            of the guide's training crops (``guide`` in the log; 0 without a guide).
    """

    def __init__(self, model: nn.Module, objective: EDAANObjective, *, amp: bool = False,
                 amp_dtype: torch.dtype | None = None, pool_size: int = 50, seed: int = 0,
                 init_scale: float = 2.0 ** 16,
                 gradient_sync: Callable[[torch.optim.Optimizer], None] | None = None,
                 guide=None):
        self.model = model
        self.guide = guide
        self.gradient_sync = gradient_sync
        self.objective = objective
        self.amp = amp
        self.amp_dtype_request = amp_dtype
        self.pool_S = ImagePool(pool_size, seed=seed)       # translations x_TS, for D_S
        self.pool_T = ImagePool(pool_size, seed=seed + 1)   # translations x_ST, for D_T
        self.scaler_G: torch.amp.GradScaler | None = None
        self.scaler_D: torch.amp.GradScaler | None = None
        self.init_scale = init_scale
        self.num_steps = 0
        self._pending_scalers: tuple | None = None

    # ------------------------------------------------------------------ helpers

    def _setup(self, device: torch.device) -> torch.dtype | None:
        dtype = resolve_precision(self.amp, self.amp_dtype_request, device)
        device_type = device.type
        if dtype == torch.float16 and self.scaler_G is None:
            self.scaler_G = torch.amp.GradScaler(device_type, init_scale=self.init_scale)
            self.scaler_D = torch.amp.GradScaler(device_type, init_scale=self.init_scale)
            if self._pending_scalers is not None:
                self.scaler_G.load_state_dict(self._pending_scalers[0])
                self.scaler_D.load_state_dict(self._pending_scalers[1])
                self._pending_scalers = None
        return dtype

    def _autocast(self, device_type: str, dtype: torch.dtype | None):
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    def _to_floats(self, which: str, names: tuple[str, ...], values: list[torch.Tensor],
                   dtype: torch.dtype | None,
                   saved: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> dict[str, float]:
        """One host sync for all terms; raises on the first non-finite one, after putting the
        ``saved`` running statistics back (the step then changed nothing of the model)."""
        floats = torch.stack([v.detach().float() for v in values]).tolist()
        self._check_finite(which, names, floats, dtype, saved)
        return dict(zip(names, floats))

    def _check_finite(self, which: str, names: tuple[str, ...], floats: list[float],
                      dtype: torch.dtype | None,
                      saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, value in zip(names, floats):
            if not math.isfinite(value):
                _restore(saved)
                precision = "float32" if dtype is None else f"autocast {dtype}"
                raise NonFiniteLossError(
                    f"non-finite {which} loss at training step {self.num_steps}: {name} = "
                    f"{value} ({precision}); all {which} terms: "
                    + ", ".join(f"{n}={v:.4g}" for n, v in zip(names, floats))
                    + ". Nothing was updated. Lower the learning rate, check the inputs, or run "
                    "without --amp to see whether the overflow is a precision problem."
                )

    def _deferred(self, *optimizers: torch.optim.Optimizer) -> bool:
        """Whether the non-finite check can wait for the end of the step (one host sync, no
        sync between the forward passes and the updates): every optimiser is fused, so it
        skips its update on a device flag (``found_inf``, as under a grad scaler), no grad
        scaler owns that flag (float16 keeps the check before each backward), and no gradient
        all-reduce would carry one process's non-finite gradients to processes whose own
        losses are finite (DDP keeps it too)."""
        return (self.scaler_G is None and self.gradient_sync is None
                and all(o.defaults.get("fused") for o in optimizers))

    @staticmethod
    def _guard(terms: torch.Tensor, optimizer: torch.optim.Optimizer,
               earlier: torch.Tensor | None = None) -> torch.Tensor:
        """Arms ``optimizer`` to skip its next step on the device when a term (or an
        ``earlier`` phase's) is not finite; returns the flag (1.0 = skip)."""
        bad = (~torch.isfinite(terms).all()).float()
        if earlier is not None:
            bad = torch.maximum(bad, earlier)
        optimizer.found_inf = bad
        return bad

    def _optimise(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None) -> bool | torch.Tensor:
        """Backward and step; returns whether the step was skipped (fp16 overflow), as a
        device flag with a scaler (no host sync here)."""
        if scaler is None:
            loss.backward()
            if self.gradient_sync is not None:
                self.gradient_sync(optimizer)
            optimizer.step()
            return False
        scaler.scale(loss).backward()
        if self.gradient_sync is not None:
            self.gradient_sync(optimizer)
        before = _scale(scaler).clone()
        scaler.step(optimizer)
        scaler.update()
        return _scale(scaler) < before  # a device flag: read with the step's log, one sync

    @staticmethod
    def _pooled(pool: ImagePool, image: torch.Tensor, mask: torch.Tensor | None):
        """Stores (image, mask) as one ``[N, C+1, H, W]`` stack; returns the pooled pair."""
        image = image.detach().float()
        if mask is None:
            return pool.query(image), None
        stacked = pool.query(torch.cat([image, mask.detach().float()], dim=1))
        return stacked[:, :-1], stacked[:, -1:]

    # ------------------------------------------------------------------ the step

    #: The step reads a target batch (the trainer's loop draws one only when it does).
    uses_target = True

    def run_batch(self, x_s: torch.Tensor, labels: torch.Tensor | None,
                  x_t: torch.Tensor | None, optimizers: dict[str, torch.optim.Optimizer],
                  phase: Phase) -> dict[str, float]:
        """The trainer's one call signature for every step; ``optimizers`` by name."""
        return self(x_s, labels, x_t, optimizers["G"], optimizers["D"], phase)

    def __call__(self, x_s: torch.Tensor, labels: torch.Tensor | None, x_t: torch.Tensor,
                 optimizer_G: torch.optim.Optimizer, optimizer_D: torch.optim.Optimizer,
                 phase: Phase = Phase()) -> dict[str, float]:
        """One generator step and one discriminator step; returns the logged terms as floats.

        Keys: ``gan_s2t, gan_t2s, cycle, attention, smoothness, area, metric, id, refine,
        guide, total``
        (generator, unweighted terms and the weighted total of eq. 9), ``d_S, d_T, d_total``
        (discriminators), and
        ``skipped_G``, ``skipped_D`` (1.0 when an fp16 GradScaler skipped that optimiser's step).

        Raises:
            NonFiniteLossError: a loss term is NaN/inf (before anything is updated).
        """
        try:
            return self._run(x_s, labels, x_t, optimizer_G, optimizer_D, phase)
        finally:  # the skip flags of the deferred check never outlive the step
            for opt in (optimizer_G, optimizer_D):
                opt.__dict__.pop("found_inf", None)

    def _run(self, x_s, labels, x_t, optimizer_G, optimizer_D, phase) -> dict[str, float]:
        model, objective = self.model, self.objective
        device_type = x_s.device.type
        dtype = self._setup(x_s.device)
        deferred = self._deferred(optimizer_G, optimizer_D)
        model.train()

        # 1. generator step: E, G, (A if training attention), re-ID head.
        set_requires_grad(model.discriminators(), False)
        set_requires_grad(model.attention_nets(), phase.train_attention)
        optimizer_G.zero_grad(set_to_none=True)
        saved = _running_stats(model)
        with self._autocast(device_type, dtype):
            out = model(x_s, x_t, with_reid=labels is not None)
            refine = phase.refine_target_attention and model.has_attention
            if refine:  # A_T learns from this term alone: it was frozen for the forward
                set_requires_grad(model.attention_T, True)
            g = objective.generator_losses(model, out, x_s, x_t, labels,
                                           phase.masked_discriminator, refine,
                                           self._guide_pairs(phase, x_s.device))
        terms_G = torch.stack([v.detach().float() for v in g.terms().values()])
        if deferred:
            bad_G = self._guard(terms_G, optimizer_G)
        else:
            self._to_floats("generator", GENERATOR_TERMS, list(terms_G), dtype, saved)
        skipped_G = self._optimise(g.total, optimizer_G, self.scaler_G)

        # 2. discriminator step on detached (pooled) translations.
        set_requires_grad(model.discriminators(), True)
        optimizer_D.zero_grad(set_to_none=True)
        masked = phase.masked_discriminator
        fake_st, mask_st = self._pooled(self.pool_T, out.s2t.image, out.s2t.attention)
        fake_ts, mask_ts = self._pooled(self.pool_S, out.t2s.image, out.t2s.attention)
        mask_real_s = out.s2t.attention  # A_S(x_S): the real source image's own foreground
        mask_real_t = out.t2s.attention  # A_T(x_T)
        saved_D = [*_running_stats(model.discriminator_S), *_running_stats(model.discriminator_T)]
        with self._autocast(device_type, dtype):
            d = objective.discriminator_losses(
                model,
                real_s=objective.discriminator_view(x_s, mask_real_s, masked),
                real_t=objective.discriminator_view(x_t, mask_real_t, masked),
                fake_st=objective.discriminator_view(fake_st, mask_st, masked),
                fake_ts=objective.discriminator_view(fake_ts, mask_ts, masked),
            )
        terms_D = torch.stack([v.detach().float() for v in d.terms().values()])
        if deferred:  # a generator failure skips the discriminators' update too
            self._guard(terms_D, optimizer_D, bad_G)
        else:
            self._to_floats("discriminator", DISCRIMINATOR_TERMS, list(terms_D), dtype, saved_D)
        skipped_D = self._optimise(d.total, optimizer_D, self.scaler_D)
        log = self._read_log(terms_G, terms_D, (skipped_G, skipped_D), deferred, dtype, saved)
        self.num_steps += 1
        return log

    def _guide_pairs(self, phase: Phase, device: torch.device) -> tuple:
        """``(map, mask)`` pairs of the mask guidance for this step: both nets while they
        learn, ``A_T`` alone while it refines, none otherwise."""
        model = self.model
        if self.guide is None or not model.has_attention or not (
                phase.train_attention or phase.refine_target_attention):
            return ()
        b = self.guide.batch(self.num_steps, device)
        pairs = [(model.attention_T(b.target), b.target_masks)]
        if phase.train_attention:
            pairs.insert(0, (model.attention_S(b.source), b.source_masks))
        return tuple(pairs)

    def _read_log(self, terms_G: torch.Tensor, terms_D: torch.Tensor, skipped: tuple,
                  deferred: bool, dtype: torch.dtype | None, saved) -> dict[str, float]:
        """The step's last host sync: every term and the skip flags in one transfer; with the
        deferred check, the non-finite rule is applied here (the optimisers skipped on the
        device, the running statistics are put back)."""
        flags = [f.float().reshape(1) if isinstance(f, torch.Tensor)
                 else terms_G.new_tensor([float(f)]) for f in skipped]
        floats = torch.cat([terms_G, terms_D, *flags]).tolist()
        n_g, n_d = len(GENERATOR_TERMS), len(DISCRIMINATOR_TERMS)
        if deferred:
            self._check_finite("generator", GENERATOR_TERMS, floats[:n_g], dtype, saved)
            self._check_finite("discriminator", DISCRIMINATOR_TERMS, floats[n_g:n_g + n_d],
                               dtype, saved)
        log = dict(zip(GENERATOR_TERMS + DISCRIMINATOR_TERMS, floats))
        log["skipped_G"], log["skipped_D"] = floats[n_g + n_d:]
        return log

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Pools, scalers and the step counter (the model and optimisers are the caller's)."""
        return {
            "num_steps": self.num_steps,
            "pool_S": self.pool_S.state_dict(),
            "pool_T": self.pool_T.state_dict(),
            "scaler_G": self.scaler_G.state_dict() if self.scaler_G is not None else None,
            "scaler_D": self.scaler_D.state_dict() if self.scaler_D is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.pool_S.load_state_dict(state["pool_S"])
        self.pool_T.load_state_dict(state["pool_T"])
        scalers = (state.get("scaler_G"), state.get("scaler_D"))
        if scalers[0] is not None:
            if self.scaler_G is not None:
                self.scaler_G.load_state_dict(scalers[0])
                self.scaler_D.load_state_dict(scalers[1])
            else:  # created lazily on the first step, when the device is known
                self._pending_scalers = scalers


class ReIDStep(EDAANTrainStep):
    """One re-ID-only iteration: ``E_S`` + re-ID head on labelled images, ``λ_id L_id +
    λ_metric L_metric`` (eq. 6-8), one optimiser.

    The re-ID stage of ``daan`` / ``cyclegan`` and the whole of ``direct``. It reuses the
    training step's autocast, grad scaler, gradient sync and non-finite check, and has no
    image pools.
    """

    TERMS = ("metric", "id", "total")

    uses_target = False

    def __init__(self, model: nn.Module, objective: EDAANObjective, **kwargs):
        super().__init__(model, objective, pool_size=0, **kwargs)

    def run_batch(self, x_s: torch.Tensor, labels: torch.Tensor | None,
                  x_t: torch.Tensor | None, optimizers: dict[str, torch.optim.Optimizer],
                  phase: Phase) -> dict[str, float]:
        return self(x_s, labels, optimizers["reid"])

    def __call__(self, x: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> dict[str, float]:
        model, objective = self.model, self.objective
        device_type = x.device.type
        dtype = self._setup(x.device)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        saved = _running_stats(model)
        with self._autocast(device_type, dtype):
            out = model.reid(x)
            ident = id_loss(out.logits, labels, objective.label_smoothing)
            metric = (objective.metric_loss(out.embedding.float(), labels).float()
                      if objective.metric_loss is not None else ident.new_zeros(()))
            total = objective.weights.id * ident + objective.weights.metric * metric
        terms = torch.stack([metric, ident, total]).detach().float()
        deferred = self._deferred(optimizer)
        if deferred:  # as EDAANTrainStep: the check waits for the step's one host sync
            self._guard(terms, optimizer)
        else:
            self._to_floats("re-ID", self.TERMS, list(terms), dtype, saved)
        try:
            skipped = self._optimise(total, optimizer, self.scaler_G)
        finally:
            optimizer.__dict__.pop("found_inf", None)
        flag = (skipped.float().reshape(1) if isinstance(skipped, torch.Tensor)
                else terms.new_tensor([float(skipped)]))
        floats = torch.cat([terms, flag]).tolist()  # the step's one host sync (deferred)
        if deferred:
            self._check_finite("re-ID", self.TERMS, floats[:3], dtype, saved)
        log = dict(zip(self.TERMS, floats[:3]))
        log["skipped_G"] = floats[3]
        self.num_steps += 1
        return log
