"""Batch samplers: identity-balanced (PK) batches for the labelled source domain, random
label-free batches for the target domain, and sequential batches for evaluation.

All of them are *batch samplers* (they yield lists of record indices, one list per batch) so
that the torch ``DataLoader`` (``batch_sampler=``) and the DALI pipeline consume the same
order. The training samplers are DDP-aware: every rank builds the same global epoch plan from
``(seed, epoch)`` and keeps every ``world_size``-th batch starting at ``rank``, so the shards
are disjoint and of equal length. ``set_epoch(e)`` reshuffles; ``state_dict()`` /
``load_state_dict()`` capture ``(epoch, position)`` so a resumed run continues the very same
order from the next batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np


class _EpochBatchSampler:
    """Epoch / position bookkeeping shared by the samplers below."""

    def __init__(self, seed: int, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: need 0 <= rank < world_size, got "
                             f"rank={rank}, world_size={world_size}")
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._cache: tuple[int, list[list[int]]] | None = None

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            batches = self._global_batches(rng)
            usable = len(batches) // self.world_size * self.world_size
            self._cache = (self.epoch, batches[self.rank:usable:self.world_size])
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (reshuffles from the seed)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield list(batch)
        # the epoch is exhausted: the next iteration starts the next epoch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(
                f"{type(self).__name__}: cannot resume a state of seed={state['seed']}, "
                f"world_size={state['world_size']} into seed={self.seed}, "
                f"world_size={self.world_size}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class PKSampler(_EpochBatchSampler):
    """Batches of ``P`` identities x ``K`` images (for the quartet/triplet losses).

    Per epoch, each identity's images are shuffled and cut into groups of ``K`` (an identity
    with fewer than ``K`` images contributes one group drawn with replacement; a remainder
    shorter than ``K`` is dropped), giving ``G`` groups in all. The epoch has exactly
    ``G // P`` batches, each made of ``P`` distinct identities picked at random with
    probability proportional to their groups left (so large identities do not pile up at the
    end). If fewer than ``P`` identities still have groups before the epoch is full, every
    identity is dealt a fresh set of groups and the filling goes on; only then can an image
    occur twice in an epoch. The global plan is identical on every rank; rank ``r`` keeps
    batches ``r, r + W, ...``, so every rank has ``G // P // W`` batches, every epoch.

    Args:
        records_pids: the pid of every record (``[r.pid for r in dataset.train]``) or the
            records themselves.
        P: identities per batch. K: images per identity.
        seed: seeds the whole schedule (with the epoch).
        rank, world_size: this process's place in DDP.
    """

    def __init__(self, records_pids: Sequence, P: int, K: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(seed, rank, world_size)
        pids = [getattr(r, "pid", r) for r in records_pids]
        self.index_of = defaultdict(list)
        for i, pid in enumerate(pids):
            self.index_of[int(pid)].append(i)
        self.pids = sorted(self.index_of)
        if P < 1 or K < 1:
            raise ValueError(f"PKSampler: P and K must be >= 1, got P={P}, K={K}")
        if len(self.pids) < P:
            raise ValueError(f"PKSampler: P={P} identities per batch but the records hold only "
                             f"{len(self.pids)} identities")
        self.P, self.K = P, K
        self.batch_size = P * K
        if len(self) == 0:
            raise ValueError(f"PKSampler: {len(self.pids)} identities give fewer than "
                             f"world_size={world_size} batches of P={P} x K={K}")

    def _groups(self, rng: np.random.Generator) -> dict[int, list[list[int]]]:
        groups = {}
        for pid in self.pids:
            idx = np.asarray(self.index_of[pid])
            if len(idx) < self.K:
                groups[pid] = [rng.choice(idx, self.K, replace=True).tolist()]
            else:
                idx = rng.permutation(idx)
                groups[pid] = [idx[j * self.K:(j + 1) * self.K].tolist()
                               for j in range(len(idx) // self.K)]
        return groups

    @property
    def _batches_per_epoch(self) -> int:
        groups = sum(max(1, len(self.index_of[p]) // self.K) for p in self.pids)
        return groups // self.P

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        groups = self._groups(rng)
        batches = []
        while len(batches) < self._batches_per_epoch:
            available = [p for p in self.pids if groups[p]]
            if len(available) < self.P:
                fresh = self._groups(rng)
                for p in self.pids:
                    groups[p] = fresh[p] + groups[p]  # leftovers are used first (popped last)
                continue
            weights = np.array([len(groups[p]) for p in available], dtype=np.float64)
            chosen = rng.choice(len(available), self.P, replace=False, p=weights / weights.sum())
            batch = []
            for c in chosen:
                batch.extend(groups[available[c]].pop())
            batches.append(batch)
        return batches


class RandomBatchSampler(_EpochBatchSampler):
    """Random batches that ignore labels (the unlabelled target domain).

    Each epoch is a permutation of all indices, split into ``world_size`` disjoint interleaved
    shards and cut into batches. With ``drop_last`` (default) every rank gets the same number of
    full batches; without it the permutation is padded by wrapping around so the ranks still get
    equal lengths (the last batch may be short).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        super().__init__(seed, rank, world_size)
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"RandomBatchSampler: need num_samples >= 1 and batch_size >= 1, "
                             f"got {num_samples}, {batch_size}")
        self.num_samples, self.batch_size, self.drop_last = num_samples, batch_size, drop_last
        if len(self) == 0:
            raise ValueError(f"RandomBatchSampler: {num_samples} samples give no full batch of "
                             f"{batch_size} on each of {world_size} rank(s); use drop_last=False")

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        perm = rng.permutation(self.num_samples)
        per_rank = (self.num_samples // self.world_size if self.drop_last
                    else math.ceil(self.num_samples / self.world_size))
        total = per_rank * self.world_size
        if total > len(perm):
            perm = np.concatenate([perm, perm[:total - len(perm)]])
        shards = [perm[r:total:self.world_size] for r in range(self.world_size)]
        n_batches = (per_rank // self.batch_size if self.drop_last
                     else math.ceil(per_rank / self.batch_size))
        # interleave so that _rank_batches' stride-by-world_size selection picks shard `rank`
        batches = []
        for b in range(n_batches):
            for shard in shards:
                batches.append(shard[b * self.batch_size:(b + 1) * self.batch_size].tolist())
        return batches


class SequentialBatchSampler:
    """In-order batches over ``range(num_samples)`` (evaluation); last batch may be short.

    With ``world_size > 1`` rank ``r`` gets the contiguous block ``r`` of near-equal size.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"SequentialBatchSampler: batch_size must be >= 1, got {batch_size}")
        bounds = np.linspace(0, num_samples, world_size + 1).round().astype(int)
        self.indices = list(range(bounds[rank], bounds[rank + 1]))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(len(self)):
            yield self.indices[b * self.batch_size:(b + 1) * self.batch_size]
