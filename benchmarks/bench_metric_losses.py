"""Batch-hard triplet loss, forward+backward: fused op vs the eager reference vs a plain torch
batch-hard triplet (torchreid's TripletLoss, vectorised) vs pytorch-metric-learning
(``TripletMarginLoss(margin=0.3)`` + ``BatchHardMiner()``, skipped when not installed), for
B in {64, 128, 256} x D in {128, 2048}, PK batches (4 images per identity). The fused quartet
loss is timed too.

    python -m pytest benchmarks/bench_metric_losses.py --benchmark-only
    python benchmarks/bench_metric_losses.py [--rounds 200]    # interleaved table of medians

Every pytest case times its own implementation with pytest-benchmark; the fused case also times
all implementations interleaved (round-robin, so that a noisy, shared machine slows them alike)
and puts the medians and the ratios ``peer / fused`` in ``extra_info``. EDAAN_FAST_BENCH_QUICK=1
runs one small size with few rounds.

Speed floor (``test_speed_floor``, every mode, CPU): B=64, D=128, forward+backward, interleaved
on one thread (benchmarks/_timing.py): the eager reference at least 2.2x and the best peer at
least 1.3x the fused triplet loss's time (RESULTS.md: 4.6x and 2.61x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pytest
import torch

from benchmarks._timing import check_floor, interleaved, one_thread
from edaan_fast.ops import quartet_loss, reference, triplet_loss

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(64, 128)] if QUICK else [(b, d) for b in (64, 128, 256) for d in (128, 2048)]
MARGIN = 0.3

try:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
except ImportError:  # optional benchmark dependency (DEPS_losses.txt)
    pml_losses = pml_miners = None


def torchreid_triplet(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchreid's batch-hard TripletLoss, with the per-row max/min vectorised."""
    n = emb.size(0)
    dist = emb.pow(2).sum(dim=1, keepdim=True).expand(n, n)
    dist = dist + dist.t()
    dist = dist.addmm(emb, emb.t(), beta=1, alpha=-2)
    dist = dist.clamp(min=1e-12).sqrt()
    mask = labels.expand(n, n).eq(labels.expand(n, n).t())
    dist_ap = dist.masked_fill(~mask, float("-inf")).max(dim=1).values
    dist_an = dist.masked_fill(mask, float("inf")).min(dim=1).values
    y = torch.ones_like(dist_an)
    return torch.nn.functional.margin_ranking_loss(dist_an, dist_ap, y, margin=MARGIN)


def _pml():
    loss_fn = pml_losses.TripletMarginLoss(margin=MARGIN)
    miner = pml_miners.BatchHardMiner()
    return lambda emb, labels: loss_fn(emb, labels, miner(emb, labels))


IMPLS = {
    "fused": lambda e, y: triplet_loss(e, y, MARGIN),
    "fused_quartet": lambda e, y: quartet_loss(e, y, MARGIN),
    "eager_reference": lambda e, y: reference.triplet_loss(e, y, MARGIN),
    "torchreid": torchreid_triplet,
    "pml": _pml() if pml_losses is not None else None,
}
PEERS = ["eager_reference", "torchreid", "pml"]


def _inputs(B: int, D: int):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, D, generator=g).to(DEVICE).requires_grad_(True)
    labels = (torch.arange(B) // 4).to(DEVICE)
    return emb, labels


def _step(fn, emb, labels):
    def run():
        (grad,) = torch.autograd.grad(fn(emb, labels), emb)
        return grad

    return run


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(B: int, D: int, rounds: int, impls=None) -> dict[str, float]:
    """Median seconds of forward+backward per implementation, timed round-robin."""
    emb, labels = _inputs(B, D)
    names = [n for n in (impls or IMPLS) if IMPLS[n] is not None]
    steps = {n: _step(IMPLS[n], emb, labels) for n in names}
    for n in names:  # warm-up
        for _ in range(3):
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            _sync()
            t0 = time.perf_counter()
            steps[n]()
            _sync()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def ratios(med: dict[str, float]) -> dict[str, float]:
    out = {f"{p}/fused": med[p] / med["fused"] for p in PEERS if p in med}
    peers = [med[p] for p in PEERS if p in med and p != "eager_reference"]
    if peers:
        out["best_peer/fused"] = min(peers) / med["fused"]
    return out


@pytest.mark.parametrize("B,D", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, B, D):
    if IMPLS[impl] is None:
        pytest.skip("pytorch-metric-learning is not installed (optional, DEPS_losses.txt)")
    emb, labels = _inputs(B, D)
    step = _step(IMPLS[impl], emb, labels)
    benchmark.group = f"triplet fwd+bwd B={B} D={D} {DEVICE}"
    benchmark.extra_info.update(B=B, D=D, device=DEVICE)
    if impl == "fused":
        med = interleaved_medians(B, D, 5 if QUICK else 60)
        benchmark.extra_info.update({f"median_ms[{k}]": v * 1e3 for k, v in med.items()})
        benchmark.extra_info.update(ratios(med))
    grad = benchmark.pedantic(step, rounds=3 if QUICK else 50, iterations=1, warmup_rounds=2)
    if impl in ("fused", "torchreid"):  # same loss: same gradient
        (want,) = torch.autograd.grad(reference.triplet_loss(emb, labels, MARGIN), emb)
        torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(grad).all()


FLOORS = {"eager_reference/fused": 2.2, "best_peer/fused": 1.3}


@pytest.mark.parametrize("which", list(FLOORS))
def test_speed_floor(benchmark, which):
    if DEVICE != "cpu":
        pytest.skip("the floors are CPU measurements (benchmarks/RESULTS.md)")
    emb, labels = _inputs(64, 128)
    names = ["fused"] + (["eager_reference"] if which.startswith("eager") else ["torchreid", "pml"])
    cases = {n: _step(IMPLS[n], emb, labels) for n in names if IMPLS[n] is not None}

    def ratio():
        with one_thread():
            return ratios(interleaved(cases, 21, warmup=3))[which]

    benchmark.group = "speed floors"
    benchmark.pedantic(lambda: check_floor(f"triplet fwd+bwd B=64 D=128: {which}", ratio,
                                           FLOORS[which], benchmark), rounds=1, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5 if QUICK else 200)
    args = parser.parse_args()
    names = [n for n in IMPLS if IMPLS[n] is not None]
    print(f"device={DEVICE} threads={torch.get_num_threads()} rounds={args.rounds} "
          f"(median ms, forward+backward)")
    print(f"{'B':>4} {'D':>5} " + " ".join(f"{n:>15}" for n in names) + "  best_peer/fused")
    for B, D in SIZES:
        med = interleaved_medians(B, D, args.rounds)
        r = ratios(med)
        print(f"{B:>4} {D:>5} " + " ".join(f"{med[n] * 1e3:>15.3f}" for n in names)
              + f"  {r.get('best_peer/fused', float('nan')):>6.2f}x")


if __name__ == "__main__":
    main()
