"""``batch_hard_mining``, ``triplet_loss`` and ``quartet_loss``: EDAAN eq. (6)/(7), fused.

Paper symbols -> code. For a batch of re-ID embeddings ``emb`` ``[B, D]`` (rows ``f(x_i)``) with
identity labels ``labels`` ``[B]`` and pairwise distances ``D[i, j]`` (``metric="euclidean"``:
``sqrt(clamp_min(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12))`` as torchreid computes it;
``metric="cosine"``: ``1 - cos(x_i, x_j)``), each anchor ``i`` (``x_a`` in the paper) is mined
batch-hard:

* ``p(i) = argmax_{j != i, y_j = y_i} D[i, j]`` -- the hardest positive ``x_p``,
* ``n(i) = argmin_{y_j != y_i} D[i, j]`` -- the hardest negative ``x_n``,
* ``m(i) = argmin_{y_k not in {y_i, y_n(i)}} D[n(i), k]`` -- the second negative ``x_m``: the
  sample closest to the negative from a third identity.

Eq. (6), triplet: ``L_i = max(D[i,p] - D[i,n] + margin, 0)`` (soft margin:
``softplus(D[i,p] - D[i,n])``). Eq. (7), quartet:
``L_i = max(D[i,p] - D[i,n] + D[i,p] - D[m,n] + margin, 0)``. The loss is the mean of ``L_i``
over the anchors that have a term.

Ties go to the lowest index on every backend (CPU, CUDA and :mod:`edaan_fast.ops.reference`
pick the same indices). The fused loss computes the Gram matrix with one BLAS GEMM, mines and
reduces in one pass over the anchors without an autograd graph over the ``[B, B]`` matrix, and
saves the picked pairs: its backward writes the embedding gradient from those pairs only
(``O(B * D)``, not the ``O(B^2 * D)`` GEMM backward of eager autograd).
"""

from __future__ import annotations

import torch

from . import _library, reference

__all__ = ["batch_hard_mining", "triplet_loss", "quartet_loss"]

_METRICS = ("euclidean", "cosine")


def batch_hard_mining(dist: torch.Tensor, labels: torch.Tensor):
    """Batch-hard mining of eq. (6)/(7) over a given distance matrix.

    Args:
        dist: ``[B, B]`` floating point pairwise distances (any float dtype; compared in float
            for float16/bfloat16).
        labels: ``[B]`` int64 identity labels.

    Returns:
        ``(d_ap, d_an, d_mn, p, n, m, valid)``:

        * ``p``, ``n``, ``m``: ``[B]`` int64 indices of the hardest positive, hardest negative and
          second negative (the closest sample to ``n`` from an identity other than ``y_i`` and
          ``y_n``); ``-1`` where there is none (no other sample of the identity, a single
          identity in the batch, or no third identity).
        * ``d_ap = dist[i, p]``, ``d_an = dist[i, n]``, ``d_mn = dist[n, m]``: ``[B]`` in
          ``dist``'s dtype, exactly the entries of ``dist``; ``0`` where the index is ``-1``.
        * ``valid``: ``[B]`` int8 level of each anchor: ``0`` no term (no positive or no
          negative), ``1`` a triplet term (``p`` and ``n`` exist), ``2`` a quartet term
          (``p``, ``n`` and ``m`` exist). ``valid > 0`` is the triplet mask, ``valid == 2``
          the quartet mask.

    Ties: the lowest index wins. NaN distances win every comparison (as ``torch.max`` and
    ``torch.min`` propagate NaN), the first NaN among them. Not differentiable (the indices are
    what matters; gather from ``dist`` for gradients).
    """
    if _library.reference_enabled():
        return reference.batch_hard_mining(dist, labels)
    _library.require_ops("batch_hard_mining")
    _library.require_cuda_kernels("batch_hard_mining", dist)
    return tuple(torch.ops.edaan_fast.batch_hard_mining.default(dist, labels))


def triplet_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.3,
    metric: str = "euclidean",
    soft_margin: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss, EDAAN eq. (6), fused forward and backward.

    ``mean_i max(D[i,p] - D[i,n] + margin, 0)`` (``soft_margin=True``:
    ``mean_i softplus(D[i,p] - D[i,n])``, margin unused) over the anchors that have a positive
    and a negative (see the module docstring for ``D``, ``p``, ``n``).

    Args:
        emb: ``[B, D]`` embeddings, float32/float16/bfloat16/float64 (float16/bfloat16 are
            computed in float32).
        labels: ``[B]`` int64 identity labels.
        margin: the margin ``alpha`` of eq. (6).
        metric: ``"euclidean"`` or ``"cosine"``.
        soft_margin: use ``softplus`` instead of the hinge.

    Returns:
        A 0-dim float32 loss (float64 for float64 ``emb``). ``0`` with a zero gradient when no
        anchor has both a positive and a negative (one identity only, or every identity with a
        single image). Non-finite embeddings are not checked (that would synchronise the GPU):
        they give a NaN loss and NaN gradients, as the eager reference does.
    """
    if metric not in _METRICS:
        raise ValueError(f"triplet_loss: metric must be one of {_METRICS}, got {metric!r}")
    if _library.reference_enabled():
        return reference.triplet_loss(emb, labels, margin, metric, soft_margin)
    _library.require_ops("triplet_loss")
    _library.require_cuda_kernels("triplet_loss", emb)
    return torch.ops.edaan_fast.triplet_loss.default(emb, labels, margin, metric, soft_margin)


def quartet_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, metric: str = "euclidean"
) -> torch.Tensor:
    """Batch-hard quartet loss, EDAAN eq. (7), fused forward and backward.

    ``mean_i max(D[i,p] - D[i,n] + D[i,p] - D[m,n] + margin, 0)`` over the anchors that have a
    positive and a negative; ``m`` is the second negative (module docstring). An anchor whose
    batch has no third identity (only two identities, or none besides ``y_i`` and ``y_n``)
    falls back to its triplet term ``max(D[i,p] - D[i,n] + margin, 0)`` of eq. (6).

    Args and returns as :func:`triplet_loss` (no ``soft_margin``): a 0-dim float32 loss
    (float64 for float64 ``emb``), ``0`` with a zero gradient when no anchor has a term, NaN
    for non-finite embeddings.
    """
    if metric not in _METRICS:
        raise ValueError(f"quartet_loss: metric must be one of {_METRICS}, got {metric!r}")
    if _library.reference_enabled():
        return reference.quartet_loss(emb, labels, margin, metric)
    _library.require_ops("quartet_loss")
    _library.require_cuda_kernels("quartet_loss", emb)
    return torch.ops.edaan_fast.quartet_loss.default(emb, labels, margin, metric)


# --- fake (meta) kernels and autograd; registered only when the library is loaded -------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_labels_fake(op: str, labels: torch.Tensor, B, like: torch.Tensor, name: str) -> None:
    torch._check(
        labels.dtype == torch.int64 and labels.dim() == 1 and labels.shape[0] == B,
        lambda: f"{op}: labels must be int64 [{B}] (one per row of {name}), got {labels.dtype} "
        f"{list(labels.shape)}",
    )
    torch._check(
        labels.device == like.device,
        lambda: f"{op}: labels must be on the device of {name} ({like.device}), got {labels.device}",
    )


def _register() -> None:
    lib = "edaan_fast::"

    @torch.library.register_fake(lib + "batch_hard_mining")
    def _(dist, labels):
        torch._check(
            dist.dim() == 2 and dist.shape[0] == dist.shape[1],
            lambda: f"batch_hard_mining: dist must be a square 2-D [B, B] tensor, got {list(dist.shape)}",
        )
        B = dist.shape[0]
        _check_labels_fake("batch_hard_mining", labels, B, dist, "dist")
        d = [dist.new_empty((B,)) for _ in range(3)]
        i = [dist.new_empty((B,), dtype=torch.int64) for _ in range(3)]
        return (*d, *i, dist.new_empty((B,), dtype=torch.int8))

    @torch.library.register_fake(lib + "_metric_loss_forward")
    def _(emb, labels, margin, metric, loss):
        torch._check(
            emb.dim() == 2,
            lambda: f"_metric_loss_forward: emb must be a 2-D [B, D] tensor, got {emb.dim()}-D",
        )
        B = emb.shape[0]
        _check_labels_fake("_metric_loss_forward", labels, B, emb, "emb")
        acc = _acc_dtype(emb.dtype)
        return (
            emb.new_empty((), dtype=acc),
            emb.new_empty((B, 3), dtype=torch.int64),
            emb.new_empty((B, 3), dtype=acc),
            emb.new_empty((B, 3), dtype=acc),
        )

    @torch.library.register_fake(lib + "_metric_loss_backward")
    def _(grad, emb, idx, pair_dist, coef, metric):
        return torch.empty_like(emb, memory_format=torch.contiguous_format)

    # Autograd of _metric_loss_forward: csrc/autograd.cpp (backward from the saved pairs).


if _library.load_library():
    _register()
