"""The paper's figures of an evaluation (Figs. 4-7): rank lists, t-SNE of the embeddings,
attention masks and translations, for the first query/gallery pair that was ranked, and for a
second model to compare with. Drawing itself is :mod:`edaan_fast.viz`'s; this module picks the
queries, identities and images and runs the model.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edaan_fast.data.person_masks import read_person_masks
from edaan_fast.data.synthetic import load_masks
from edaan_fast.data.transforms import to_unit_range
from edaan_fast.engine.run_config import synthetic_preset
from edaan_fast.metrics.features import EvaluationError

from .report import method_name

logger = logging.getLogger("edaan_fast.evaluate")

__all__ = ["Compared", "require_viz", "write_figures"]


def require_viz() -> None:
    """Raise :class:`EvaluationError` unless the figures' libraries are installed."""
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
    x = to_unit_range(x, cfg.pixel_mean, cfg.pixel_std)
    scale = max(1, min_height // x.shape[-2])
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    return x.cpu()


def _enlarge(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(a.float(), size=like.shape[-2:], mode="nearest").cpu()


def _source_records(run: dict, n: int) -> list:
    """A few source-domain images of the run (for S -> T translations and A_S masks)."""
    from edaan_fast.data import DatasetError, build_dataset

    source = run.get("source")
    if source is None:
        return []
    try:
        root = run.get("source_root") or run.get("data_root")
        if source == "synthetic":
            ds = build_dataset("synthetic", root=root, domain="source",
                               preset=synthetic_preset(run),
                               seed=int(run.get("seed", 0)))
        elif not root:
            return []
        else:
            ds = build_dataset(source, root)
    except (DatasetError, OSError, ImportError) as exc:
        logger.warning("source data set %s not readable (%s): source-side figures skipped",
                       source, str(exc).splitlines()[0])
        return []
    return _pick(ds.query or ds.train, n)


@dataclass
class Compared:
    """The second model of the figures (``--compare-checkpoint``): the model, its run, its
    label, and its features and distances on the first query/gallery pair."""

    model: Any
    run: dict
    label: str
    features: dict
    dist: torch.Tensor


def _ranking_figures(out: Path, features: dict, dist: torch.Tensor, label: str,
                     compare: Compared | None, queries: int) -> list[Path]:
    """``rank_list.png`` (Fig. 6) and ``tsne.png`` (Fig. 5), and their ``_compare`` twins."""
    from edaan_fast import viz

    written: list[Path] = []
    q, g = next(iter(features.values()))
    have_paths = (q.paths is not None and g.paths is not None
                  and all(Path(p).is_file() for p in (q.paths[0], g.paths[0])))
    picks = _figure_queries(q, g, queries)
    for suffix, d in (("", dist), ("_compare", compare and compare.dist)):
        if d is None:
            continue
        if not have_paths:
            logger.warning("the features carry no readable image paths: rank lists skipped")
            break
        written.append(viz.rank_lists_for_queries(
            d, picks, q.pids, q.camids, g.pids, g.camids, q.paths, g.paths,
            out / f"rank_list{suffix}.png", topk=10))
    for suffix, feats, title in (("", features, label),
                                 ("_compare", compare and compare.features,
                                  compare and compare.label)):
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
    return written


@torch.no_grad()
def _model_figures(out: Path, q, model, run: dict, label: str, compare: Compared | None,
                   images: int, device, person_masks: Path | None = None) -> list[Path]:
    """``attention_target.png`` / ``attention_source.png`` (Fig. 7) and
    ``translation_s2t.png`` / ``translation_t2s.png`` (Fig. 4)."""
    from edaan_fast import viz
    from edaan_fast.data import Record

    cfg = model.config
    queries = [Record(p, int(i), int(c)) for p, i, c in zip(q.paths or [], q.pids, q.camids)]
    truths = {}
    if person_masks is not None:  # the queries the segmenter found a person in, with masks
        queries, masks = read_person_masks(queries, person_masks)
        truths = {r.path: m for r, m in zip(queries, masks)}
    target = _pick(queries, images)
    if not target or not Path(target[0].path).is_file():
        logger.warning("no readable target images: attention and translation figures skipped")
        return []
    column = method_name(run, cfg.no_attention, metric_loss=False)
    if compare is not None:
        compare_column = method_name(compare.run, compare.model.config.no_attention,
                                     metric_loss=False)
        compare_column += " (2)" if compare_column == column else ""
    x_t = _images(target, cfg.image_size, device)
    source = _source_records(run, images)
    x_s = _images(source, cfg.image_size, device) if source else None
    written: list[Path] = []
    if model.has_attention:
        for name, x, net, records in (("target", x_t, model.attention_T, target),
                                      ("source", x_s, model.attention_S, source)):
            if x is None:
                continue
            img = _to_unit(x, cfg)
            truth = (torch.stack([truths[r.path] for r in records])
                     if truths and name == "target" else load_masks(records))
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
            cols[compare_column] = _to_unit(getattr(compare.model, fn)(x), compare.model.config)
        written.append(viz.plot_translation_grid(cols, out / f"translation_{name}.png",
                                                 value_range=(0, 1)))
    return written


def write_figures(out: Path, features: dict, dist: torch.Tensor, *, label: str, model=None,
                  run: dict | None = None, compare: Compared | None = None,
                  queries: int = 8, images: int = 8, device="cpu",
                  person_masks: Path | None = None) -> list[Path]:
    """The paper's figures for the first query/gallery pair of ``features``.

    * ``rank_list.png`` (Fig. 6): ``queries`` queries and their top 10;
      ``rank_list_compare.png`` for the compare model on the same queries;
    * ``tsne.png`` (Fig. 5): t-SNE of the query and gallery embeddings of 10 identities, one
      marker per camera; ``tsne_compare.png`` likewise;
    * ``attention_target.png`` / ``attention_source.png`` (Fig. 7): ``A_T(x_T)`` / ``A_S(x_S)``
      with the foreground ``A x`` and background ``(1 - A) x`` (models with attention only),
      and the person masks beside them (the synthetic set's, or ``person_masks``, a mask folder
      of the evaluated data set, for ``attention_target.png``);
    * ``translation_s2t.png`` / ``translation_t2s.png`` (Fig. 4): ``images`` inputs next to
      their translations by the model and by the compare model.
    """
    require_viz()
    out.mkdir(parents=True, exist_ok=True)
    written = _ranking_figures(out, features, dist, label, compare, queries)
    if model is None:
        logger.info("no model (features file): attention and translation figures skipped")
        return written
    q = next(iter(features.values()))[0]
    return written + _model_figures(out, q, model, run or {}, label, compare, images, device,
                                    person_masks)
