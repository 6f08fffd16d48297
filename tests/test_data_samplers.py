"""PK, random and sequential batch samplers: shape of batches, DDP shards, determinism,
epoch reshuffle, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edaan_fast.data import PKSampler, RandomBatchSampler, Record, SequentialBatchSampler


def uneven_pids(seed=0, n_ids=37):
    """Identities with 1..12 images each (some with fewer than K)."""
    rng = np.random.default_rng(seed)
    pids = [p for p in range(n_ids) for _ in range(int(rng.integers(1, 13)))]
    return list(rng.permutation(pids))


@pytest.mark.parametrize("P,K", [(4, 4), (8, 2), (3, 5)])
def test_pk_batches_have_P_ids_times_K(P, K):
    pids = uneven_pids()
    sampler = PKSampler(pids, P=P, K=K, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == P * K
        counts = Counter(pids[i] for i in batch)
        assert len(counts) == P and set(counts.values()) == {K}
    # an identity with >= K images never repeats an image inside its group
    for batch in batches:
        for pid in {pids[i] for i in batch}:
            group = [i for i in batch if pids[i] == pid]
            if pids.count(pid) >= K:
                assert len(set(group)) == K


def test_pk_accepts_records_and_uses_small_identities():
    records = [Record(f"{i}.jpg", pid, 0) for i, pid in enumerate([0, 1, 1, 2, 2, 2, 3])]
    sampler = PKSampler(records, P=2, K=3, seed=1)
    seen = Counter(records[i].pid for b in sampler for i in b)
    assert set(seen) == {0, 1, 2, 3} and all(v == 3 for v in seen.values())


@pytest.mark.parametrize("world_size", [2, 3])
def test_pk_ddp_shards_disjoint_equal_length(world_size):
    pids = uneven_pids(1, n_ids=60)
    shards = [list(PKSampler(pids, 4, 4, seed=7, rank=r, world_size=world_size))
              for r in range(world_size)]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1 and lengths.pop() > 0
    used = [set(i for b in s for i in b) for s in shards]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not used[a] & used[b]
    single = list(PKSampler(pids, 4, 4, seed=7))
    assert sum(len(s) for s in shards) <= len(single)
    assert shards[0][0] == single[0] and shards[1][0] == single[1]


def test_pk_deterministic_and_reshuffled_per_epoch():
    pids = uneven_pids(2)
    a, b = PKSampler(pids, 4, 4, seed=3), PKSampler(pids, 4, 4, seed=3)
    assert list(a) == list(b)  # both now at epoch 1
    e1 = list(a)
    assert e1 == list(b)
    fresh = PKSampler(pids, 4, 4, seed=3)
    e0 = list(fresh)
    assert e0 != e1  # a new epoch is a new order
    fresh.set_epoch(1)
    assert list(fresh) == e1  # set_epoch selects the epoch's order from the seed
    assert list(PKSampler(pids, 4, 4, seed=4)) != e0
    assert {len(list(fresh)) for _ in range(4)} == {len(e0)}  # same length every epoch


def test_pk_resume_continues_the_same_order():
    pids = uneven_pids(3)
    run = PKSampler(pids, 4, 4, seed=9)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(3)]
    state = run.state_dict()
    rest = list(it)
    resumed = PKSampler(pids, 4, 4, seed=9)
    resumed.load_state_dict(state)
    assert state["epoch"] == 2 and state["position"] == 3
    assert list(resumed) == rest
    reference = PKSampler(pids, 4, 4, seed=9)
    reference.set_epoch(2)
    assert list(reference) == head + rest
    with pytest.raises(ValueError, match="cannot resume"):
        PKSampler(pids, 4, 4, seed=10).load_state_dict(state)


def test_pk_rejects_impossible_settings():
    with pytest.raises(ValueError, match="only 2 identities"):
        PKSampler([0, 0, 1, 1], P=3, K=2)
    with pytest.raises(ValueError, match="rank"):
        PKSampler([0, 1, 2], P=1, K=1, rank=2, world_size=2)


@pytest.mark.parametrize("drop_last", [True, False])
def test_random_sampler_ignores_labels_and_shards(drop_last):
    n, bs, world = 103, 8, 3
    shards = [list(RandomBatchSampler(n, bs, seed=1, rank=r, world_size=world,
                                      drop_last=drop_last)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    flat = [[i for b in s for i in b] for s in shards]
    assert all(len(set(f)) == len(f) for f in flat)
    if drop_last:
        assert all(len(b) == bs for s in shards for b in s)
        assert not set(flat[0]) & set(flat[1]) and not set(flat[1]) & set(flat[2])
    else:
        assert set().union(*flat) == set(range(n))  # every sample is seen


def test_random_sampler_epochs_and_state():
    s = RandomBatchSampler(50, 5, seed=2)
    e0, e1 = list(s), list(s)
    assert e0 != e1 and sorted(i for b in e0 for i in b) == list(range(50))
    s2 = RandomBatchSampler(50, 5, seed=2)
    it = iter(s2)
    next(it)
    state = s2.state_dict()
    s3 = RandomBatchSampler(50, 5, seed=2)
    s3.load_state_dict(state)
    assert list(s3) == e0[1:]


def test_sequential_sampler_covers_in_order():
    s = SequentialBatchSampler(10, 4)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(s) == 3
    parts = [SequentialBatchSampler(10, 4, rank=r, world_size=3) for r in range(3)]
    assert [i for p in parts for b in p for i in b] == list(range(10))
