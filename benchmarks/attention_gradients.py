"""What each term of eq. (9) asks of the attention maps, on the person and on the background.

For a checkpoint of a run with attention nets and person masks of its training images (the
embedded set's own, or a mask folder of ``python -m edaan_fast.masks --splits all``), this
averages minus the gradient of every weighted generator term with respect to ``A_S(x_S)`` and
``A_T(x_T)`` over person pixels and background pixels of a few PK batches (positive = the term
pushes ``A`` up, towards keeping the pixel), as docs/attention.md §3 tabulates::

    python benchmarks/attention_gradients.py --checkpoint runs/real/checkpoint.pt \\
        --source-masks masks/cuhk03 --target-masks masks/market1501 [--batches 4]

The run's own options (objective, phase) are read from the checkpoint. Printed ×1e4, as the
mean per pixel of a batch (each term is a mean over the batch, so a pixel's share is small).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from edaan_fast.data import build_loader
from edaan_fast.data.person_masks import read_person_masks
from edaan_fast.data.synthetic import load_masks
from edaan_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint
from edaan_fast.engine.run_config import RunConfig, source_dataset, target_dataset
from edaan_fast.engine.stages import build_objective

TERMS = ("gan_s2t", "gan_t2s", "cycle", "attention", "metric", "id")


def _pk(records, n, generator, k=4):
    """A PK batch of ``n`` records (``n // k`` identities, ``k`` images each, drawn at random)
    with spares, so the metric loss has positives; unlabelled-style random ones for
    ``k = 1``."""
    if k == 1:
        return [records[i] for i in torch.randperm(len(records), generator=generator)[: n * 2]]
    by_pid = {}
    for r in records:
        by_pid.setdefault(r.pid, []).append(r)
    pids = [p for p, rs in sorted(by_pid.items()) if len(rs) >= k + 1]
    chosen = []
    for i in torch.randperm(len(pids), generator=generator)[: n // k].tolist():
        rs = by_pid[pids[i]]
        chosen += [rs[j] for j in torch.randperm(len(rs), generator=generator)[: k + 1]]
    return chosen


def _records_with_masks(records, folder, image_size, n, generator, k):
    chosen = _pk(records, n, generator, k)
    if folder is None:
        masks = load_masks(chosen)
        if masks is None:
            sys.exit("no masks: give a mask folder for a real data set")
        masks = F.interpolate(masks, size=image_size, mode="bilinear", align_corners=False)
        if k > 1:
            index = [i for i in range(len(chosen)) if i % (k + 1) < k][:n]
            return [chosen[i] for i in index], masks[index]
        return chosen[:n], masks[:n]
    kept, masks = read_person_masks(chosen, folder, size=image_size)
    if k > 1:  # k per identity: drop the spares, keeping whole identities where it can
        by_pid = {}
        for i, r in enumerate(kept):
            by_pid.setdefault(r.pid, []).append(i)
        index = [i for ids in by_pid.values() for i in ids[:k]][:n]
        return [kept[i] for i in index], masks[index]
    return kept[:n], masks[:n]


def _images(records, image_size):
    dl = build_loader(records, train=False, batch_size=len(records), num_workers=0,
                      image_size=image_size)
    return next(iter(dl))


def term_gradients(model, objective, x_s, y_s, x_t, m_s, m_t, masked: bool) -> dict:
    """``{term: (A_S person, A_S background, A_T person, A_T background)}``: minus the mean
    gradient of each weighted term at the maps over person / background pixels."""
    model.train()
    out = model(x_s, x_t)
    a_s, a_t = out.s2t.attention, out.t2s.attention
    losses = objective.generator_losses(model, out, x_s, x_t, y_s, masked)
    w = objective.weights
    weight = {"gan_s2t": w.gan, "gan_t2s": w.gan, "cycle": w.cycle, "attention": w.attention,
              "metric": w.metric, "id": w.id}
    rows = {}
    for term in TERMS:
        value = getattr(losses, term)
        if not value.requires_grad:
            rows[term] = (0.0, 0.0, 0.0, 0.0)
            continue
        g_s, g_t = torch.autograd.grad(weight[term] * value, [a_s, a_t], retain_graph=True,
                                       allow_unused=True)
        row = []
        for g, m in ((g_s, m_s), (g_t, m_t)):
            if g is None:
                row += [0.0, 0.0]
                continue
            person = m > 0.5
            row += [float(-g[person].mean()), float(-g[~person].mean())]
        rows[term] = tuple(row)
    rows["maps"] = (float(a_s[m_s > 0.5].mean()), float(a_s[m_s <= 0.5].mean()),
                    float(a_t[m_t > 0.5].mean()), float(a_t[m_t <= 0.5].mean()))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--source-masks", help="mask folder of the source training images")
    p.add_argument("--target-masks", help="mask folder of the target training images")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--masked", action="store_true",
                   help="score the discriminators on backgrounds (the second phase)")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    run = RunConfig.from_dict({k: v for k, v in ckpt["run"].items()
                               if k not in RunConfig.DERIVED}, "checkpoint").resolve()
    model, _ = model_from_checkpoint(ckpt)
    objective = build_objective(run)
    size = tuple(run.image_size)
    source, target = source_dataset(run.to_dict()), target_dataset(run.to_dict())
    g = torch.Generator().manual_seed(0)
    total = {}
    for _ in range(args.batches):
        rs, m_s = _records_with_masks(source.train, args.source_masks, size, args.batch_size,
                                      g, 4)
        rt, m_t = _records_with_masks(target.train, args.target_masks, size, args.batch_size,
                                      g, 1)
        bs, bt = _images(rs, size), _images(rt, size)
        rows = term_gradients(model, objective, bs.images, bs.pids, bt.images, m_s, m_t,
                              args.masked)
        for k, v in rows.items():
            total[k] = [a + b / args.batches for a, b in zip(total.get(k, [0.0] * 4), v)]
    print(f"checkpoint {args.checkpoint} (epoch {ckpt.get('epoch')}), {args.batches} batches "
          f"of {args.batch_size}; -dL/dA x 1e4 (+ = towards keeping)")
    print("| term | A_S person | A_S background | A_T person | A_T background |")
    print("|---|---:|---:|---:|---:|")
    for k, v in total.items():
        scale = 1.0 if k == "maps" else 1e4
        print(f"| {k} | " + " | ".join(f"{x * scale:+.3f}" for x in v) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
