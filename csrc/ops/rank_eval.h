// _rank_count_preceding: the per-query counting step of the sort-free ranking evaluation,
// written once for both backends.
//
// For query q the positives (gallery items with q's pid and another camera) are given sorted
// by the key (distance, global gallery index): pos_dist[k], pos_gidx[k], k = 0..P-1. A
// gallery item precedes positive k when its key is strictly smaller: a stable sort on
// (distance, index). The rank of positive k among the valid gallery items is
//
//     r_k = k  (the positives before it)  +  #{negatives j : (d_j, j) < (d_k, g_k)}
//
// and this op counts the second term over one block of gallery columns (a tile, or one
// process's shard of the gallery), so the counts of several blocks add up. Items with the
// query's pid are never read: they are either junk (same camera, dropped by the protocol) or
// positives (accounted for by the k term), which also means that only the positives' own
// distances (given, not read from the block) decide their order.
//
// Per item: most items are farther than the farthest positive and precede nobody (one
// compare); the others get a binary search in the sorted positives, b = #positives not
// after the item, and bump bin b (the item precedes positives b..P-1). A prefix sum of the
// bins gives the counts. A NaN distance of an evaluated query marks its counts with
// kRankNanFlag (negative even after adding the counts of other blocks).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "common.h"

namespace edaan_fast {

// Written into every count of a query whose distances contain a NaN.
constexpr int64_t kRankNanFlag = -(int64_t(1) << 62);

namespace rank_math {

// (da, ia) < (db, ib) in the stable order on (distance, index).
template <typename acc_t>
C10_HOST_DEVICE inline bool key_less(acc_t da, int64_t ia, acc_t db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

// The number of sorted positives whose key is <= (d, idx): the item precedes positives
// [result, P). Plain binary search (upper bound); P is small.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t positives_not_after(const acc_t* pos_d, const int64_t* pos_g,
                                                   int64_t P, acc_t d, int64_t idx) {
  int64_t lo = 0, hi = P;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (key_less<acc_t>(d, idx, pos_d[mid], pos_g[mid])) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// What one gallery item adds, given that it was not skipped by the "farther than every
// positive" test (d > dmax) -- the caller does that test first because it is the common case.
// Returns the bin to bump in [0, P), P when the item precedes no positive or is not counted
// (same pid: junk or positive), or -1 for a NaN distance.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t item_bin(const acc_t* pos_d, const int64_t* pos_g, int64_t P,
                                        acc_t d, int64_t gidx, int64_t g_pid, int64_t q_pid) {
  if (d != d) return -1;
  if (g_pid == q_pid) return P;
  return positives_not_after<acc_t>(pos_d, pos_g, P, d, gidx);
}

}  // namespace rank_math

// The one input check of _rank_count_preceding (both backends).
inline void check_rank_count_inputs(const at::Tensor& dist, const at::Tensor& q_pids,
                                    const at::Tensor& g_pids, const at::Tensor& pos_offsets,
                                    const at::Tensor& pos_dist, const at::Tensor& pos_gidx,
                                    int64_t g_offset) {
  constexpr const char* op = "_rank_count_preceding";
  TORCH_CHECK(dist.dim() == 2, op, ": dist must be a 2-D [num_query, num_gallery] tensor, got ",
              dist.dim(), "-D ", shape_str(dist.sizes()));
  TORCH_CHECK(at::isFloatingType(dist.scalar_type()), op,
              ": dist must be floating point (float64, float32, float16 or bfloat16), got ",
              dist.scalar_type());
  const int64_t Q = dist.size(0), G = dist.size(1);
  TORCH_CHECK(q_pids.dim() == 1 && q_pids.size(0) == Q && q_pids.scalar_type() == at::kLong, op,
              ": q_pids must be int64 [", Q, "] (one per dist row), got ", q_pids.scalar_type(),
              " ", shape_str(q_pids.sizes()));
  TORCH_CHECK(g_pids.dim() == 1 && g_pids.size(0) == G && g_pids.scalar_type() == at::kLong, op,
              ": g_pids must be int64 [", G, "] (one per dist column), got ", g_pids.scalar_type(),
              " ", shape_str(g_pids.sizes()));
  TORCH_CHECK(pos_offsets.dim() == 1 && pos_offsets.size(0) == Q + 1 &&
                  pos_offsets.scalar_type() == at::kLong,
              op, ": pos_offsets must be int64 [", Q + 1, "] (num_query + 1), got ",
              pos_offsets.scalar_type(), " ", shape_str(pos_offsets.sizes()));
  TORCH_CHECK(pos_dist.dim() == 1 && pos_dist.scalar_type() == dist.scalar_type(), op,
              ": pos_dist must be a 1-D tensor of the dtype of dist (", dist.scalar_type(),
              "), got ", pos_dist.scalar_type(), " ", shape_str(pos_dist.sizes()));
  TORCH_CHECK(pos_gidx.dim() == 1 && pos_gidx.size(0) == pos_dist.size(0) &&
                  pos_gidx.scalar_type() == at::kLong,
              op, ": pos_gidx must be int64 [", pos_dist.size(0), "] like pos_dist, got ",
              pos_gidx.scalar_type(), " ", shape_str(pos_gidx.sizes()));
  TORCH_CHECK(g_offset >= 0, op, ": g_offset (global index of the first dist column) must be >= 0, got ",
              g_offset);
  for (const at::Tensor* t : {&q_pids, &g_pids, &pos_offsets, &pos_dist, &pos_gidx}) {
    TORCH_CHECK(t->device() == dist.device(), op, ": every input must be on the device of dist (",
                dist.device(), "), got one on ", t->device());
  }
}

}  // namespace edaan_fast
