"""What a run's translation changes, in pixels and in the re-ID features.

A translation can only help re-ID through what it changes in the images the re-ID module
learns from. For a trained run this reports, on random source training crops ``x_S`` and their
translations ``x_ST`` (the run's own translator; a two-stage run's ``translator.pt``):

- ``pixels person`` / ``pixels background``: mean ``|x_ST - x_S|`` (normalised units) inside
  and outside the person masks (with ``--source-masks``, else the run's own mask folder);
- for each re-ID model (``--reid RUN``, default the run itself): the mean cosine similarity of
  the retrieval features of ``x_S`` and ``x_ST``, and a domain probe: the held-out accuracy of
  a logistic classifier telling source from target *test* crops by those features (0.5: the
  features carry no domain; 1.0: they separate the domains), for ``x_S`` and for ``x_ST``::

    python benchmarks/translation_effect.py runs/edaan --reid runs/direct --reid runs/edaan

A plain script (not collected by pytest); ``tests/test_translation_effect.py`` covers its
functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from edaan_fast.data import DatasetError, build_loader
from edaan_fast.data.person_masks import read_person_masks
from edaan_fast.deploy.translation import TranslationError, load_translator
from edaan_fast.engine.checkpoint import CheckpointError, model_from_checkpoint
from edaan_fast.engine.run_config import RunConfigError, source_dataset, target_dataset
from edaan_fast.evaluation.evaluator import model_features


def domain_probe(a: torch.Tensor, b: torch.Tensor, seed: int = 0, l2: float = 1e-3) -> float:
    """Held-out accuracy of an L2-regularised logistic classifier separating the rows of ``a``
    from those of ``b`` (features L2-normalised; a random half trains, the other half tests)."""
    x = F.normalize(torch.cat([a, b]).double(), dim=1)
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).double()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[: len(x) // 2], order[len(x) // 2:]
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    c = torch.zeros(1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x[train] @ w + c, y[train])
                + l2 * w.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x[test] @ w + c > 0).double() == y[test]).double().mean().item()


def feature_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return F.cosine_similarity(a.double(), b.double(), dim=1).mean().item()


def masked_change(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """Mean ``|y - x|`` over channels at person pixels (``masks > 0.5``) and at the others."""
    diff = (y - x).abs().mean(1)
    person = masks > 0.5
    return diff[person].mean().item(), diff[~person].mean().item()


def _sample(records, count: int, seed: int):
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
    return [records[i] for i in order[:count]]


def _images(records, size) -> torch.Tensor:
    loader = build_loader(records, train=False, batch_size=64, num_workers=0, image_size=size)
    return torch.cat([b.images for b in loader])


def _features(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model_features(model, x[i:i + 64]) for i in range(0, len(x), 64)])


def measure(run: Path, reid_runs: list[Path], count: int = 400, masks: str | None = None,
            seed: int = 0) -> dict:
    """The report of one translator ``run`` and the re-ID models of ``reid_runs``."""
    translator, ckpt, _ = load_translator(run / "final.pt")
    cfg = ckpt["run"]
    size = tuple(cfg["image_size"])
    source, target = source_dataset(cfg), target_dataset(cfg)
    s_records = _sample(source.train, count, seed)
    t_records = _sample(target.query + target.gallery, count, seed + 1)
    x_s, x_t = _images(s_records, size), _images(t_records, size)
    with torch.no_grad():
        x_st = torch.cat([translator.translate_s2t(x_s[i:i + 64])
                          for i in range(0, len(x_s), 64)])
    report: dict = {"translator": str(run), "images": len(x_s)}
    mask_root = masks or cfg.get("source_person_masks")
    if mask_root:
        kept, m = read_person_masks(s_records, mask_root, size=size)
        keep = {r.path for r in kept}
        rows = torch.tensor([r.path in keep for r in s_records])
        report["pixels person"], report["pixels background"] = masked_change(
            x_s[rows], x_st[rows], m.reshape(len(kept), *size))
    report["reid"] = []
    for reid_run in reid_runs:
        model, reid_ckpt = model_from_checkpoint(reid_run / "final.pt")
        f_s, f_st, f_t = _features(model, x_s), _features(model, x_st), _features(model, x_t)
        report["reid"].append({
            "run": str(reid_run), "variant": (reid_ckpt.get("run") or {}).get("variant"),
            "cos(f(x_S), f(x_ST))": feature_cosine(f_s, f_st),
            "probe x_S vs target": domain_probe(f_s, f_t, seed),
            "probe x_ST vs target": domain_probe(f_st, f_t, seed)})
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run with a translator (its final.pt)")
    p.add_argument("--reid", type=Path, action="append", default=None,
                   help="a finished run whose re-ID model to probe (repeatable; default: run)")
    p.add_argument("--images", type=int, default=400, help="source and target crops each")
    p.add_argument("--source-masks", default=None,
                   help="person masks of the source crops (default: the run's own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        report = measure(args.run, args.reid or [args.run], args.images, args.source_masks,
                         args.seed)
    except (CheckpointError, TranslationError, DatasetError, RunConfigError) as exc:
        print(f"translation_effect: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
