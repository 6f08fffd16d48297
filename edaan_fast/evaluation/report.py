"""The end-of-run report: ``report.json`` (machine-readable) and ``report.md`` (a table shaped
like the paper's Table I), plus the method names of the paper's tables.

``report.json``::

    {"variant": "edaan", "attention": true, "metric_loss": "quartet", "preset": "tiny",
     "source": "synthetic", "target": "synthetic",
     "metrics": {"rank1": 0.14, "rank5": ..., "rank10": ..., "mAP": ..., "mINP": ...},
     "seconds": 301.2, "epochs": 80, "config": {...the resolved run configuration...},
     "evaluations": [{"epoch": 20, "metrics": {...}}, ...]}

Metrics are fractions in ``[0, 1]`` (``mINP`` is ``null`` where the protocol does not define
it); ``seconds`` is the wall time of the training run, summed over resumed segments. Runs with
attention nets add ``"attention_quality": {"epoch": 40, "A_S": {...}, "A_T": {...}}``: the
quality of each map on its domain's held-out test images at that epoch (the last one measured;
for DAAN, the end of its translator stage), with the fields of
:class:`~edaan_fast.metrics.AttentionQuality` (``auc``, ``iou``, ``best_iou``, ``best_t`` against
the true person masks, ``null`` without them; ``position_auc`` likewise; ``mean``,
``spatial_std``, ``centre_contrast``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["DATASET_NAMES", "METRIC_KEYS", "VARIANT_NAMES", "attention_markdown", "build_report",
           "markdown_table", "method_name", "metrics_dict", "transfer_name", "write_report"]

METRIC_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")

DATASET_NAMES = {"market1501": "Market-1501", "dukemtmcreid": "DukeMTMC-reID",
                 "cuhk03": "CUHK03", "prid2011": "PRID2011"}
VARIANT_NAMES = {"edaan": "EDAAN", "daan": "DAAN", "cyclegan": "CycleGAN",
                 "direct": "Direct Transfer"}


def method_name(run: Mapping[str, Any], no_attention: bool | None = None,
                metric_loss: bool = True) -> str:
    """The row name the paper's tables use for a run: ``EDAAN with Quartet``, ``EDAAN w/o
    attention``, ``DAAN with attention``, ``CycleGAN``, ``Direct Transfer`` (``model`` for a
    run that records no variant), with `` (mask-guided)`` after a run with ``mask_guidance``.
    ``no_attention`` (the model's) stands in for a run that does not record ``attention``;
    ``metric_loss=False`` gives the short form of the figures (``EDAAN``, ``EDAAN w/o
    attention``)."""
    variant = run.get("variant")
    if variant is None:
        return "model"
    attention = run.get("attention", True if no_attention is None else not no_attention)
    if variant in ("edaan", "daan") and not attention:
        return f"{VARIANT_NAMES[variant]} w/o attention"
    if not metric_loss:
        return VARIANT_NAMES.get(variant, str(variant))
    guided = " (mask-guided)" if run.get("mask_guidance") else ""
    if variant == "edaan":
        return f"EDAAN with {str(run.get('metric_loss', 'quartet')).capitalize()}{guided}"
    if variant == "daan":
        return f"DAAN with attention{guided}"
    return VARIANT_NAMES.get(variant, str(variant))


def _dataset_name(name: str, run: Mapping[str, Any], domain: str) -> str:
    if name == "synthetic":
        return f"synthetic-{domain}"
    return DATASET_NAMES.get(name, name)


def transfer_name(run: Mapping[str, Any]) -> str:
    """``Market-1501 → DukeMTMC-reID``; the embedded set reads ``synthetic-source →
    synthetic-target``."""
    return (f"{_dataset_name(run['source'], run, 'source')} → "
            f"{_dataset_name(run['target'], run, 'target')}")


def metrics_dict(result) -> dict[str, float | None]:
    """``rank1, rank5, rank10, mAP, mINP`` of a :class:`~edaan_fast.metrics.protocols
    .ProtocolResult` (or a mapping with those keys) as plain floats."""
    def get(key: str):
        value = result.get(key) if isinstance(result, Mapping) else getattr(result, key)
        return None if value is None else float(value)

    return {k: get(k) for k in METRIC_KEYS}


def build_report(run: Mapping[str, Any], metrics: Mapping[str, float | None], seconds: float,
                 epochs: int, evaluations: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The ``report.json`` payload (see the module docstring)."""
    for key in METRIC_KEYS:
        value = metrics.get(key)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"build_report: metric {key} must be a fraction in [0, 1], got "
                             f"{value!r}")
    return {
        "variant": run["variant"],
        "attention": bool(run["attention"]),
        "metric_loss": run["metric_loss"],
        "preset": run["preset"],
        "source": run["source"],
        "target": run["target"],
        "metrics": {k: metrics.get(k) for k in METRIC_KEYS},
        "seconds": float(seconds),
        "epochs": int(epochs),
        "config": dict(run),
        "evaluations": list(evaluations),
    }


def markdown_table(rows: Iterable[Mapping[str, Any]], extra_columns: Iterable[str] = ()) -> str:
    """A Markdown table like the paper's Table I from ``report.json`` payloads:
    ``Method | Source→Target | R1 | R5 | R10 | mAP`` in percent with one decimal.

    ``extra_columns`` may add ``mINP`` (percent) and ``seconds``.
    """
    extra = list(extra_columns)
    unknown = [c for c in extra if c not in ("mINP", "seconds")]
    if unknown:
        raise ValueError(f"markdown_table: unknown extra columns {unknown}; choices: mINP, "
                         "seconds")
    head = ["Method", "Source→Target", "R1", "R5", "R10", "mAP", *extra]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join([":---", ":---"] + ["---:"] * (len(head) - 2)) + "|"]

    def pct(value) -> str:
        return "-" if value is None else f"{100.0 * value:.1f}"

    for row in rows:
        run = row.get("config", row)
        m = row["metrics"]
        cells = [method_name(run), transfer_name(run), pct(m.get("rank1")), pct(m.get("rank5")),
                 pct(m.get("rank10")), pct(m.get("mAP"))]
        for c in extra:
            cells.append(pct(m.get("mINP")) if c == "mINP" else f"{row['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def attention_markdown(attention: Mapping[str, Any] | None) -> str:
    """The report's attention section: one row per map (empty without attention nets)."""
    if not attention:
        return ""

    def cell(value, digits=2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["", f"## Attention (epoch {attention['epoch']}, held-out test images)", "",
             "| map | ROC-AUC | IoU @0.5 | best IoU (threshold) | position AUC | mean | "
             "spatial std | centre contrast |", "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for net, what in (("A_S", "A_S on source"), ("A_T", "A_T on target")):
        q = attention[net]
        best = "-" if q["best_iou"] is None else f"{q['best_iou']:.2f} ({q['best_t']:.2f})"
        lines.append(f"| {what} | {cell(q['auc'])} | {cell(q['iou'])} | {best} | "
                     f"{cell(q.get('position_auc'))} | {cell(q['mean'])} | "
                     f"{cell(q['spatial_std'])} | {cell(q['centre_contrast'])} |")
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | os.PathLike, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``output_dir``; returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    _write_text(json_path, json.dumps(report, indent=2) + "\n")
    run = report["config"]
    md = (f"# {method_name(run)}: {transfer_name(run)}\n\n"
          + markdown_table([report], extra_columns=("mINP", "seconds"))
          + f"\nPreset `{report['preset']}`, {report['epochs']} epochs, seed {run['seed']}, "
          f"{report['seconds']:.0f} s. Metrics on the target's query/gallery split "
          "(R = rank-k accuracy, mAP and mINP in percent).\n"
          + attention_markdown(report.get("attention_quality")))
    _write_text(md_path, md)
    return json_path, md_path
