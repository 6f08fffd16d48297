"""``python -m edaan_fast.evaluate``: score a checkpoint (or exported features) on a target
protocol, print a table shaped like the paper's Tables I-III, and optionally write the metrics
as JSON, the features as ``.npz`` and the paper's figures (Figs. 4-7) as PNG files.

::

    python -m edaan_fast.evaluate --checkpoint runs/default/ckpt.pt           # the run's target
    python -m edaan_fast.evaluate --checkpoint runs/m2d/ckpt.pt --dataset dukemtmcreid \\
        --data-root /data --flip --rerank --output m2d.json
    python -m edaan_fast.evaluate --checkpoint C --dataset cuhk03 --data-root /data \\
        --cuhk03-protocol classic --cuhk03-repeats 10
    python -m edaan_fast.evaluate --checkpoint C --dataset prid2011 --data-root /data   # both ways
    python -m edaan_fast.evaluate --checkpoint C --export-features feats.npz
    python -m edaan_fast.evaluate --features feats.npz --rerank                   # no model needed
    python -m edaan_fast.evaluate --checkpoint C --figures figs/ --compare-checkpoint noattn.pt

Protocols (``edaan_fast.engine.evaluator.PROTOCOLS``): ``market`` (Market-1501 / DukeMTMC-reID
single query; also the synthetic set and CUHK03's 767/700 split), ``cuhk03`` (the paper's
1,367/100 split: single-gallery-shot CMC averaged over ``--cuhk03-repeats`` draws) and
``prid2011`` (cam1 -> cam2 and cam2 -> cam1, plus their mean).

Without ``--dataset`` the checkpoint's own target is evaluated the way its run was: for a run
on the embedded synthetic set that is the same target domain (preset and seed of the run), so
re-evaluating a run's final checkpoint reproduces the metrics of its report.

Errors in the inputs (missing, truncated or foreign checkpoints, a checkpoint of another
variant or preset than ``--expect-variant`` / ``--expect-preset``, a data set without a query
split, features whose dimensions disagree, ...) are reported as one line on stderr with exit
code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edaan_fast.metrics.features import (  # noqa: F401  (re-exported: the CLI's file format)
    FEATURES_FORMAT,
    FEATURES_VERSION,
    PRID_TASKS,
    EvaluationError,
    load_features,
    save_features,
)

logger = logging.getLogger("edaan_fast.evaluate")

PROG = "python -m edaan_fast.evaluate"
EXIT_ERROR = 2
DATASETS = ("synthetic", "market1501", "dukemtmcreid", "cuhk03", "prid2011")
VARIANTS = ("edaan", "daan", "cyclegan", "direct")
DATASET_NAMES = {"market1501": "Market-1501", "dukemtmcreid": "DukeMTMC-reID",
                 "cuhk03": "CUHK03", "prid2011": "PRID2011"}
VARIANT_NAMES = {"edaan": "EDAAN", "daan": "DAAN", "cyclegan": "CycleGAN",
                 "direct": "Direct Transfer"}
TABLE_COLUMNS = ("R-1", "R-5", "R-10", "mAP", "mINP")


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate an EDAAN checkpoint (or exported features) on a re-ID protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--checkpoint", type=Path, help="checkpoint written by edaan_fast.train")
    src.add_argument("--features", type=Path,
                     help="evaluate features exported with --export-features (no model)")
    src.add_argument("--dataset", choices=DATASETS,
                     help="target data set (default: the checkpoint's target)")
    src.add_argument("--data-root", type=Path,
                     help="data set folder (default: where the run read its target); for "
                          "synthetic, the cache root")
    src.add_argument("--protocol", choices=("market", "cuhk03", "prid2011"),
                     help="with --features: protocol (default: the one stored in the file)")

    fx = p.add_argument_group("feature extraction")
    fx.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                    help="autocast (bf16 on CPU, fp16 on CUDA); off = float32, as the trainer "
                         "evaluates")
    fx.add_argument("--loader", choices=("torch", "dali"),
                    help="image loader (default: the run's, torch when DALI is missing)")
    fx.add_argument("--flip", action="store_true",
                    help="average the features of each image and its mirror")
    fx.add_argument("--batch-size", type=int, default=128)
    fx.add_argument("--num-workers", type=int, default=2, help="loader workers / DALI threads")
    fx.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    fx.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean",
                    help="feature distance (euclidean = squared euclidean)")
    fx.add_argument("--max-rank", type=int, default=50, help="CMC length")

    pr = p.add_argument_group("protocols")
    pr.add_argument("--cuhk03-protocol", choices=("classic", "new"),
                    help="classic = the paper's 1,367/100 split, single-gallery-shot CMC; new = "
                         "767/700, single query (default: classic)")
    pr.add_argument("--cuhk03-split-id", type=int, help="classic split (0..19; default 0)")
    pr.add_argument("--cuhk03-image-type", choices=("detected", "labeled"),
                    help="CUHK03 boxes (default: detected)")
    pr.add_argument("--cuhk03-repeats", type=int, default=10,
                    help="single-gallery-shot draws averaged")
    pr.add_argument("--seed", type=int, default=0, help="seed of the CUHK03 gallery draws")
    pr.add_argument("--prid-split-seed", type=int,
                    help="seed of PRID2011's 100/100 identity split (default: the run's, else 0)")
    pr.add_argument("--synthetic-preset", choices=("tiny", "small", "paper"),
                    help="synthetic set size (default: tiny for a tiny run, else paper)")
    pr.add_argument("--synthetic-seed", type=int, help="synthetic set seed (default: the run's)")

    rr = p.add_argument_group("k-reciprocal re-ranking (Zhong et al., CVPR 2017)")
    rr.add_argument("--rerank", action="store_true", help="re-rank the distances before ranking")
    rr.add_argument("--k1", type=int, default=20)
    rr.add_argument("--k2", type=int, default=6)
    rr.add_argument("--lambda-value", type=float, default=0.3)

    out = p.add_argument_group("outputs")
    out.add_argument("--output", type=Path, help="write the metrics as JSON")
    out.add_argument("--export-features", type=Path, metavar="NPZ",
                     help="write query/gallery features, pids, camids and paths")
    out.add_argument("--figures", type=Path, metavar="DIR",
                     help="write the paper's figures (rank lists, t-SNE, masks, translations)")
    out.add_argument("--compare-checkpoint", type=Path,
                     help="second model for the figures (e.g. the no-attention run)")
    out.add_argument("--figure-queries", type=int, default=5, help="queries in the rank lists")
    out.add_argument("--figure-images", type=int, default=6,
                     help="images in the mask and translation figures")
    out.add_argument("--name", help="row label of the table (default: from the run)")

    chk = p.add_argument_group("checks")
    chk.add_argument("--expect-variant", choices=VARIANTS,
                     help="refuse a checkpoint of another variant")
    chk.add_argument("--expect-preset", choices=("tiny", "paper"),
                     help="refuse a checkpoint of another preset")
    chk.add_argument("--expect-attention", action=argparse.BooleanOptionalAction, default=None,
                     help="refuse a checkpoint with (--expect-no-attention) / without attention")

    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and the table only")
    return p


# ---------------------------------------------------------------------------------- data


@dataclass
class Task:
    """One query/gallery pair to rank (``name``: ``target``, or ``a2b``/``b2a`` for PRID2011)."""

    name: str
    query: list
    gallery: list


@dataclass
class Plan:
    """What to evaluate: a data set's protocol and its query/gallery pairs."""

    dataset: str
    protocol: str
    tasks: list[Task]
    info: dict = field(default_factory=dict)


def _run_target_dataset(run: dict):
    """The data set a run evaluated on: ``run_config.target_dataset(run)`` when the trainer
    provides it, otherwise (synthetic targets only) the same construction, else ``None``."""
    try:
        mod = importlib.import_module("edaan_fast.engine.run_config")
    except ModuleNotFoundError as exc:
        if exc.name != "edaan_fast.engine.run_config":
            raise
        mod = None
    target_dataset = getattr(mod, "target_dataset", None)
    if target_dataset is not None:
        return target_dataset(run)
    if run.get("target") == "synthetic":
        from edaan_fast.data import build_dataset

        return build_dataset("synthetic", root=run.get("target_root") or run.get("data_root"),
                             domain="target", preset=_synthetic_preset(run),
                             seed=int(run.get("seed", 0)))
    return None


def _synthetic_preset(run: dict) -> str:
    return "tiny" if run.get("preset", "tiny") == "tiny" else "paper"


def _root(args, run: dict, name: str) -> str:
    if args.data_root is not None:
        return str(args.data_root)
    for role in ("target", "source"):
        if run.get(role) == name:
            root = run.get(f"{role}_root") or run.get("data_root")
            if root:
                return str(root)
    real = [run.get(r) for r in ("source", "target") if run.get(r) not in (None, "synthetic")]
    if real and run.get("data_root"):  # the folder the run's real data sets live under
        return str(run["data_root"])
    raise EvaluationError(f"--data-root is required for {name}: the checkpoint's run does not "
                          "record where that data set is")


def _require_split(name: str, query: Sequence, gallery: Sequence, where: str = "") -> None:
    if not query or not gallery:
        missing = "query" if not query else "gallery"
        raise EvaluationError(
            f"data set {name}{where} has no {missing} split ({len(query)} query, {len(gallery)} "
            "gallery images); the protocols rank query images against gallery images")


def plan_from_dataset(args, run: dict) -> Plan:
    """Resolves ``--dataset`` (default: the run's target) into a :class:`Plan`."""
    from edaan_fast.data import build_dataset

    name = args.dataset or run.get("target")
    if name is None:
        raise EvaluationError("--dataset is required: the checkpoint does not record its target "
                              f"data set (choices: {', '.join(DATASETS)})")
    if name not in DATASETS:
        raise EvaluationError(f"the checkpoint's target data set {name!r} is not one this "
                              f"evaluator knows; pass --dataset ({', '.join(DATASETS)})")
    same_as_run = name == run.get("target") and args.data_root is None
    if name == "synthetic":
        defaults = (same_as_run and args.synthetic_preset is None
                    and args.synthetic_seed is None)
        ds = _run_target_dataset(run) if defaults else None
        if ds is None:
            root = args.data_root
            if root is None and run.get("target") == "synthetic":
                root = run.get("target_root") or run.get("data_root")
            ds = build_dataset(
                "synthetic", root=root, domain="target",
                preset=args.synthetic_preset or _synthetic_preset(run),
                seed=args.synthetic_seed if args.synthetic_seed is not None
                else int(run.get("seed", 0)))
        _require_split(ds.name, ds.query, ds.gallery)
        return Plan("synthetic", "market", [Task("target", ds.query, ds.gallery)], dict(ds.info))
    root = _root(args, run, name)
    run_ds = _run_target_dataset(run) if same_as_run and name in ("cuhk03", "prid2011") else None
    run_info = dict(run_ds.info) if run_ds is not None else {}
    if name in ("market1501", "dukemtmcreid"):
        ds = build_dataset(name, root)
        _require_split(name, ds.query, ds.gallery)
        return Plan(name, "market", [Task("target", ds.query, ds.gallery)], dict(ds.info))
    if name == "cuhk03":
        protocol = args.cuhk03_protocol or run_info.get("protocol", "classic")
        split_id = (args.cuhk03_split_id if args.cuhk03_split_id is not None
                    else int(run_info.get("split_id", 0)))
        image_type = args.cuhk03_image_type or run_info.get("image_type", "detected")
        ds = build_dataset("cuhk03", root, protocol=protocol, split_id=split_id,
                           image_type=image_type)
        _require_split("cuhk03", ds.query, ds.gallery)
        return Plan("cuhk03", "cuhk03" if protocol == "classic" else "market",
                    [Task("target", ds.query, ds.gallery)], dict(ds.info))
    seed = (args.prid_split_seed if args.prid_split_seed is not None
            else int(run_info.get("seed", 0)))
    tasks = []
    for direction, _ in PRID_TASKS:
        ds = build_dataset("prid2011", root, direction=direction, seed=seed)
        _require_split("prid2011", ds.query, ds.gallery, f" ({direction})")
        tasks.append(Task(direction, ds.query, ds.gallery))
    return Plan("prid2011", "prid2011", tasks, {"seed": seed})


# ---------------------------------------------------------------------------------- features


# ---------------------------------------------------------------------------------- evaluation


def evaluate(protocol: str, features: dict, args, distmat: torch.Tensor | None = None) -> dict:
    """``{task: ProtocolResult}`` (plus ``"mean"`` for PRID2011); ``distmat``: the first pair's
    distances when already computed (for the figures)."""
    from edaan_fast.engine.evaluator import (
        ReRanking,
        evaluate_features,
        evaluate_prid2011,
    )

    rerank = (ReRanking(args.k1, args.k2, args.lambda_value) if args.rerank else None)
    if protocol == "prid2011":
        return evaluate_prid2011(features["a2b"], features["b2a"], metric=args.metric,
                                 rerank=rerank, max_rank=args.max_rank)
    q, g = features["target"]
    return {"target": evaluate_features(q, g, protocol, metric=args.metric, rerank=rerank,
                                        repeats=args.cuhk03_repeats, seed=args.seed,
                                        max_rank=args.max_rank, distmat=distmat)}


def method_name(run: dict, no_attention: bool | None = None, metric_loss: bool = True) -> str:
    """The row name of the paper's tables for a run, as the trainer's report writes it
    (:func:`edaan_fast.engine.report.method_name`): "EDAAN with Quartet", "EDAAN w/o
    attention", "DAAN with attention", "CycleGAN", "Direct Transfer". ``no_attention`` (the
    model's) stands in for a run that does not record ``attention``; ``metric_loss=False``
    gives the short form of the figures ("EDAAN")."""
    if run.get("variant") is None:
        return "model"
    run = dict(run)
    if "attention" not in run and no_attention is not None:
        run["attention"] = not no_attention
    variant, attention = run["variant"], run.get("attention", True)
    if not metric_loss:
        name = VARIANT_NAMES.get(variant, str(variant))
        return name + " w/o attention" if variant in ("edaan", "daan") and not attention else name
    try:
        from edaan_fast.engine.report import method_name as report_method_name
    except ImportError:
        report_method_name = None
    if report_method_name is not None:
        return report_method_name(run)
    loss = str(run.get("metric_loss", "quartet")).capitalize()
    if variant == "edaan":
        return f"EDAAN with {loss}" if attention else "EDAAN w/o attention"
    if variant == "daan":
        return "DAAN with attention" if attention else "DAAN w/o attention"
    return VARIANT_NAMES.get(variant, str(variant))


def table_rows(protocol: str, results: dict, label: str) -> dict:
    if protocol == "prid2011":
        rows = {f"{label} {shown}": results[task] for task, shown in PRID_TASKS}
        rows[f"{label} mean"] = results["mean"]
        return rows
    return {label: results["target"]}


def _metrics(result) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else float(v))
            for k, v in result.as_metrics().items()}


def _title(plan_dataset: str, protocol: str, run: dict, features: dict, args) -> str:
    def shown(name: str, domain: str) -> str:
        return f"synthetic-{domain}" if name == "synthetic" else DATASET_NAMES.get(name, name)

    source = run.get("source")
    target = shown(plan_dataset, "target")
    arrow = f"{shown(source, 'source')} → {target}" if source else target
    what = {"market": "single query", "prid2011": "single shot, both directions",
            "cuhk03": f"single-gallery-shot CMC, {args.cuhk03_repeats} draws"}[protocol]
    sizes = ", ".join(f"{len(q)} query / {len(g)} gallery" for q, g in features.values())
    extra = " + k-reciprocal re-ranking" if args.rerank else ""
    return f"{arrow} ({protocol} protocol: {what}{extra}; {sizes})"


def write_json(path: Path, data: dict) -> Path:
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
    parent = path.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise EvaluationError(f"{flag} {path}: {parent} is a file, so nothing can be written "
                              "under it")


# ---------------------------------------------------------------------------------- figures


def _require_viz() -> None:
    missing = []
    for mod in ("matplotlib", "sklearn"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise EvaluationError(f"--figures needs {' and '.join(missing)} (not installed): "
                              "pip install 'edaan_fast[viz]'")


def _figure_queries(q, g, n: int) -> list[int]:
    """Up to ``n`` queries with a positive in the gallery, distinct identities, spread evenly."""
    qp, qc = q.pids.numpy(), q.camids.numpy()
    gp, gc = g.pids.numpy(), g.camids.numpy()
    chosen, seen = [], set()
    num_q = len(qp)
    step = max(1, num_q // max(n, 1))
    for start in range(step):
        for i in range(start, num_q, step):
            if len(chosen) == n:
                return chosen
            if qp[i] in seen or not ((gp == qp[i]) & (gc != qc[i])).any():
                continue
            chosen.append(i)
            seen.add(qp[i])
    return chosen


def _tsne_ids(pids: np.ndarray, n: int = 10) -> np.ndarray:
    """The ``n`` identities (pid > 0: no distractors) with the most images, ties by pid."""
    ids, counts = np.unique(pids[pids > 0], return_counts=True)
    order = np.lexsort((ids, -counts))
    return ids[order[:n]]


def _pick(records: Sequence, n: int) -> list:
    if len(records) <= n:
        return list(records)
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


def _images(records: Sequence, image_size, device) -> torch.Tensor:
    from edaan_fast.data import build_loader

    dl = build_loader(records, train=False, batch_size=len(records), num_workers=0,
                      image_size=tuple(image_size))
    return next(iter(dl)).images.to(device)


def _to_unit(x: torch.Tensor, cfg, min_height: int = 192) -> torch.Tensor:
    """Normalised images -> [0, 1] (the model's pixel mean/std undone), enlarged (nearest) to
    at least ``min_height`` pixels so that small inputs stay visible."""
    mean = torch.tensor(cfg.pixel_mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=x.device).view(1, -1, 1, 1)
    x = (x.float() * std + mean).clamp(0, 1)
    scale = max(1, min_height // x.shape[-2])
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    return x.cpu()


def _enlarge(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(a.float(), size=like.shape[-2:], mode="nearest").cpu()


def _true_masks(records: Sequence) -> torch.Tensor | None:
    """The ground-truth person masks ``[N, 1, H, W]`` of synthetic images, else ``None``."""
    from edaan_fast.data.synthetic import load_mask, mask_path

    if not records or not all(mask_path(r.path).is_file() for r in records):
        return None
    return torch.stack([torch.from_numpy(load_mask(r.path)) for r in records])[:, None]


def _source_records(run: dict, n: int) -> list:
    """A few source-domain images of the run (for S -> T translations and A_S masks)."""
    from edaan_fast.data import DatasetError, build_dataset

    source = run.get("source")
    if source is None:
        return []
    try:
        if source == "synthetic":
            root = run.get("source_root") or run.get("data_root")
            ds = build_dataset("synthetic", root=root, domain="source",
                               preset=_synthetic_preset(run), seed=int(run.get("seed", 0)))
        else:
            root = run.get("source_root") or run.get("data_root")
            if not root:
                return []
            ds = build_dataset(source, root)
    except (DatasetError, OSError, ImportError) as exc:
        logger.warning("source data set %s not readable (%s): source-side figures skipped",
                       source, str(exc).splitlines()[0])
        return []
    return _pick(ds.query or ds.train, n)


@torch.no_grad()
def write_figures(out: Path, features: dict, dist: torch.Tensor, args, *, label: str,
                  model=None, run: dict | None = None, compare=None,
                  compare_run: dict | None = None, compare_label: str | None = None,
                  compare_features: dict | None = None,
                  compare_dist: torch.Tensor | None = None, device="cpu") -> list[Path]:
    """The paper's figures for the first query/gallery pair of ``features``.

    * ``rank_list.png`` (Fig. 6): ``--figure-queries`` queries and their top 10;
      ``rank_list_compare.png`` for the compare model on the same queries;
    * ``tsne.png`` (Fig. 5): t-SNE of the query and gallery embeddings of 10 identities, one
      marker per camera; ``tsne_compare.png`` likewise;
    * ``attention_target.png`` / ``attention_source.png`` (Fig. 7): ``A_T(x_T)`` / ``A_S(x_S)``
      with the foreground ``A x`` and background ``(1 - A) x`` (models with attention only);
    * ``translation_s2t.png`` / ``translation_t2s.png`` (Fig. 4): inputs next to their
      translations by the model and by the compare model.
    """
    from edaan_fast import viz

    _require_viz()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    q, g = next(iter(features.values()))

    have_paths = (q.paths is not None and g.paths is not None
                  and all(Path(p).is_file() for p in (q.paths[0], g.paths[0])))
    picks = _figure_queries(q, g, args.figure_queries)
    for suffix, d in (("", dist), ("_compare", compare_dist)):
        if d is None:
            continue
        if not have_paths:
            logger.warning("the features carry no readable image paths: rank lists skipped")
            break
        written.append(viz.rank_lists_for_queries(
            d, picks, q.pids, q.camids, g.pids, g.camids, q.paths, g.paths,
            out / f"rank_list{suffix}.png", topk=10))

    for suffix, feats, title in (("", features, label),
                                 ("_compare", compare_features, compare_label)):
        if feats is None:
            continue
        fq, fg = next(iter(feats.values()))
        emb = torch.cat([fq.features, fg.features]).numpy()
        pids = torch.cat([fq.pids, fg.pids]).numpy()
        cams = torch.cat([fq.camids, fg.camids]).numpy()
        keep = np.isin(pids, _tsne_ids(pids))
        if keep.sum() < 3:
            logger.warning("fewer than 3 images of repeated identities: t-SNE skipped")
            continue
        path, _ = viz.plot_tsne(emb[keep], pids[keep], out / f"tsne{suffix}.png",
                                domains=cams[keep],
                                domain_names={int(c): f"camera {int(c) + 1}"
                                              for c in np.unique(cams)},
                                title=title)
        written.append(path)

    if model is None:
        logger.info("no model (features file): attention and translation figures skipped")
        return written
    from edaan_fast.data import Record

    cfg = model.config
    target = _pick([Record(p, int(i), int(c)) for p, i, c in zip(q.paths or [], q.pids, q.camids)],
                   args.figure_images)
    if not target or not Path(target[0].path).is_file():
        logger.warning("no readable target images: attention and translation figures skipped")
        return written
    column = method_name(run or {}, cfg.no_attention, metric_loss=False)
    compare_column = None
    if compare is not None:
        compare_column = method_name(compare_run or {}, compare.config.no_attention,
                                     metric_loss=False)
        if compare_column == column:
            compare_column += " (2)"
    x_t = _images(target, cfg.image_size, device)
    source = _source_records(run or {}, args.figure_images)
    x_s = _images(source, cfg.image_size, device) if source else None

    if model.has_attention:
        for name, x, net, records in (("target", x_t, model.attention_T, target),
                                      ("source", x_s, model.attention_S, source)):
            if x is None:
                continue
            img = _to_unit(x, cfg)
            truth = _true_masks(records)
            written.append(viz.plot_attention(
                img, _enlarge(net(x), img), out / f"attention_{name}.png", value_range=(0, 1),
                truth=None if truth is None else _enlarge(truth, img)))
    else:
        logger.info("%s has no attention network: mask figures skipped", label)

    for name, x, fn in (("s2t", x_s, "translate_s2t"), ("t2s", x_t, "translate_t2s")):
        if x is None:
            continue
        cols = {("source" if name == "s2t" else "target"): _to_unit(x, cfg),
                column: _to_unit(getattr(model, fn)(x), cfg)}
        if compare is not None:
            cols[compare_column] = _to_unit(getattr(compare, fn)(x), compare.config)
        written.append(viz.plot_translation_grid(cols, out / f"translation_{name}.png",
                                                 value_range=(0, 1)))
    return written


# ---------------------------------------------------------------------------------- main


def _device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise EvaluationError(f"--device {spec!r} is not a device (expected cpu, cuda or "
                              "cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {spec}: CUDA is not available (torch "
                              f"{torch.__version__}); use --device cpu")
    return dev


def _check_expectations(path: Path, run: dict, args) -> None:
    for flag, key, want in (("--expect-variant", "variant", args.expect_variant),
                            ("--expect-preset", "preset", args.expect_preset),
                            ("--expect-attention", "attention", args.expect_attention)):
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
    """:func:`~edaan_fast.engine.checkpoint.load_checkpoint`, quiet, with every failure of a
    damaged file (torch's unpickler also raises IndexError, KeyError, ... on garbage) turned
    into a :class:`~edaan_fast.engine.checkpoint.CheckpointError` that names the file."""
    import warnings

    from edaan_fast.engine.checkpoint import CheckpointError, load_checkpoint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols
            return load_checkpoint(path, kind="model")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure means a damaged file
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({size} bytes): it is truncated, corrupt or not "
            f"a torch file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _load_model(path: Path, args, device):
    from edaan_fast.engine.checkpoint import model_from_checkpoint

    ckpt = read_checkpoint(path)
    run = ckpt.get("run") or {}
    _check_expectations(path, run, args)
    model, ckpt = model_from_checkpoint(ckpt, where=f"checkpoint {path}")
    return model.to(device).eval(), ckpt, run


def _loader(args, run: dict) -> str:
    from edaan_fast.data import dali_available

    if args.loader is not None:
        if args.loader == "dali" and not dali_available():
            raise EvaluationError("--loader dali: NVIDIA DALI is not installed "
                                  "(pip install 'edaan_fast[dali]'); use --loader torch")
        return args.loader
    wanted = run.get("loader", "torch")
    if wanted == "dali" and not dali_available():
        logger.warning("the run used the DALI loader, which is not installed: using torch")
        return "torch"
    return wanted if wanted in ("torch", "dali") else "torch"


def _validate(args) -> None:
    if (args.checkpoint is None) == (args.features is None):
        raise EvaluationError("give exactly one of --checkpoint (a model) and --features "
                              "(exported features)")
    if args.features is not None:
        for flag, value in (("--export-features", args.export_features),
                            ("--compare-checkpoint", args.compare_checkpoint),
                            ("--dataset", args.dataset)):
            if value is not None:
                raise EvaluationError(f"{flag} needs a model (--checkpoint), not --features")
    if args.protocol is not None and args.features is None:
        raise EvaluationError("--protocol applies to --features; with --checkpoint the data set "
                              "fixes the protocol")
    if args.compare_checkpoint is not None and args.figures is None:
        raise EvaluationError("--compare-checkpoint is used by the figures: add --figures DIR")
    _check_output("--output", args.output)
    _check_output("--export-features", args.export_features)
    _check_output("--figures", args.figures, folder=True)
    if args.figures is not None:
        _require_viz()  # before the features are extracted
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--k1", args.k1, 1),
                             ("--k2", args.k2, 1), ("--max-rank", args.max_rank, 1),
                             ("--cuhk03-repeats", args.cuhk03_repeats, 1),
                             ("--num-workers", args.num_workers, 0),
                             ("--figure-queries", args.figure_queries, 1),
                             ("--figure-images", args.figure_images, 1)):
        if value < low:
            raise EvaluationError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 <= args.lambda_value <= 1.0:
        raise EvaluationError(f"--lambda-value must be in [0, 1], got {args.lambda_value}")


def run(args) -> dict:
    """Everything :func:`main` does, returning the report (the ``--output`` JSON content)."""
    _validate(args)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    device = _device(args.device) if args.checkpoint is not None else torch.device("cpu")
    progress = not (args.no_progress or args.quiet) and sys.stderr.isatty()
    model = ckpt = compare = compare_run = None
    run_cfg: dict = {}
    info: dict = {}
    if args.features is not None:
        protocol, dataset, features, meta = load_features(args.features, args.protocol)
        run_cfg = dict(meta.get("run") or {})
        label = args.name or meta.get("method") or Path(args.features).stem
        extract = {}
    else:
        model, ckpt, run_cfg = _load_model(args.checkpoint, args, device)
        if args.compare_checkpoint is not None:
            compare, _, compare_run = _load_model_plain(args.compare_checkpoint, device)
            if tuple(compare.config.image_size) != tuple(model.config.image_size):
                raise EvaluationError(
                    f"--compare-checkpoint {args.compare_checkpoint} was trained at "
                    f"{list(compare.config.image_size)}, {args.checkpoint} at "
                    f"{list(model.config.image_size)}: the figures need one input size")
        from edaan_fast.engine.evaluator import extract_split_features

        plan = plan_from_dataset(args, run_cfg)
        protocol, dataset, info = plan.protocol, plan.dataset, plan.info
        label = args.name or method_name(run_cfg, model.config.no_attention)
        amp = args.amp
        extract = {"image_size": tuple(model.config.image_size), "batch_size": args.batch_size,
                   "loader": _loader(args, run_cfg), "num_workers": args.num_workers,
                   "device": device, "amp": amp, "flip": args.flip, "progress": progress}
        splits = {}
        for t in plan.tasks:
            splits[f"{t.name}/query"], splits[f"{t.name}/gallery"] = t.query, t.gallery
        t0 = time.perf_counter()
        feats = extract_split_features(model, splits, **extract)
        seconds["features"] = time.perf_counter() - t0
        features = {t.name: (feats[f"{t.name}/query"], feats[f"{t.name}/gallery"])
                    for t in plan.tasks}
        logger.info("features: %s in %.1f s",
                    ", ".join(f"{k} {list(v.features.shape)}" for k, v in feats.items()),
                    seconds["features"])
        if args.export_features is not None:
            meta = {"checkpoint": str(args.checkpoint), "method": label, "run": run_cfg,
                    "dataset_info": info, "flip": args.flip, "amp": amp}
            save_features(args.export_features, protocol, dataset, features, meta)
            logger.info("wrote %s", args.export_features)

    from edaan_fast.engine.evaluator import ReRanking, distance_matrix
    from edaan_fast.metrics.protocols import format_table

    rerank = ReRanking(args.k1, args.k2, args.lambda_value) if args.rerank else None
    t0 = time.perf_counter()
    try:
        dist = None
        if args.figures is not None:  # the figures rank the first pair: compute it once
            dist = distance_matrix(*next(iter(features.values())), args.metric, rerank)
        results = evaluate(protocol, features, args, dist)
    except ValueError as exc:  # mismatched features, NaN distances, no query with a match
        where = (f"features file {args.features}" if args.features is not None
                 else f"{dataset} ({protocol} protocol)")
        raise EvaluationError(f"{where}: {exc}") from None
    seconds["ranking"] = time.perf_counter() - t0
    rows = table_rows(protocol, results, label)
    main_result = results["mean" if protocol == "prid2011" else "target"]

    sys.stdout.write(_title(dataset, protocol, run_cfg, features, args) + "\n")
    sys.stdout.write(format_table(rows, columns=TABLE_COLUMNS) + "\n")
    sys.stdout.flush()

    figures: list[Path] = []
    if args.figures is not None:
        t0 = time.perf_counter()
        compare_features = compare_dist = None
        compare_label = None
        if compare is not None:
            compare_label = method_name(compare_run, compare.config.no_attention)
            if compare_label == label:
                compare_label += " (compare)"
            first = next(iter(plan.tasks))
            cf = extract_split_features(compare, {"query": first.query,
                                                  "gallery": first.gallery}, **extract)
            compare_features = {"target": (cf["query"], cf["gallery"])}
            compare_dist = distance_matrix(cf["query"], cf["gallery"], args.metric, rerank)
        figures = write_figures(args.figures, features, dist, args, label=label, model=model,
                                run=run_cfg, compare=compare, compare_run=compare_run,
                                compare_label=compare_label,
                                compare_features=compare_features, compare_dist=compare_dist,
                                device=device)
        seconds["figures"] = time.perf_counter() - t0
        for f in figures:
            logger.info("wrote %s", f)
    seconds["total"] = time.perf_counter() - t_start

    q0 = next(iter(features.values()))[0]
    report = {
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "features": None if args.features is None else str(args.features),
        "dataset": dataset,
        "protocol": protocol,
        "method": label,
        "metrics": _metrics(main_result),
        "results": {task: _metrics(r) for task, r in results.items()},
        "cmc": [float(v) for v in main_result.cmc],
        "num_query": sum(len(q) for q, _ in features.values()),
        "num_gallery": sum(len(g) for _, g in features.values()),
        "num_valid_queries": int(main_result.num_valid),
        "feature_dim": int(q0.features.shape[1]),
        "epoch": None if ckpt is None else ckpt.get("epoch"),
        "run": run_cfg,
        "dataset_info": info,
        "options": {
            "metric": args.metric, "flip": args.flip,
            "amp": extract.get("amp"), "loader": extract.get("loader"),
            "batch_size": args.batch_size, "device": str(device), "max_rank": args.max_rank,
            "rerank": ({"k1": args.k1, "k2": args.k2, "lambda_value": args.lambda_value}
                       if args.rerank else None),
            "cuhk03_repeats": args.cuhk03_repeats if protocol == "cuhk03" else None,
            "seed": args.seed if protocol == "cuhk03" else None,
        },
        "figures": [str(f) for f in figures],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if args.output is not None:
        write_json(args.output, _jsonable(report))
        logger.info("wrote %s", args.output)
    return report


def _load_model_plain(path: Path, device):
    from edaan_fast.engine.checkpoint import model_from_checkpoint

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


def _input_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad inputs (one line, exit 2). Only the modules already imported
    can have raised theirs, so an early failure does not import the data or model code."""
    types: list[type[BaseException]] = [EvaluationError]
    for module, name in (("edaan_fast.data.base", "DatasetError"),
                         ("edaan_fast.engine.checkpoint", "CheckpointError"),
                         ("edaan_fast.engine.evaluator", "FeatureMismatchError"),
                         ("edaan_fast.ops._library", "OpsNotAvailableError")):
        mod = sys.modules.get(module)
        if mod is not None:
            types.append(getattr(mod, name))
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or 2 for bad inputs)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    from edaan_fast._allocator import pin_malloc_thresholds

    pin_malloc_thresholds()  # large feature batches: no page faults on every allocation
    try:
        run(args)
    except Exception as exc:
        if not isinstance(exc, _input_error_types()):
            raise
        from edaan_fast._cli import one_line

        sys.stderr.write(f"{PROG}: error: {one_line(exc)}\n")
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
