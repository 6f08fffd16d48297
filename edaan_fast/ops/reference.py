"""Pure-PyTorch twins of the fused ops: the test oracle and the explicit fallback.

Each function here computes what its fused op computes, with plain (eager, autograd-tracked)
PyTorch. They are selected instead of the compiled kernels only on request
(``EDAAN_FAST_OPS=reference`` or :func:`edaan_fast.ops.set_reference_ops`).
"""

from __future__ import annotations

import torch


def mask_blend(fg: torch.Tensor, bg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """EDAAN eq. (1): ``mask * fg + (1 - mask) * bg``, mask broadcast over channels."""
    return mask * fg + (1 - mask) * bg


def mask_background(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The discriminator's background-only input: ``(1 - mask) * x``."""
    return (1 - mask) * x


def rank_metrics(
    distmat: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    max_rank: int = 50,
):
    """Textbook ranking evaluation (torchreid's ``eval_market1501``) in float64.

    Sorts every row of ``distmat`` with a stable argsort (ties: lower gallery index first),
    drops the gallery items with the query's pid and camera, and reads CMC/AP/INP off the
    match vector. Returns ``(cmc, mAP, mINP, ap_per_query, valid)``: cmc float32 numpy
    ``[min(max_rank, num_gallery)]``, mAP and mINP floats, ap_per_query float64 numpy ``[Q]``
    (NaN for a query without a positive) and valid bool numpy ``[Q]``.
    """
    dist = torch.as_tensor(distmat).detach().to("cpu", torch.float64)
    q_pids, g_pids, q_camids, g_camids = (
        torch.as_tensor(t).detach().cpu().to(torch.int64) for t in (q_pids, g_pids, q_camids, g_camids)
    )
    num_q, num_g = dist.shape
    max_rank = min(max_rank, num_g)
    order = torch.sort(dist, dim=1, stable=True).indices
    ap = torch.full((num_q,), float("nan"), dtype=torch.float64)
    valid = torch.zeros(num_q, dtype=torch.bool)
    all_cmc, all_inp = [], []
    for q in range(num_q):
        o = order[q]
        keep = ~((g_pids[o] == q_pids[q]) & (g_camids[o] == q_camids[q]))
        raw = (g_pids[o][keep] == q_pids[q]).to(torch.float64)
        if not bool(raw.any()):
            continue
        valid[q] = True
        cum = raw.cumsum(0)
        cmc = (cum >= 1).to(torch.float64)
        if cmc.numel() < max_rank:  # fewer kept items than max_rank: the hit stays a hit
            cmc = torch.cat([cmc, cmc.new_ones(max_rank - cmc.numel())])
        all_cmc.append(cmc[:max_rank])
        positions = torch.arange(1, raw.numel() + 1, dtype=torch.float64)
        ap[q] = ((cum / positions) * raw).sum() / raw.sum()
        last = int(torch.nonzero(raw).max())
        all_inp.append(float(raw.sum()) / (last + 1.0))
    if not all_cmc:
        raise ValueError("rank_metrics: no query has a positive in the gallery")
    num_valid = len(all_cmc)
    cmc = torch.stack(all_cmc).sum(0).numpy().astype("float32") / float(num_valid)
    m_ap = float(ap[valid].mean())
    m_inp = float(sum(all_inp) / num_valid)
    return cmc, m_ap, m_inp, ap.numpy(), valid.numpy()
