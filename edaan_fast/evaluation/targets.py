"""The one evaluation plan, shared by the trainer and ``python -m edaan_fast.evaluate``: which
query/gallery pairs of a data set are ranked, and under which protocol.

:func:`protocol_of` is the only place that decides a data set's protocol (Market-1501,
DukeMTMC-reID, MSMT17, a user's own set, the synthetic set and CUHK03's 767/700 split:
``market``; CUHK03's classic 1,367/100 split: ``cuhk03`` single-gallery-shot; PRID2011: both
directions, ``prid2011``).
:func:`run_plan` is the plan of a training run's own target, :func:`plan_target` the plan the
evaluation CLI resolves from its options (default: the run's target, as the run saw it), and
:func:`evaluate_target` is what a run reports: float32 features of ``encoder_S + embedding``
(no flip, no re-ranking), squared euclidean distance -- ``python -m edaan_fast.evaluate``
with its defaults computes the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edaan_fast.metrics.features import PRID_TASKS, EvaluationError, evaluate_tasks

if TYPE_CHECKING:
    from edaan_fast.data import ReIDDataset
    from edaan_fast.metrics.protocols import ProtocolResult

__all__ = ["DATASETS", "Plan", "TargetOptions", "Task", "evaluate_target", "extract_plan",
           "plan_target", "protocol_of", "run_plan"]

#: The data sets the evaluation knows: the keys of :data:`edaan_fast.data.DATASETS`, named here
#: so that the command line's choices need not import the data package (a test holds them equal).
DATASETS = ("synthetic", "market1501", "dukemtmcreid", "cuhk03", "prid2011", "msmt17", "custom")


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


@dataclass
class TargetOptions:
    """Which data set to evaluate on, when it is not the run's own target as the run saw it.

    ``None`` everywhere = the run's target, with the run's settings."""

    dataset: str | None = None
    data_root: str | None = None
    synthetic_preset: str | None = None
    synthetic_seed: int | None = None
    cuhk03_protocol: str | None = None
    cuhk03_split_id: int | None = None
    cuhk03_image_type: str | None = None
    prid_split_seed: int | None = None


def protocol_of(name: str, info: dict[str, Any] | None = None) -> str:
    """The protocol a data set is evaluated with (``info``: the reader's ``dataset.info``)."""
    if name == "prid2011":
        return "prid2011"
    if name == "cuhk03" and (info or {}).get("protocol", "classic") == "classic":
        return "cuhk03"
    return "market"


def _require_split(name: str, query: Sequence, gallery: Sequence, where: str = "") -> None:
    if not query or not gallery:
        missing = "query" if not query else "gallery"
        raise EvaluationError(
            f"data set {name}{where} has no {missing} split ({len(query)} query, {len(gallery)} "
            "gallery images); the protocols rank query images against gallery images")


def _plan(name: str, datasets: dict[str, ReIDDataset], info: dict) -> Plan:
    for task, ds in datasets.items():
        where = f" ({task})" if task != "target" else ""
        _require_split(ds.name if name == "synthetic" else name, ds.query, ds.gallery, where)
    tasks = [Task(task, ds.query, ds.gallery) for task, ds in datasets.items()]
    return Plan(name, protocol_of(name, info), tasks, info)


def run_plan(run: dict[str, Any], dataset: ReIDDataset) -> Plan:
    """The plan of a training run's target; ``dataset`` is ``target_dataset(run)``."""
    name = run["target"]
    if name != "prid2011":
        return _plan(name, {"target": dataset}, dict(dataset.info))
    from edaan_fast.data import build_dataset

    root = run.get("target_root") or run.get("data_root")
    b2a = build_dataset("prid2011", root=root, direction="b2a")
    return _plan(name, {"a2b": dataset, "b2a": b2a}, dict(dataset.info))


def _root(options: TargetOptions, run: dict, name: str) -> str:
    if options.data_root is not None:
        return str(options.data_root)
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


def _synthetic_plan(options: TargetOptions, run: dict, same_as_run: bool) -> Plan:
    from edaan_fast.data import build_dataset
    from edaan_fast.engine.run_config import synthetic_preset, target_dataset

    if same_as_run and options.synthetic_preset is None and options.synthetic_seed is None:
        ds = target_dataset(run)
    else:
        root = options.data_root
        if root is None and run.get("target") == "synthetic":
            root = run.get("target_root") or run.get("data_root")
        ds = build_dataset(
            "synthetic", root=root, domain="target",
            preset=options.synthetic_preset or synthetic_preset(run),
            seed=options.synthetic_seed if options.synthetic_seed is not None
            else int(run.get("seed", 0)))
    return _plan("synthetic", {"target": ds}, dict(ds.info))


def plan_target(options: TargetOptions, run: dict[str, Any]) -> Plan:
    """The evaluation CLI's plan: ``options.dataset`` (default: the run's target) with the
    run's settings unless ``options`` overrides them.

    Raises:
        EvaluationError: no or an unknown data set, a missing folder, an empty split.
    """
    from edaan_fast.data import build_dataset
    from edaan_fast.engine.run_config import target_dataset

    name = options.dataset or run.get("target")
    if name is None:
        raise EvaluationError("--dataset is required: the checkpoint does not record its target "
                              f"data set (choices: {', '.join(DATASETS)})")
    if name not in DATASETS:
        raise EvaluationError(f"the checkpoint's target data set {name!r} is not one this "
                              f"evaluator knows; pass --dataset ({', '.join(DATASETS)})")
    same_as_run = name == run.get("target") and options.data_root is None
    if name == "synthetic":
        return _synthetic_plan(options, run, same_as_run)
    root = _root(options, run, name)
    run_ds = target_dataset(run) if same_as_run and name in ("cuhk03", "prid2011") else None
    run_info = dict(run_ds.info) if run_ds is not None else {}
    if name not in ("cuhk03", "prid2011"):  # readers without evaluation options
        ds = build_dataset(name, root)
        return _plan(name, {"target": ds}, dict(ds.info))
    if name == "cuhk03":
        ds = build_dataset(
            "cuhk03", root, protocol=options.cuhk03_protocol or run_info.get("protocol", "classic"),
            split_id=(options.cuhk03_split_id if options.cuhk03_split_id is not None
                      else int(run_info.get("split_id", 0))),
            image_type=options.cuhk03_image_type or run_info.get("image_type", "detected"))
        return _plan("cuhk03", {"target": ds}, dict(ds.info))
    seed = (options.prid_split_seed if options.prid_split_seed is not None
            else int(run_info.get("seed", 0)))
    directions = {d: build_dataset("prid2011", root, direction=d, seed=seed)
                  for d, _ in PRID_TASKS}
    return _plan("prid2011", directions, {"seed": seed})


def extract_plan(model: nn.Module, plan: Plan, **kwargs) -> dict[str, tuple]:
    """``{task: (query Features, gallery Features)}`` of ``plan`` (each image read once);
    ``kwargs`` go to :func:`~edaan_fast.evaluation.evaluator.extract_features`."""
    from .evaluator import extract_split_features

    splits = {}
    for t in plan.tasks:
        splits[f"{t.name}/query"], splits[f"{t.name}/gallery"] = t.query, t.gallery
    feats = extract_split_features(model, splits, **kwargs)
    return {t.name: (feats[f"{t.name}/query"], feats[f"{t.name}/gallery"]) for t in plan.tasks}


def evaluate_target(model: nn.Module, run: dict[str, Any], dataset: ReIDDataset, *,
                    device: torch.device | str = "cpu", batch_size: int = 128,
                    num_workers: int = 0, progress: bool = False) -> ProtocolResult:
    """Target-domain scores of ``model`` as a run reports them (see the module docstring);
    ``run["loader"]`` at ``run["image_size"]``; PRID2011: the mean of both directions."""
    plan = run_plan(run, dataset)
    features = extract_plan(model, plan, image_size=tuple(run["image_size"]),
                            batch_size=batch_size, loader=run["loader"],
                            num_workers=num_workers, device=device, amp=False, flip=False,
                            progress=progress)
    results = evaluate_tasks(plan.protocol, features)
    return results["mean" if plan.protocol == "prid2011" else "target"]
