"""Reproducible synthetic re-ID evaluation problems shaped like Market-1501 / DukeMTMC-reID.

Identities are random unit centroids in feature space; an image's feature is its identity's
centroid plus a camera bias (images from one camera look alike) plus per-image noise, so
positives are mostly -- not always -- closer than negatives, and the same-camera junk is closer
still. Galleries hold distractors (pid 0) and junk (pid -1) with their own random features.
"""

from __future__ import annotations

import numpy as np
import torch

SIZES = {
    # name: (num_query, num_gallery, num_ids, num_cams, distractors)
    "market": (3368, 15913, 750, 6, 2793),
    "duke": (2228, 17661, 1110, 8, 408),
    "quick": (300, 1500, 60, 6, 200),
    "floor": (1000, 5000, 250, 6, 800),  # the speed floors of bench_rank_eval.py
}


def make_problem(name: str, dim: int = 2048, seed: int = 0, noise: float = 1.1, cam_bias: float = 0.35):
    """Returns (qf, gf, q_pids, g_pids, q_camids, g_camids): float32 tensors and int64 numpy."""
    num_q, num_g, num_ids, num_cams, num_distr = SIZES[name]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = np.arange(1, num_ids + 1)
    q_pids = rng.choice(ids, num_q)
    q_camids = rng.integers(0, num_cams, num_q)
    num_id_g = num_g - num_distr
    g_pids = np.concatenate([rng.choice(ids, num_id_g), rng.choice([0, -1], num_distr, p=[0.8, 0.2])])
    g_camids = rng.integers(0, num_cams, num_g)
    perm = rng.permutation(num_g)
    g_pids, g_camids = g_pids[perm], g_camids[perm]

    centroids = torch.randn(num_ids + 2, dim, generator=gen)
    centroids /= centroids.norm(dim=1, keepdim=True)
    cams = torch.randn(num_cams, dim, generator=gen)
    cams *= cam_bias / cams.norm(dim=1, keepdim=True)

    def feats(pids, camids):
        n = len(pids)
        f = centroids[torch.as_tensor(pids) + 1] + cams[torch.as_tensor(camids)]
        f += torch.randn(n, dim, generator=gen) * (noise / dim**0.5)
        distractor = torch.as_tensor(pids <= 0)
        f[distractor] = torch.randn(int(distractor.sum()), dim, generator=gen) / dim**0.5 * 1.2
        return f.contiguous()

    return feats(q_pids, q_camids), feats(g_pids, g_camids), q_pids, g_pids, q_camids, g_camids
