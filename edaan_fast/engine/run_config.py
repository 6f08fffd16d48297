"""The run configuration of ``python -m edaan_fast.train``: one typed record of everything a
training run depends on, the variants of the paper's Tables I and V as flag sets, the schedule
rule, and the data sets a run trains and is evaluated on.

A run configuration is resolved in three layers: the defaults of :class:`RunConfig` (the
paper's §IV-B settings, scaled for the ``tiny`` preset), then a YAML file (``--config``), then
the options given on the command line. :meth:`RunConfig.resolve` fills in what depends on
other fields (epochs and ``λ_cyc`` of the preset, the 30-epoch phase switch scaled to the run,
the variant's flags, the image size). The resolved record is what the run saves
(``config.yaml`` beside its outputs and ``run`` in every checkpoint), so that
:func:`source_dataset` / :func:`target_dataset` rebuild exactly the data a checkpoint was
trained and evaluated on.

Variants (each one configuration of the same trainer, not a copy of it):

=============  ===========  =========  ==========================  ============================
variant        translator   training   re-ID trains on             paper
=============  ===========  =========  ==========================  ============================
``edaan``      yes          joint      real source + ``x_ST``      EDAAN (Tables I, II, V)
``daan``       yes          2 stages   real source + translated    DAAN (Table V)
                                       set written to disk
``cyclegan``   yes, no A    2 stages   translated set only         CycleGAN baseline (Table I)
``direct``     no           1 stage    real source only            Direct Transfer (Table I)
=============  ===========  =========  ==========================  ============================

``--no-attention`` drops the attention nets of ``edaan`` and ``daan`` (Table V's "w/o
attention" rows); ``cyclegan`` and ``direct`` never have them. The ``cyclegan`` baseline is
the protocol of SPGAN and PTGAN, which EDAAN's Table I quotes: an attention-free CycleGAN
translates the labelled source set, and the re-ID model trains on the translations alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edaan_fast.data import ReIDDataset, build_dataset
from edaan_fast.data.image_check import BAD_IMAGES
from edaan_fast.losses.attention import CONSISTENCY_MODES
from edaan_fast.losses.metric import METRIC_LOSSES as METRIC_LOSS_REGISTRY

__all__ = [
    "ATTENTION_CONSISTENCY", "DATASET_CHOICES", "METRIC_LOSSES", "PAPER_ATTENTION",
    "RUN_PRESETS", "VARIANTS", "RunConfig", "RunPreset",
    "RunConfigError", "VariantFlags", "load_run_file", "phase_epochs", "source_dataset",
    "RESUMABLE_KEYS", "resume_config", "synthetic_preset", "target_dataset",
]

#: The keys of :data:`edaan_fast.data.DATASETS` (a test holds them equal).
DATASET_CHOICES = ("market1501", "dukemtmcreid", "cuhk03", "prid2011", "msmt17", "custom",
                   "synthetic")
METRIC_LOSSES = tuple(METRIC_LOSS_REGISTRY)  # the names of edaan_fast.losses.METRIC_LOSSES
LOADERS = ("torch", "dali")
AMP_DTYPES = ("auto", "bfloat16", "float16")
ATTENTION_CONSISTENCY = CONSISTENCY_MODES

#: The attention training of the paper as printed (``train --paper-attention``): the attention
#: nets share the generators' learning rate, both sides of eq. (5) learn, no mask regulariser,
#: the re-ID loss on ``x_ST`` reaches ``A_S``, and both nets freeze at the phase switch. The
#: defaults of :class:`RunConfig` depart from it where docs/attention.md measured the map
#: collapse, and refine ``A_T`` after the switch.
PAPER_ATTENTION: dict[str, Any] = {
    "attention_lr_scale": 1.0, "attention_consistency": "symmetric", "lambda_tv": 0.0,
    "lambda_area": 0.0, "reid_attention_grad": True, "attention_refine": False,
    "mask_guidance": 0.0,
}

#: The paper trains 200 epochs and switches phase after 30 (§IV-B).
PAPER_EPOCHS = 200
PAPER_PHASE_EPOCHS = 30


class RunConfigError(ValueError):
    """A run configuration (file or options) is invalid; the message says what and why."""


@dataclass(frozen=True)
class VariantFlags:
    """What a variant trains, as flags of the one trainer.

    Attributes:
        translator: a translator (``E``, ``G``, ``D``, optionally ``A``) is trained.
        end_to_end: translator and re-ID learn jointly (EDAAN); otherwise in two stages.
        reid_data: what the re-ID module trains on: ``"real+translated"``, ``"translated"`` or
            ``"real"`` (the labelled source images).
        attention: attention nets allowed (``--no-attention`` turns them off).
        method: the name of the paper's tables.
    """

    translator: bool
    end_to_end: bool
    reid_data: str
    attention: bool
    method: str


VARIANTS: dict[str, VariantFlags] = {
    "edaan": VariantFlags(True, True, "real+translated", True, "EDAAN"),
    "daan": VariantFlags(True, False, "real+translated", True, "DAAN"),
    "cyclegan": VariantFlags(True, False, "translated", False, "CycleGAN"),
    "direct": VariantFlags(False, False, "real", False, "Direct Transfer"),
}

@dataclass(frozen=True)
class RunPreset:
    """One ``--preset``: everything the name selects, in one record.

    Attributes:
        name: the option value.
        model: the network preset (a key of :data:`edaan_fast.models.MODEL_PRESETS`).
        synthetic: the embedded set's size when a domain is ``synthetic`` (a key of
            :data:`edaan_fast.data.synthetic.PRESETS`).
        epochs: default epochs (per stage for the two-stage variants).
        lambda_cyc: default ``λ_cyc``.
        phase_fraction: the phase switch as a fraction of the epochs.
        iters_per_epoch: default cap on the iterations of an epoch (one pass of the PK
            sampler when that is shorter); ``None``: one pass.
    """

    name: str
    model: str
    synthetic: str
    epochs: int
    lambda_cyc: float
    phase_fraction: float
    iters_per_epoch: int | None = None


#: The presets of a run. Epochs: the paper's 200; 40 for ``tiny``, about 5 minutes on a 2-core
#: CPU (15 PK batches per epoch on the embedded set). ``λ_cyc``: CycleGAN's 10 for ``paper``;
#: 1 for ``tiny``, where the cycle term (about 1-2 in the first epochs) then weighs as much as
#: each adversarial term rather than ten times more. Phase switch: the paper's 30 of 200; 0.3
#: for ``tiny`` (see :func:`phase_epochs`). ``small`` is the CPU recipe for real data sets:
#: ``tiny``'s networks and input size, epochs of at most 60 iterations (2,400 in all, about 20
#: minutes of EDAAN on one core) and the paper's ``λ_cyc`` of 10, which on real crops gave
#: 0.4-2.4 mAP points more than 1 (docs/attention.md, docs/training.md).
RUN_PRESETS: dict[str, RunPreset] = {
    "tiny": RunPreset("tiny", model="tiny", synthetic="tiny", epochs=40, lambda_cyc=1.0,
                      phase_fraction=0.3),
    "small": RunPreset("small", model="tiny", synthetic="tiny", epochs=40, lambda_cyc=10.0,
                       phase_fraction=0.3, iters_per_epoch=60),
    "paper": RunPreset("paper", model="paper", synthetic="paper", epochs=PAPER_EPOCHS,
                       lambda_cyc=10.0, phase_fraction=PAPER_PHASE_EPOCHS / PAPER_EPOCHS),
}


def phase_epochs(epochs: int, fraction: float = PAPER_PHASE_EPOCHS / PAPER_EPOCHS) -> int:
    """Epoch of the phase switch: ``fraction`` of the epochs, by default the paper's 30 of 200.

    ``max(1, round(fraction * epochs))`` (Python's ``round``: halves go to the even
    neighbour), so with the paper's fraction 200 -> 30, 80 -> 12, 40 -> 6, 10 -> 2, 3 -> 1.
    Before it the attention nets learn and the discriminators see whole images; from it on the
    attention nets are frozen and the discriminators see backgrounds only. The ``tiny`` preset
    uses 0.3 (12 of its 40 epochs): at the paper's fraction its attention nets would learn for
    90 iterations (the paper's 30 Market-1501 epochs are ~24,000), too few for a map of the
    person (docs/attention.md).
    """
    if epochs < 1:
        raise RunConfigError(f"epochs must be >= 1, got {epochs}")
    return max(1, round(fraction * epochs))


def synthetic_preset(run: dict[str, Any]) -> str:
    """The synthetic data set's preset for a run (``tiny`` -> 64x32 images, 60 + 40
    identities per domain; ``paper`` -> 256x128); a run dict without ``preset`` is ``tiny``
    (the default)."""
    return RUN_PRESETS[str(run.get("preset") or RunConfig.preset)].synthetic


@dataclass
class RunConfig:
    """Every setting of a training run (defaults: the paper's §IV-B, ``tiny`` preset).

    ``None`` means "resolved from other fields" (see :meth:`resolve`). Field names are the
    option names with ``_`` for ``-`` and the keys of a ``--config`` YAML file.
    """

    # what to train
    variant: str = "edaan"
    attention: bool = True
    metric_loss: str = "quartet"
    preset: str = "tiny"
    # data
    source: str = "synthetic"
    target: str = "synthetic"
    data_root: str | None = None
    source_root: str | None = None
    target_root: str | None = None
    source_person_masks: str | None = None  # mask folders scoring the attention on real data
    target_person_masks: str | None = None
    seed: int = 0
    image_size: list[int] | None = None
    # schedule (§IV-B)
    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int = 16
    num_instances: int = 4
    lr: float = 2e-4
    attention_lr_scale: float = 10.0
    attention_anneal: float = 0.0
    beta1: float = 0.5
    beta2: float = 0.999
    phase_epoch: int | None = None
    # objective (eq. 9)
    lambda_gan: float = 1.0
    lambda_cyc: float | None = None
    lambda_attn: float = 10.0
    attention_consistency: str = "real-target"
    lambda_tv: float = 0.0
    lambda_area: float = 0.0
    area_budget: float = 0.0
    mask_guidance: float = 0.0  # not in the paper: person masks of training crops (0 = off)
    binary_mask: float = 0.0
    attention_refine: bool | None = None  # None: on wherever there are two attention nets
    reid_attention_grad: bool = False
    lambda_metric: float = 1.0
    lambda_id: float = 1.0
    margin: float = 0.3
    label_smoothing: float = 0.0
    pool_size: int = 50
    # augmentation of the training images
    flip_p: float = 0.5
    pad: int = 10
    # execution
    amp: bool = False
    amp_dtype: str = "auto"
    compile: bool = False
    loader: str = "torch"
    num_workers: int | None = None
    bad_images: str = "error"  # image files that fail the check before training: stop / skip
    device: str | None = None
    # outputs
    output_dir: str = "runs/default"
    checkpoint_every: int = 10
    eval_every: int = 20
    eval_batch_size: int = 128
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    # filled in by resolve() from the variant
    end_to_end: bool | None = None
    translator: bool | None = None
    reid_data: str | None = None

    DERIVED = ("end_to_end", "translator", "reid_data")

    # ------------------------------------------------------------------ construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "run configuration") -> RunConfig:
        """A config from plain data (a YAML file, a checkpoint's ``run``); ``-`` in keys reads
        as ``_``. Unknown keys raise :class:`RunConfigError` listing the known ones."""
        if not isinstance(data, dict):
            raise RunConfigError(f"{where}: expected a mapping of option names to values, got "
                                 f"{type(data).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunConfigError(f"{where}: unknown option(s) {unknown}; known options: "
                                 f"{', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **overrides) -> RunConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples): what ``config.yaml`` and checkpoints store."""
        out = dataclasses.asdict(self)
        if out["image_size"] is not None:
            out["image_size"] = [int(v) for v in out["image_size"]]
        return out

    # ------------------------------------------------------------------ resolution

    def resolve(self) -> RunConfig:
        """Validate and fill in the derived fields; returns a new, complete config.

        Raises:
            RunConfigError: for an unknown name or an out-of-range value; the message names the
                option, what was expected and what came.
        """
        self._check_names()
        for which in ("source", "target"):  # before anything reads a folder
            data_root(self.to_dict(), which)
        flags = VARIANTS[self.variant]
        preset = RUN_PRESETS[self.preset]
        epochs = preset.epochs if self.epochs is None else self.epochs
        lambda_cyc = preset.lambda_cyc if self.lambda_cyc is None else self.lambda_cyc

        def integer(name: str, value: Any, low: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RunConfigError(f"{name} must be an integer >= {low}; got {value!r}")
            return value

        integer("epochs", epochs, 1)
        integer("batch_size", self.batch_size, 2)
        integer("num_instances", self.num_instances, 1)
        integer("seed", self.seed, 0)
        integer("pool_size", self.pool_size, 0)
        integer("pad", self.pad, 0)
        integer("checkpoint_every", self.checkpoint_every, 0)
        integer("eval_every", self.eval_every, 0)
        integer("eval_batch_size", self.eval_batch_size, 1)
        if self.iters_per_epoch is not None:
            integer("iters_per_epoch", self.iters_per_epoch, 1)
        if self.num_workers is not None:
            integer("num_workers", self.num_workers, 0)
        if self.batch_size % self.num_instances:
            raise RunConfigError(
                f"batch_size must be a multiple of num_instances (K images per identity of a PK "
                f"batch); got batch_size={self.batch_size}, num_instances={self.num_instances}")
        if self.batch_size // self.num_instances < 2:
            raise RunConfigError(
                f"a PK batch needs at least 2 identities for the metric loss; batch_size="
                f"{self.batch_size} / num_instances={self.num_instances} gives "
                f"{self.batch_size // self.num_instances}")
        phase = (phase_epochs(epochs, preset.phase_fraction) if self.phase_epoch is None
                 else self.phase_epoch)
        integer("phase_epoch", phase, 0)
        self._check_numbers(lambda_cyc)
        image_size = self.image_size
        if image_size is None:
            from edaan_fast.models import model_config

            image_size = list(model_config(preset.model).image_size)
        if (not isinstance(image_size, (list, tuple)) or len(image_size) != 2
                or not all(isinstance(v, int) and v > 0 for v in image_size)):
            raise RunConfigError(f"image_size must be [H, W] (two positive integers); got "
                                 f"{image_size!r}")
        attention = bool(self.attention and flags.attention)
        _check_model(preset.model, [int(v) for v in image_size], attention, self.model)
        shared = bool(self.model.get("shared_attention"))
        if self.attention_refine and shared:
            raise RunConfigError("attention_refine needs two attention nets (A_T learns from "
                                 "the frozen A_S); got model shared_attention: true")
        refine = attention and (not shared if self.attention_refine is None
                                else bool(self.attention_refine))
        if self.mask_guidance:
            self._check_mask_guidance(attention)
        return self.replace(
            attention=attention,
            epochs=int(epochs), lambda_cyc=float(lambda_cyc), phase_epoch=int(phase),
            image_size=[int(v) for v in image_size], end_to_end=flags.end_to_end,
            translator=flags.translator, reid_data=flags.reid_data,
            lr=float(self.lr), amp=bool(self.amp), compile=bool(self.compile),
            binary_mask=float(self.binary_mask), attention_anneal=float(self.attention_anneal),
            reid_attention_grad=bool(self.reid_attention_grad),
            attention_refine=refine, progress=bool(self.progress),
            model=dict(self.model),
        )

    def _check_names(self) -> None:
        """Every option that names something names one of its choices."""
        for name, choices in (("variant", tuple(VARIANTS)), ("metric_loss", METRIC_LOSSES),
                              ("preset", tuple(RUN_PRESETS)), ("source", DATASET_CHOICES),
                              ("target", DATASET_CHOICES), ("loader", LOADERS),
                              ("amp_dtype", AMP_DTYPES), ("bad_images", BAD_IMAGES),
                              ("attention_consistency", ATTENTION_CONSISTENCY)):
            value = getattr(self, name)
            if value not in choices:
                raise RunConfigError(f"{name} must be one of {', '.join(map(str, choices))}; "
                                     f"got {value!r}")

    def _check_numbers(self, lambda_cyc: Any) -> None:
        """Weights, rates and probabilities in range; ``model`` a mapping."""
        for name in ("lr", "attention_lr_scale", "lambda_gan", "lambda_attn", "lambda_tv",
                     "lambda_area", "mask_guidance",
                     "lambda_metric", "lambda_id", "margin", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise RunConfigError(f"{name} must be a number >= 0; got {value!r}")
        if not isinstance(lambda_cyc, (int, float)) or lambda_cyc < 0:
            raise RunConfigError(f"lambda_cyc must be a number >= 0; got {lambda_cyc!r}")
        if (isinstance(self.attention_anneal, bool)
                or not isinstance(self.attention_anneal, (int, float))
                or not 0.0 <= self.attention_anneal <= 1.0):
            raise RunConfigError(f"attention_anneal must be a number in [0, 1] (the fraction of "
                                 f"the attention phase; 0 = off); got {self.attention_anneal!r}")
        if (isinstance(self.binary_mask, bool) or not isinstance(self.binary_mask, (int, float))
                or not 0.0 <= self.binary_mask < 1.0):
            raise RunConfigError(f"binary_mask must be a number in [0, 1) (0 = the soft mask); "
                                 f"got {self.binary_mask!r}")
        for name in ("beta1", "beta2", "flip_p", "area_budget"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise RunConfigError(f"{name} must be a number in [0, 1]; got {value!r}")
        if not isinstance(self.model, dict):
            raise RunConfigError(f"model must be a mapping of ModelConfig overrides; got "
                                 f"{type(self.model).__name__}")

    def _check_mask_guidance(self, attention: bool) -> None:
        """``mask_guidance`` > 0 needs attention nets and both domains' person masks."""
        if not attention:
            raise RunConfigError(
                f"mask_guidance {self.mask_guidance} guides the attention nets, and this run has "
                f"none (variant {self.variant}{'' if self.attention else ', --no-attention'}); "
                "use variant edaan or daan with attention, or mask_guidance 0")
        missing = [f"--{w}-person-masks" for w in ("source", "target")
                   if getattr(self, f"{w}_person_masks") is None]
        if missing:
            raise RunConfigError(
                f"mask_guidance {self.mask_guidance} needs the person masks of both domains' "
                f"training crops: pass {' and '.join(missing)} (folders written by python -m "
                "edaan_fast.masks)")

    @property
    def flags(self) -> VariantFlags:
        return VARIANTS[self.variant]

    @property
    def num_identities_per_batch(self) -> int:
        """``P`` of the PK batches."""
        return self.batch_size // self.num_instances


def _check_model(model_preset: str, image_size: list[int], attention: bool,
                 overrides: dict[str, Any]) -> None:
    """The networks' own rules (:class:`~edaan_fast.models.ModelConfig`: field types, ranges,
    the smallest image size) applied to a run's ``model`` overrides and ``image_size``."""
    from edaan_fast.models import model_config

    try:
        model_config(model_preset, image_size=tuple(image_size), no_attention=not attention,
                     **overrides)
    except (TypeError, ValueError) as exc:
        raise RunConfigError(f"model configuration: {str(exc).removeprefix('ModelConfig: ')}") \
            from None


def load_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping stored in a YAML run file (``--config``); errors name the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunConfigError(f"config file {path} is not valid YAML: "
                             f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunConfigError(f"config file {path} must hold a mapping of option names to values, "
                             f"got {type(data).__name__}")
    # a config.yaml written by a run also works as input: drop what resolve() derives
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    return {k: v for k, v in data.items() if k not in RunConfig.DERIVED}


# ---------------------------------------------------------------------------------- data sets

def data_root(run: dict[str, Any], which: str) -> str | None:
    """The folder of the ``which`` (``"source"``/``"target"``) data set of a run dict: its own
    root, else ``data_root``; None for the embedded synthetic set's default cache.

    Raises:
        RunConfigError: a named (non-synthetic) data set without a folder.
    """
    name = run[which]
    root = run.get(f"{which}_root") or run.get("data_root")
    if root is None and name != "synthetic":
        raise RunConfigError(f"the {which} data set {name!r} needs a folder: pass --data-root "
                             f"(or --{which}-root)")
    return root


def _dataset(run: dict[str, Any], which: str) -> ReIDDataset:
    name = run[which]
    root = data_root(run, which)
    if name == "synthetic":
        return build_dataset("synthetic", root=root, domain=which,
                             preset=synthetic_preset(run), seed=int(run["seed"]))
    dataset = build_dataset(name, root=root)
    if not dataset.train:
        raise RunConfigError(f"the {which} data set {name!r} under {dataset.root} has no "
                             "training images; a run trains on them")
    return dataset


def source_dataset(run: dict[str, Any]) -> ReIDDataset:
    """The labelled source data set of a run (its ``train`` split is what re-ID learns from).

    ``run`` is a resolved run dict (``config.yaml`` or a checkpoint's ``run``). For
    ``synthetic``: ``build_dataset("synthetic", root=<source_root or data_root or None>,
    domain="source", preset=<run preset>, seed=run["seed"])``.
    """
    return _dataset(run, "source")


def target_dataset(run: dict[str, Any]) -> ReIDDataset:
    """The target data set of a run: its ``train`` split is the unlabelled target domain the
    translator learns, its ``query``/``gallery`` the evaluation.

    For ``synthetic``: ``build_dataset("synthetic", root=<target_root or data_root or None>,
    domain="target", preset=<run preset>, seed=run["seed"])``.
    """
    return _dataset(run, "target")


#: Options that may differ between a checkpoint's run and the run that resumes it: where and
#: how output goes, and how data are read. Everything else defines the training and must match
#: (whether the data themselves changed is the checkpoint's data digest's to say).
RESUMABLE_KEYS = frozenset({"output_dir", "progress", "num_workers", "eval_every",
                            "checkpoint_every", "eval_batch_size", "device",
                            "source_person_masks", "target_person_masks", "bad_images"})


def resume_config(checkpoint_run: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The run configuration of a resumed run: the checkpoint's, with ``overrides`` applied.

    Only :data:`RESUMABLE_KEYS` may change (plus ``resume`` itself); a different value of any
    other option raises :class:`RunConfigError` naming it, since it would change the training
    the checkpoint is part of.
    """
    base = RunConfig.from_dict({k: v for k, v in checkpoint_run.items()
                                if k not in RunConfig.DERIVED}, "checkpoint run")
    base_resolved = base.resolve().to_dict()
    changed = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key in RESUMABLE_KEYS:
            continue
        candidate = base.replace(**{key: value}).resolve().to_dict()[key]
        if candidate != base_resolved[key]:
            changed[key] = (base_resolved[key], value)
    if changed:
        detail = ", ".join(f"{k}={old!r} in the checkpoint but {new!r} given"
                           for k, (old, new) in sorted(changed.items()))
        raise RunConfigError(
            f"--resume continues the checkpoint's run; these options differ: {detail}. Only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change on resume.")
    allowed = {k.replace("-", "_"): v for k, v in overrides.items()
               if k.replace("-", "_") in RESUMABLE_KEYS}
    return base.replace(**allowed).resolve()
