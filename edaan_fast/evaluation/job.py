"""The evaluation job behind ``python -m edaan_fast.evaluate``: typed options in, a report out.

:func:`run_evaluation` loads a checkpoint (or a features file), resolves the evaluation plan
(:mod:`.targets`, the same plan the trainer reports with), extracts and optionally exports the
features, ranks them (:mod:`edaan_fast.metrics`), prints the table, draws the figures
(:mod:`.figures`) and returns (and optionally writes) the report. The CLI only parses.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edaan_fast.data import Record
from edaan_fast.data.person_masks import read_manifest
from edaan_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint
from edaan_fast.engine.precision import device_of
from edaan_fast.engine.run_dir import nearest_existing
from edaan_fast.metrics.features import (
    PRID_TASKS,
    EvaluationError,
    ReRanking,
    distance_matrix,
    evaluate_tasks,
    load_features,
    save_features,
)
from edaan_fast.metrics.protocols import format_table

from .evaluator import evaluate_attention
from .figures import Compared, require_viz, write_figures
from .report import DATASET_NAMES, method_name
from .targets import Plan, TargetOptions, extract_plan, plan_target

logger = logging.getLogger("edaan_fast.evaluate")

__all__ = ["EvaluateOptions", "run_evaluation", "validate"]

TABLE_COLUMNS = ("R-1", "R-5", "R-10", "mAP", "mINP")


@dataclass
class EvaluateOptions:
    """Every option of an evaluation (the CLI's flags, same names and defaults)."""

    checkpoint: Path | None = None
    features: Path | None = None
    dataset: str | None = None
    data_root: Path | None = None
    protocol: str | None = None
    amp: bool = False
    loader: str | None = None
    flip: bool = False
    batch_size: int = 128
    num_workers: int = 2
    device: str | None = None
    metric: str = "euclidean"
    max_rank: int = 50
    cuhk03_protocol: str | None = None
    cuhk03_split_id: int | None = None
    cuhk03_image_type: str | None = None
    cuhk03_repeats: int = 10
    seed: int = 0
    prid_split_seed: int | None = None
    synthetic_preset: str | None = None
    synthetic_seed: int | None = None
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    output: Path | None = None
    export_features: Path | None = None
    figures: Path | None = None
    compare_checkpoint: Path | None = None
    figure_queries: int = 5
    figure_images: int = 6
    name: str | None = None
    expect_variant: str | None = None
    expect_preset: str | None = None
    expect_attention: bool | None = None
    person_masks: Path | None = None
    attention_domain: str = "target"
    progress: bool = False

    @property
    def target(self) -> TargetOptions:
        return TargetOptions(self.dataset, self.data_root, self.synthetic_preset,
                             self.synthetic_seed, self.cuhk03_protocol, self.cuhk03_split_id,
                             self.cuhk03_image_type, self.prid_split_seed)

    @property
    def reranking(self) -> ReRanking | None:
        return ReRanking(self.k1, self.k2, self.lambda_value) if self.rerank else None


@dataclass
class _Scored:
    """What is ranked: the protocol, the data set, the feature pairs and where they came from."""

    protocol: str
    dataset: str
    features: dict
    run: dict
    label: str
    info: dict = field(default_factory=dict)
    model: Any = None
    ckpt: dict | None = None
    extract: dict = field(default_factory=dict)
    plan: Plan | None = None
    seconds: dict = field(default_factory=dict)
    compare: tuple | None = None  # (model, run) of --compare-checkpoint


def table_rows(protocol: str, results: dict, label: str) -> dict:
    """The printed table's rows: one per task (PRID2011: both directions and their mean)."""
    if protocol == "prid2011":
        rows = {f"{label} {shown}": results[task] for task, shown in PRID_TASKS}
        rows[f"{label} mean"] = results["mean"]
        return rows
    return {label: results["target"]}


def _title(plan_dataset: str, protocol: str, run: dict, features: dict,
           opts: EvaluateOptions) -> str:
    def shown(name: str, domain: str) -> str:
        return f"synthetic-{domain}" if name == "synthetic" else DATASET_NAMES.get(name, name)

    source = run.get("source")
    target = shown(plan_dataset, "target")
    arrow = f"{shown(source, 'source')} → {target}" if source else target
    what = {"market": "single query", "prid2011": "single shot, both directions",
            "cuhk03": f"single-gallery-shot CMC, {opts.cuhk03_repeats} draws"}[protocol]
    sizes = ", ".join(f"{len(q)} query / {len(g)} gallery" for q, g in features.values())
    extra = " + k-reciprocal re-ranking" if opts.rerank else ""
    return f"{arrow} ({protocol} protocol: {what}{extra}; {sizes})"


def write_json(path: Path, data: dict) -> Path:
    """``data`` as indented JSON at ``path`` (NaN refused: write ``None`` instead)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise EvaluationError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _check_output(flag: str, path: Path | None, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder
    is wanted or the reverse, or a path under a file."""
    if path is None:
        return
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise EvaluationError(f"{flag} {path} is a file; expected a folder (it is created "
                                  "if missing)")
        if not folder and path.is_dir():
            raise EvaluationError(f"{flag} {path} is a folder; expected a file path")
        return
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise EvaluationError(f"{flag} {path}: {parent} is a file, so nothing can be written "
                              "under it")


def _check_expectations(path: Path, run: dict, opts: EvaluateOptions) -> None:
    for flag, key, want in (("--expect-variant", "variant", opts.expect_variant),
                            ("--expect-preset", "preset", opts.expect_preset),
                            ("--expect-attention", "attention", opts.expect_attention)):
        if want is None:
            continue
        if not run or key not in run:
            raise EvaluationError(f"checkpoint {path} does not record its run's {key}, so it "
                                  f"cannot be checked against {flag} {want}")
        if run[key] != want:
            if key == "attention":
                want_s = "with attention" if want else "without attention"
                got_s = "with attention" if run[key] else "without attention"
                raise EvaluationError(f"checkpoint {path} is a model {got_s}, expected one "
                                      f"{want_s} (--expect-attention)")
            raise EvaluationError(f"checkpoint {path} is from a {key} {run[key]!r} run, expected "
                                  f"{key} {want!r} ({flag})")


def read_checkpoint(path: Path) -> dict:
    """:func:`~edaan_fast.engine.checkpoint.load_checkpoint` of a model checkpoint, quiet
    (torch's notes about pickle protocols are not the user's business)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_checkpoint(path, kind="model")


def _load_model(path: Path, opts: EvaluateOptions, device):
    ckpt = read_checkpoint(path)
    run = ckpt.get("run") or {}
    _check_expectations(path, run, opts)
    model, ckpt = model_from_checkpoint(ckpt, where=f"checkpoint {path}")
    return model.to(device).eval(), ckpt, run


def _loader(opts: EvaluateOptions, run: dict) -> str:
    from edaan_fast.data import dali_available

    if opts.loader is not None:
        if opts.loader == "dali" and not dali_available():
            raise EvaluationError("--loader dali: NVIDIA DALI is not installed "
                                  "(pip install 'edaan_fast[dali]'); use --loader torch")
        return opts.loader
    wanted = run.get("loader", "torch")
    if wanted == "dali" and not dali_available():
        logger.warning("the run used the DALI loader, which is not installed: using torch")
        return "torch"
    return wanted if wanted in ("torch", "dali") else "torch"


def validate(opts: EvaluateOptions) -> None:
    """Refuse, before any work, options that do not go together or outputs that cannot be
    written."""
    if (opts.checkpoint is None) == (opts.features is None):
        raise EvaluationError("give exactly one of --checkpoint (a model) and --features "
                              "(exported features)")
    if opts.features is not None:
        for flag, value in (("--export-features", opts.export_features),
                            ("--compare-checkpoint", opts.compare_checkpoint),
                            ("--dataset", opts.dataset)):
            if value is not None:
                raise EvaluationError(f"{flag} needs a model (--checkpoint), not --features")
    if opts.protocol is not None and opts.features is None:
        raise EvaluationError("--protocol applies to --features; with --checkpoint the data set "
                              "fixes the protocol")
    if opts.compare_checkpoint is not None and opts.figures is None:
        raise EvaluationError("--compare-checkpoint is used by the figures: add --figures DIR")
    if opts.person_masks is not None:
        if opts.checkpoint is None:
            raise EvaluationError("--person-masks scores a model's attention: it needs "
                                  "--checkpoint, not --features")
        read_manifest(opts.person_masks)  # a wrong folder is named before any work
    _check_output("--output", opts.output)
    _check_output("--export-features", opts.export_features)
    _check_output("--figures", opts.figures, folder=True)
    if opts.figures is not None:
        require_viz()  # before the features are extracted
    for flag, value, low in (("--batch-size", opts.batch_size, 1), ("--k1", opts.k1, 1),
                             ("--k2", opts.k2, 1), ("--max-rank", opts.max_rank, 1),
                             ("--cuhk03-repeats", opts.cuhk03_repeats, 1),
                             ("--num-workers", opts.num_workers, 0),
                             ("--figure-queries", opts.figure_queries, 1),
                             ("--figure-images", opts.figure_images, 1)):
        if value < low:
            raise EvaluationError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 <= opts.lambda_value <= 1.0:
        raise EvaluationError(f"--lambda-value must be in [0, 1], got {opts.lambda_value}")


def _load_model_plain(path: Path, device):
    model, ckpt = model_from_checkpoint(read_checkpoint(path), where=f"checkpoint {path}")
    return model.to(device).eval(), ckpt, ckpt.get("run") or {}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.integer, np.floating)):
        return _jsonable(x.item())
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _from_features(opts: EvaluateOptions) -> _Scored:
    protocol, dataset, features, meta = load_features(opts.features, opts.protocol)
    label = opts.name or meta.get("method") or Path(opts.features).stem
    return _Scored(protocol, dataset, features, dict(meta.get("run") or {}), label)


def _from_checkpoint(opts: EvaluateOptions, device: torch.device) -> _Scored:
    model, ckpt, run = _load_model(opts.checkpoint, opts, device)
    compare = None
    if opts.compare_checkpoint is not None:
        compare_model, _, compare_run = _load_model_plain(opts.compare_checkpoint, device)
        if tuple(compare_model.config.image_size) != tuple(model.config.image_size):
            raise EvaluationError(
                f"--compare-checkpoint {opts.compare_checkpoint} was trained at "
                f"{list(compare_model.config.image_size)}, {opts.checkpoint} at "
                f"{list(model.config.image_size)}: the figures need one input size")
        compare = (compare_model, compare_run)
    plan = plan_target(opts.target, run)
    extract = {"image_size": tuple(model.config.image_size), "batch_size": opts.batch_size,
               "loader": _loader(opts, run), "num_workers": opts.num_workers,
               "device": device, "amp": opts.amp, "flip": opts.flip, "progress": opts.progress}
    t0 = time.perf_counter()
    features = extract_plan(model, plan, **extract)
    seconds = {"features": time.perf_counter() - t0}
    logger.info("features: %s in %.1f s", ", ".join(
        f"{t}/{s} {list(f.features.shape)}" for t, pair in features.items()
        for s, f in zip(("query", "gallery"), pair)), seconds["features"])
    label = opts.name or method_name(run, model.config.no_attention)
    scored = _Scored(plan.protocol, plan.dataset, features, run, label, plan.info, model, ckpt,
                     extract, plan, seconds, compare)
    if opts.export_features is not None:
        meta = {"checkpoint": str(opts.checkpoint), "method": label, "run": run,
                "dataset_info": plan.info, "flip": opts.flip, "amp": opts.amp}
        save_features(opts.export_features, plan.protocol, plan.dataset, features, meta)
        logger.info("wrote %s", opts.export_features)
    return scored


def _compared(opts: EvaluateOptions, scored: _Scored) -> Compared | None:
    """The compare model's features and distances on the first pair, for the figures."""
    if scored.compare is None:
        return None
    model, run = scored.compare
    label = method_name(run, model.config.no_attention)
    if label == scored.label:
        label += " (compare)"
    first = scored.plan.tasks[0]
    feats = extract_plan(model, Plan(scored.dataset, scored.protocol, [first]),
                         **scored.extract)[first.name]
    return Compared(model, run, label, {"target": feats},
                    distance_matrix(*feats, opts.metric, opts.reranking))


def _rank(opts: EvaluateOptions, scored: _Scored) -> tuple[dict, torch.Tensor | None]:
    t0 = time.perf_counter()
    try:
        dist = None
        if opts.figures is not None:  # the figures rank the first pair: compute it once
            dist = distance_matrix(*next(iter(scored.features.values())), opts.metric,
                                   opts.reranking)
        results = evaluate_tasks(scored.protocol, scored.features, metric=opts.metric,
                                 rerank=opts.reranking, repeats=opts.cuhk03_repeats,
                                 seed=opts.seed, max_rank=opts.max_rank, distmat=dist)
    except ValueError as exc:  # mismatched features, NaN distances, no query with a match
        where = (f"features file {opts.features}" if opts.features is not None
                 else f"{scored.dataset} ({scored.protocol} protocol)")
        raise EvaluationError(f"{where}: {exc}") from None
    scored.seconds["ranking"] = time.perf_counter() - t0
    return results, dist


def _attention(opts: EvaluateOptions, scored: _Scored, device) -> dict | None:
    """With ``--person-masks``: the attention net of the evaluated domain scored on the first
    query/gallery pair's images against those masks (``None`` without masks or nets)."""
    if opts.person_masks is None:
        return None
    if scored.model is None or not scored.model.has_attention:
        logger.warning("--person-masks: %s has no attention net; nothing to score", scored.label)
        return None
    net = "A_T" if opts.attention_domain == "target" else "A_S"
    q, g = next(iter(scored.features.values()))
    records = [Record(p, int(i), int(c)) for f in (q, g)
               for p, i, c in zip(f.paths or [], f.pids, f.camids)]
    t0 = time.perf_counter()
    quality = evaluate_attention(scored.model, {net: records},
                                 image_size=tuple(scored.model.config.image_size),
                                 device=device, batch_size=opts.batch_size,
                                 person_masks={net: opts.person_masks})
    scored.seconds["attention"] = time.perf_counter() - t0
    if net not in quality:
        raise EvaluationError(f"--person-masks {opts.person_masks}: the segmenter found no "
                              f"person in any of the {len(records)} images")
    out = quality[net].to_dict()
    sys.stdout.write(f"attention {net} against {opts.person_masks}: "
                     + quality[net].summary() + "\n")
    return {"net": net, "person_masks": str(opts.person_masks), **out}


def _metrics(result) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else float(v))
            for k, v in result.as_metrics().items()}


def _report(opts: EvaluateOptions, scored: _Scored, results: dict, figures: list[Path],
            device: torch.device) -> dict:
    main = results["mean" if scored.protocol == "prid2011" else "target"]
    q0 = next(iter(scored.features.values()))[0]
    cuhk03 = scored.protocol == "cuhk03"
    return {
        "checkpoint": None if opts.checkpoint is None else str(opts.checkpoint),
        "features": None if opts.features is None else str(opts.features),
        "dataset": scored.dataset, "protocol": scored.protocol, "method": scored.label,
        "metrics": _metrics(main),
        "results": {task: _metrics(r) for task, r in results.items()},
        "cmc": [float(v) for v in main.cmc],
        "num_query": sum(len(q) for q, _ in scored.features.values()),
        "num_gallery": sum(len(g) for _, g in scored.features.values()),
        "num_valid_queries": int(main.num_valid),
        "feature_dim": int(q0.features.shape[1]),
        "epoch": None if scored.ckpt is None else scored.ckpt.get("epoch"),
        "run": scored.run, "dataset_info": scored.info,
        "options": {
            "metric": opts.metric, "flip": opts.flip, "amp": scored.extract.get("amp"),
            "loader": scored.extract.get("loader"), "batch_size": opts.batch_size,
            "device": str(device), "max_rank": opts.max_rank,
            "rerank": ({"k1": opts.k1, "k2": opts.k2, "lambda_value": opts.lambda_value}
                       if opts.rerank else None),
            "cuhk03_repeats": opts.cuhk03_repeats if cuhk03 else None,
            "seed": opts.seed if cuhk03 else None,
        },
        "figures": [str(f) for f in figures],
        "seconds": {k: round(v, 3) for k, v in scored.seconds.items()},
    }


def run_evaluation(opts: EvaluateOptions) -> dict:
    """Everything ``python -m edaan_fast.evaluate`` does, returning the report (the
    ``--output`` JSON content)."""
    validate(opts)
    t_start = time.perf_counter()
    device = (device_of(opts.device, "--device", EvaluationError) if opts.checkpoint is not None
              else torch.device("cpu"))
    scored = (_from_features(opts) if opts.features is not None
              else _from_checkpoint(opts, device))
    results, dist = _rank(opts, scored)
    sys.stdout.write(_title(scored.dataset, scored.protocol, scored.run, scored.features, opts)
                     + "\n")
    sys.stdout.write(format_table(table_rows(scored.protocol, results, scored.label),
                                  columns=TABLE_COLUMNS) + "\n")
    sys.stdout.flush()
    attention = _attention(opts, scored, device)
    figures: list[Path] = []
    if opts.figures is not None:
        t0 = time.perf_counter()
        figures = write_figures(opts.figures, scored.features, dist, label=scored.label,
                                model=scored.model, run=scored.run,
                                compare=_compared(opts, scored),
                                queries=opts.figure_queries, images=opts.figure_images,
                                device=device, person_masks=opts.person_masks)
        scored.seconds["figures"] = time.perf_counter() - t0
        for f in figures:
            logger.info("wrote %s", f)
    scored.seconds["total"] = time.perf_counter() - t_start
    report = _report(opts, scored, results, figures, device)
    report["attention_quality"] = attention
    if opts.output is not None:
        write_json(opts.output, _jsonable(report))
        logger.info("wrote %s", opts.output)
    return report
