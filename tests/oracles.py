"""Independent reference implementations the tests compare against (one copy each).

- ``BatchHardTriplet``: a small pure-torch batch-hard triplet loss, the stand-in metric loss of
  the objective and train-step tests;
- ``market_loop``: torchreid's ``eval_market1501`` with a stable argsort, query by query, with
  mINP — the numpy ranking oracle of the protocol and evaluation tests;
- ``market_mini``: where the real Market-1501 subset lives on this machine, if anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class BatchHardTriplet(nn.Module):
    """A small pure-torch batch-hard triplet loss (the test stand-in for QuartetLoss)."""

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(emb, emb)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
        hardest_pos = d.masked_fill(~same | eye, float("-inf")).amax(1)
        hardest_neg = d.masked_fill(same, float("inf")).amin(1)
        return F.relu(hardest_pos - hardest_neg + self.margin).mean()


def market_loop(d, qp, gp, qc, gc, max_rank=50):
    """torchreid's eval_market1501, with a stable argsort, one query at a time.

    Returns ``(cmc, mAP, mINP, num_valid_queries)``.
    """
    cmcs, aps, inps = [], [], []
    for i in range(d.shape[0]):
        order = np.argsort(d[i], kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i]))
        raw = (gp[order] == qp[i])[keep].astype(np.float64)
        if not raw.any():
            continue
        cmc = np.minimum(raw.cumsum(), 1)
        cmcs.append(cmc[:max_rank])
        prec = raw.cumsum() / np.arange(1, len(raw) + 1)
        aps.append((prec * raw).sum() / raw.sum())
        last = np.nonzero(raw)[0][-1]
        inps.append(raw.sum() / (last + 1))
    return np.mean(cmcs, 0), float(np.mean(aps)), float(np.mean(inps)), len(cmcs)


def market_mini() -> Path | None:
    """The real Market-1501 subset (``../shared/data`` or ``$EDAAN_FAST_SHARED_DATA``), if this
    machine has it (never part of the repo)."""
    candidates = []
    if os.environ.get("EDAAN_FAST_SHARED_DATA"):
        env = Path(os.environ["EDAAN_FAST_SHARED_DATA"])
        candidates += [env / "market1501-mini", env]
    candidates.append(REPO.parent / "shared" / "data" / "market1501-mini")
    return next((c for c in candidates
                 if (c / "Market-1501-v15.09.15" / "bounding_box_train").is_dir()), None)
