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


# --- batch-hard mining and the triplet / quartet losses (EDAAN eq. 6/7) ------------------------


def _masked_pick(values: torch.Tensor, mask: torch.Tensor, largest: bool):
    """Per row, the index of the max (largest) or min of ``values`` where ``mask``; ties: the
    lowest index; NaN wins (as torch.amax/amin propagate it), the first NaN. -1 if none."""
    B = values.shape[1]
    if values.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=values.device)
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(mask, values, torch.full_like(values, fill))
    best = masked.amax(dim=1) if largest else masked.amin(dim=1)
    hit = mask & ((values == best[:, None]) | (values.isnan() & best.isnan()[:, None]))
    cols = torch.arange(B, device=values.device).expand_as(values)
    idx = torch.where(hit, cols, torch.full_like(cols, B)).amin(dim=1)
    return torch.where(mask.any(dim=1), idx, torch.full_like(idx, -1))


def _gather_or_zero(dist: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    ok = (rows >= 0) & (cols >= 0)
    picked = dist[rows.clamp_min(0), cols.clamp_min(0)]
    return torch.where(ok, picked, torch.zeros_like(picked))


def _mine_indices(dist: torch.Tensor, labels: torch.Tensor):
    """p, n, m (int64, -1 where absent) of batch-hard mining over ``dist`` (no gradient)."""
    B = dist.shape[0]
    d = dist.detach()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(B, dtype=torch.bool, device=dist.device)
    p = _masked_pick(d, same & ~eye, largest=True)
    n = _masked_pick(d, ~same, largest=False)
    n0 = n.clamp_min(0)
    third = ~same & (labels[None, :] != labels[n0][:, None]) & (n >= 0)[:, None]
    m = _masked_pick(d[n0], third, largest=False)
    return p, n, m


def batch_hard_mining(dist: torch.Tensor, labels: torch.Tensor):
    """Batch-hard mining over a distance matrix: ``(d_ap, d_an, d_mn, p, n, m, valid)``.

    ``p = argmax_{j != i, y_j = y_i} dist[i, j]``, ``n = argmin_{y_j != y_i} dist[i, j]``,
    ``m = argmin_{y_k not in {y_i, y_n}} dist[n, k]``; lowest index on ties; -1 and distance 0
    where absent; ``valid`` int8: 0 no term, 1 triplet (p and n), 2 quartet (p, n and m).
    """
    p, n, m = _mine_indices(dist, labels)
    arange = torch.arange(dist.shape[0], device=dist.device)
    d_ap = _gather_or_zero(dist, arange, p)
    d_an = _gather_or_zero(dist, arange, n)
    d_mn = _gather_or_zero(dist, n, m)
    has_t = (p >= 0) & (n >= 0)
    valid = (has_t.to(torch.int8) + (has_t & (m >= 0)).to(torch.int8)).to(torch.int8)
    return d_ap, d_an, d_mn, p, n, m, valid


def pairwise_distance(emb: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """``[B, B]`` distances of the fused losses, with plain autograd-tracked ops.

    euclidean: ``sqrt(clamp_min(G_ii + G_jj - 2 G_ij, 1e-12))`` with ``G = emb emb^T`` (the
    clamp passes no gradient at zero distance, so all-equal embeddings give zero, finite
    gradients); cosine: ``1 - normalize(emb) normalize(emb)^T``.
    """
    if metric == "euclidean":
        gram = emb @ emb.t()
        sq = gram.diagonal()
        d2 = sq[:, None] + sq[None, :] - 2 * gram
        return d2.clamp(min=1e-12).sqrt()
    if metric == "cosine":
        xn = torch.nn.functional.normalize(emb, p=2, dim=1, eps=1e-12)
        return 1 - xn @ xn.t()
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


def _metric_loss(emb, labels, margin, metric, kind):
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    x = emb.to(acc)
    dist = pairwise_distance(x, metric)
    p, n, m = _mine_indices(dist, labels)
    arange = torch.arange(x.shape[0], device=x.device)
    a = _gather_or_zero(dist, arange, p)
    b = _gather_or_zero(dist, arange, n)
    has_t = (p >= 0) & (n >= 0)
    if kind == "soft_triplet":
        terms = torch.nn.functional.softplus(a - b)
    else:
        terms = torch.relu(a - b + margin)
    if kind == "quartet":
        c = _gather_or_zero(dist, n, m)
        has_q = has_t & (m >= 0)
        terms = torch.where(has_q, torch.relu(a - b + a - c + margin), terms)
    terms = torch.where(has_t, terms, torch.zeros_like(terms))
    count = has_t.sum().clamp_min(1).to(acc)
    return terms.sum() / count


def triplet_loss(emb, labels, margin=0.3, metric="euclidean", soft_margin=False):
    """Batch-hard triplet loss (EDAAN eq. 6), mean over anchors with a positive and a negative;
    0 when there is none. float32 result (float64 for float64 ``emb``)."""
    return _metric_loss(emb, labels, margin, metric, "soft_triplet" if soft_margin else "triplet")


def quartet_loss(emb, labels, margin=0.3, metric="euclidean"):
    """Batch-hard quartet loss (EDAAN eq. 7); anchors with no third identity use the triplet
    term; mean over anchors with a positive and a negative, 0 when there is none."""
    return _metric_loss(emb, labels, margin, metric, "quartet")

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


# --- k-reciprocal re-ranking steps (edaan_fast/ops/reranking.py) ------------------------------


def knn_lists(scores, k, metric="distance", row_sq=None, col_sq=None, kept=None):
    """Twin of :func:`edaan_fast.ops.reranking.knn_lists`: a stable sort of each whole row."""
    s = scores
    if metric == "distance":
        m = s * s
    elif metric == "euclidean":
        m = (row_sq[:, None] + col_sq[None, :] - 2 * s).clamp_min(0)
    elif metric == "cosine":
        m = (1 - s).clamp_min(0) ** 2
    else:
        raise ValueError(f"knn_lists: unknown metric {metric!r}")
    top = m.amax(1) if m.shape[1] else m.new_zeros(m.shape[0])
    top = torch.where(m.isnan().any(1), torch.full_like(top, float("nan")), top)
    scale = torch.where(top > 0, top, torch.where(top.isnan(), top, torch.ones_like(top)))
    norm = m / scale[:, None]
    order = torch.sort(norm, dim=1, stable=True).indices[:, :k]
    if kept is not None and kept.shape[1]:
        kept.copy_(norm[:, -kept.shape[1] :])
    return order, norm.gather(1, order), scale


def knn_features(features, k, metric="euclidean", sq=None, row_start=0, row_end=None, kept=None):
    """Twin of :func:`edaan_fast.ops.reranking.knn_features`: the rows' scores in float64,
    rounded to the features' dtype, then :func:`knn_lists`."""
    end = features.shape[0] if row_end is None else row_end
    f64 = features.double()
    scores = (f64[row_start:end] @ f64.t()).to(features.dtype)
    row_sq = None if sq is None else sq[row_start:end]
    return knn_lists(scores, k, metric, row_sq, sq, kept)


def _reciprocal(nn: torch.Tensor, i: int, k: int) -> list[int]:
    fwd = nn[i, :k]
    return [int(j) for j in fwd if bool((nn[j, :k] == i).any())]


def k_reciprocal_sets(nn, nn_dist, k1, row_start=0, row_end=None):
    """Twin of :func:`edaan_fast.ops.reranking.k_reciprocal_sets`: the per-probe loop."""
    n = nn.shape[0]
    end = n if row_end is None else row_end
    ka, kh = min(k1 + 1, n), min(round(k1 / 2) + 1, n)
    ptr, cols, dist = [0], [], []
    for i in range(row_start, end):
        r = _reciprocal(nn, i, ka)
        members = list(r)
        for q in r:
            rq = _reciprocal(nn, q, kh)
            if 3 * len(set(rq) & set(r)) > 2 * len(rq):
                members += rq
        members = sorted(set(members))
        for j in members:
            hit = (nn[i] == j).nonzero()
            dist.append(float(nn_dist[i, hit[0, 0]]) if hit.numel() else float("nan"))
        cols += members
        ptr.append(len(cols))
    dev = nn.device
    return (
        torch.tensor(ptr, dtype=torch.int64, device=dev),
        torch.tensor(cols, dtype=torch.int64, device=dev),
        torch.tensor(dist, dtype=nn_dist.dtype, device=dev),
    )


def _csr_to_dense(ptr, col, val, cols):
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff())
    dense = torch.zeros(ptr.numel() - 1, cols, dtype=val.dtype, device=val.device)
    dense[rows, col] = val
    return dense


def _dense_to_csr(dense):
    nz = dense != 0
    ptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64, device=dense.device)
    ptr[1:] = nz.sum(1).cumsum(0)
    return ptr, nz.nonzero()[:, 1], dense[nz]


def query_expansion(v_ptr, v_col, v_val, nn, k2, row_start=0, row_end=None):
    """Twin of :func:`edaan_fast.ops.reranking.query_expansion`: dense rows, summed in order."""
    n = nn.shape[0]
    end = n if row_end is None else row_end
    dense = _csr_to_dense(v_ptr, v_col, v_val, n)
    out = torch.zeros(end - row_start, n, dtype=v_val.dtype, device=v_val.device)
    for t in range(k2):
        out += dense[nn[row_start:end, t]]
    return _dense_to_csr(out / k2)


def jaccard_rerank_(dist, q_ptr, q_col, q_val, g_ptr, g_col, g_val, num_columns, lambda_value):
    """Twin of :func:`edaan_fast.ops.reranking.jaccard_rerank_`: dense rows, ``min`` summed over
    the columns in ascending order, then eq. 12 in place."""
    vq = _csr_to_dense(q_ptr, q_col, q_val, num_columns)
    vg = _csr_to_dense(g_ptr, g_col, g_val, num_columns)
    s = torch.zeros(dist.shape, dtype=dist.dtype, device=dist.device)
    for c in range(num_columns):
        s += torch.minimum(vq[:, c : c + 1], vg[None, :, c])
    jaccard = 1 - s / (2 - s)
    dist.copy_(jaccard * (1 - lambda_value) + dist * lambda_value)
    return dist


# --- reflect_pad_conv2d (the generator's and the attention net's 7x7 output layers) -----------


def reflect_pad_conv2d(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(pad(x, (k - 1) / 2, mode="reflect"), weight, bias)``: a k x k convolution (k
    odd, stride 1) over the reflection-padded input, keeping H x W."""
    p = (weight.shape[-1] - 1) // 2
    return torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (p, p, p, p), mode="reflect"), weight, bias)
