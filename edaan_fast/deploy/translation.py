"""The translation job behind ``python -m edaan_fast.translate``: a trained translator (EDAAN,
DAAN, CycleGAN, with or without attention) renders a whole data set in the other domain's
style and writes it in the Market-1501 layout, with the source file names, so that our reader
(:mod:`edaan_fast.data.market_layout`), torchreid and fast-reid read it as is.

Also owns which translator a checkpoint holds (:func:`load_translator`, used by the export
too): a two-stage run's re-ID checkpoint holds untrained generators, so its ``translator.pt``
is used.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from edaan_fast.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from edaan_fast.engine.precision import device_of, resolve_precision
from edaan_fast.engine.run_dir import TRANSLATOR_NAME, nearest_existing

logger = logging.getLogger("edaan_fast.translate")

__all__ = ["DIRECTIONS", "TranslateOptions", "TranslationError", "check_choice", "load_translator",
           "run_translation"]

#: ``s2t``: eq. (1), ``G`` (source images in the target style); ``t2s``: eq. (2), ``F``.
DIRECTIONS = ("s2t", "t2s")
SPLIT_CHOICES = ("train", "all")
MANIFEST = "translation.json"


class TranslationError(ValueError):
    """Bad options for a translation or an export: no translator in the checkpoint, an output
    folder holding another translation, no attention maps to save, ..."""


def load_translator(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The trained translator of a checkpoint: ``(model, checkpoint dict, path read)``.

    A checkpoint of the re-ID stage of a two-stage run (``daan``, ``cyclegan``) holds a freshly
    initialised translator; the run's ``translator.pt`` beside it is read instead.

    Raises:
        CheckpointError: the checkpoint (or that ``translator.pt``) is missing or unreadable.
        TranslationError: the run has no translator (``direct``).
    """
    from edaan_fast.engine.run_config import VARIANTS

    path = Path(path)
    ckpt = load_checkpoint(path, kind="model")
    run = ckpt.get("run") or {}
    flags = VARIANTS.get(run.get("variant"))
    if flags is not None and not flags.translator:
        raise TranslationError(f"checkpoint {path} is a {run['variant']} run, which trains a "
                               "re-ID model only and has no translator")
    reid_stage = ckpt.get("stage_name") == "reid" or int(ckpt.get("stage", 0)) >= 1
    if flags is not None and not flags.end_to_end and reid_stage:
        sibling = path.parent / TRANSLATOR_NAME
        if not sibling.is_file():
            raise CheckpointError(
                f"checkpoint {path} is the re-ID stage of a {run['variant']} run, whose "
                f"translator is untrained; its trained translator {sibling} does not exist")
        logger.info("%s is the re-ID stage of a %s run: using its translator %s", path,
                    run["variant"], sibling)
        path = sibling
        ckpt = load_checkpoint(path, kind="model")
    model, ckpt = model_from_checkpoint(ckpt, where=f"checkpoint {path}")
    return model.to(device).eval(), ckpt, path


@dataclass
class TranslateOptions:
    """Every option of a translation (the CLI's flags, same names and defaults)."""

    checkpoint: Path
    output_dir: Path
    direction: str = "s2t"
    dataset: str | None = None
    data_root: Path | None = None
    splits: str = "train"
    image_format: str = "same"
    batch_size: int = 64
    num_workers: int = 2
    amp: bool = False
    device: str | None = None
    save_masks: bool = False
    progress: bool = False


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`TranslationError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise TranslationError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def _check(opts: TranslateOptions) -> None:
    check_choice("--direction", opts.direction, DIRECTIONS)
    check_choice("--splits", opts.splits, SPLIT_CHOICES)
    for flag, value, low in (("--batch-size", opts.batch_size, 1),
                             ("--num-workers", opts.num_workers, 0)):
        if value < low:
            raise TranslationError(f"{flag} must be >= {low}, got {value}")
    out = Path(opts.output_dir)
    existing = nearest_existing(out)
    if not existing.is_dir():
        raise TranslationError(f"--output-dir {out}: {existing} is a file; expected a folder "
                               "(it is created if missing)")


def _dataset(opts: TranslateOptions, run: dict):
    """The data set to translate: ``--dataset`` (under ``--data-root``), or the run's source
    (``s2t``) or target (``t2s``) as the run read it."""
    from edaan_fast.engine.run_config import source_dataset, target_dataset

    role = "source" if opts.direction == "s2t" else "target"
    name = opts.dataset or run.get(role)
    if name is None:
        raise TranslationError(f"the checkpoint does not record its run's {role} data set: "
                               "pass --dataset and --data-root")
    if opts.dataset is not None and name != "synthetic" and opts.data_root is None:
        raise TranslationError(f"--dataset {name} needs --data-root (the data set's folder)")
    described = {**run, role: name}
    if opts.data_root is not None:
        described[f"{role}_root"] = str(opts.data_root)
    return (source_dataset if role == "source" else target_dataset)(described)


def _file_name(record, index: int, suffix: str) -> str:
    """The source's file name when it carries Market-1501/DukeMTMC-reID labels, else one that
    does (``<pid>_c<cam>s1_<index>_00``), so a Market-1501 reader parses every file."""
    from edaan_fast.data.market_layout import DUKE_PATTERN, MARKET_PATTERN

    stem = Path(record.path).stem
    if not (MARKET_PATTERN.match(stem) or DUKE_PATTERN.match(stem)):
        stem = f"{record.pid:04d}_c{record.camid + 1}s1_{index:06d}_00"
    return stem + (Path(record.path).suffix.lower() if suffix == "same" else f".{suffix}")


def _manifest(opts: TranslateOptions, translator: Path, dataset) -> dict:
    return {"translator": str(Path(translator).resolve()), "direction": opts.direction,
            "dataset": dataset.name, "root": str(dataset.root),
            "image_format": opts.image_format}


def _claim(out: Path, manifest: dict) -> None:
    """Refuse an output folder holding something else than (part of) this translation."""
    path = out / MANIFEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
        differ = [k for k, v in manifest.items() if previous.get(k) != v]
        if differ:
            there = ", ".join(f"{k} {previous.get(k)!r}" for k in differ)
            here = ", ".join(f"{k} {manifest[k]!r}" for k in differ)
            raise TranslationError(f"--output-dir {out} holds another translation ({there}; "
                                   f"this one: {here}); choose another folder")
    elif out.is_dir() and any(out.iterdir()):
        raise TranslationError(f"--output-dir {out} is not empty and holds no translation "
                               f"({MANIFEST}); choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**manifest, "complete": False}, indent=2) + "\n")


def _plan(opts: TranslateOptions, dataset, out: Path) -> list[tuple]:
    """``(split, records, destinations, mask paths or None)`` per split."""
    from edaan_fast.data.market_layout import SPLIT_DIRS

    splits = ("train",) if opts.splits == "train" else ("train", "query", "gallery")
    plan = []
    for split in splits:
        records = getattr(dataset, split)
        if not records:
            continue
        names = [_file_name(r, i, opts.image_format) for i, r in enumerate(records)]
        folder = out / SPLIT_DIRS[split]
        folder.mkdir(exist_ok=True)
        masks = None
        if opts.save_masks:
            (out / "masks" / SPLIT_DIRS[split]).mkdir(parents=True, exist_ok=True)
            masks = [out / "masks" / SPLIT_DIRS[split] / (Path(n).stem + ".png") for n in names]
        plan.append((split, records, [folder / n for n in names], masks))
    return plan


def run_translation(opts: TranslateOptions) -> dict:
    """Everything ``python -m edaan_fast.translate`` does; returns the summary written to
    ``<output-dir>/translation.json``."""
    from edaan_fast.data.translated import translation_of, write_translations

    _check(opts)
    device = device_of(opts.device, "--device", TranslationError)
    model, ckpt, translator = load_translator(opts.checkpoint, device)
    if opts.save_masks and not model.has_attention:
        raise TranslationError(f"--save-masks: {translator} is a model without attention, so "
                               "there are no masks to save")
    dataset = _dataset(opts, ckpt.get("run") or {})
    out = Path(opts.output_dir)
    manifest = _manifest(opts, translator, dataset)
    _claim(out, manifest)
    counts = {}
    for split, records, destinations, masks in _plan(opts, dataset, out):
        written = write_translations(
            translation_of(model, opts.direction), records, destinations, masks=masks,
            image_size=tuple(model.config.image_size), pixel_mean=model.config.pixel_mean,
            pixel_std=model.config.pixel_std, device=device,
            amp_dtype=resolve_precision(opts.amp, "auto", device, cpu_fallback=True),
            batch_size=opts.batch_size, num_workers=opts.num_workers, skip_existing=True,
            progress=opts.progress, desc=f"translating {split}")
        counts[split] = {"images": len(records), "written": written}
        logger.info("%s: %d images, %d translated now, %d already there", split, len(records),
                    written, len(records) - written)
    summary = {**manifest, "complete": True, "image_size": list(model.config.image_size),
               "splits": counts}
    (out / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
