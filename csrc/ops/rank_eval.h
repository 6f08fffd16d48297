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
  return static_cast<bool>(static_cast<int>(da < db) |
                           (static_cast<int>(da == db) & static_cast<int>(ia < ib)));
}

// The number of sorted positives whose key is <= (d, idx): the item precedes positives
// [result, P). Binary search (upper bound) written with selects instead of branches: the
// outcome of each step is unpredictable, and P is small.
// pos_t: how the positives' distances are stored (acc_t, or the tensor's scalar_t).
template <typename acc_t, typename pos_t>
C10_HOST_DEVICE inline int64_t positives_not_after(const pos_t* pos_d, const int64_t* pos_g,
                                                   int64_t P, acc_t d, int64_t idx) {
  int64_t lo = 0, n = P;
  while (n > 0) {
    const int64_t half = n >> 1;
    const bool right =
        !key_less<acc_t>(d, idx, static_cast<acc_t>(pos_d[lo + half]), pos_g[lo + half]);
    lo = right ? lo + half + 1 : lo;
    n = right ? n - half - 1 : half;
  }
  return lo;
}

// What one gallery item adds, given that it was not skipped by the "farther than every
// positive" test (d > dmax) -- the caller does that test first because it is the common case.
// Returns the bin to bump in [0, P), P when the item precedes no positive or is not counted
// (same pid: junk or positive), or -1 for a NaN distance.
template <typename acc_t, typename pos_t>
C10_HOST_DEVICE inline int64_t item_bin(const pos_t* pos_d, const int64_t* pos_g, int64_t P,
                                        acc_t d, int64_t gidx, int64_t g_pid, int64_t q_pid) {
  if (d != d) return -1;
  if (g_pid == q_pid) return P;
  return positives_not_after<acc_t, pos_t>(pos_d, pos_g, P, d, gidx);
}

// Sorts one query's positives in place by (distance, index): insertion sort, stable and fast
// for the handful of positives a query has (a NaN distance sorts last; the count step then
// flags the query).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void sort_positives(scalar_t* pos_d, int64_t* pos_g, int64_t P) {
  for (int64_t i = 1; i < P; ++i) {
    const scalar_t d = pos_d[i];
    const int64_t g = pos_g[i];
    const acc_t da = static_cast<acc_t>(d);
    int64_t j = i;
    while (j > 0 && (key_less<acc_t>(da, g, static_cast<acc_t>(pos_d[j - 1]), pos_g[j - 1]) ||
                     (static_cast<acc_t>(pos_d[j - 1]) != static_cast<acc_t>(pos_d[j - 1]) &&
                      da == da))) {
      pos_d[j] = pos_d[j - 1];
      pos_g[j] = pos_g[j - 1];
      --j;
    }
    pos_d[j] = d;
    pos_g[j] = g;
  }
}

}  // namespace rank_math

// The input check of _rank_sort_positives (both backends).
inline void check_rank_sort_inputs(const at::Tensor& pos_offsets, const at::Tensor& pos_dist,
                                   const at::Tensor& pos_gidx) {
  constexpr const char* op = "_rank_sort_positives";
  TORCH_CHECK(pos_offsets.dim() == 1 && pos_offsets.size(0) >= 1 &&
                  pos_offsets.scalar_type() == at::kLong,
              op, ": pos_offsets must be int64 [num_query + 1], got ", pos_offsets.scalar_type(),
              " ", shape_str(pos_offsets.sizes()));
  TORCH_CHECK(pos_dist.dim() == 1 && at::isFloatingType(pos_dist.scalar_type()), op,
              ": pos_dist must be a 1-D floating point tensor, got ", pos_dist.scalar_type(), " ",
              shape_str(pos_dist.sizes()));
  TORCH_CHECK(pos_gidx.dim() == 1 && pos_gidx.size(0) == pos_dist.size(0) &&
                  pos_gidx.scalar_type() == at::kLong,
              op, ": pos_gidx must be int64 [", pos_dist.size(0), "] like pos_dist, got ",
              pos_gidx.scalar_type(), " ", shape_str(pos_gidx.sizes()));
  TORCH_CHECK(pos_dist.device() == pos_offsets.device() && pos_gidx.device() == pos_offsets.device(),
              op, ": every input must be on the device of pos_offsets (", pos_offsets.device(),
              "), got pos_dist on ", pos_dist.device(), " and pos_gidx on ", pos_gidx.device());
}

// pos_offsets must run from 0 to `total` without decreasing (checked where it is on the host).
inline void check_rank_offsets(const char* op, const int64_t* o, int64_t num_q, int64_t total) {
  TORCH_CHECK(o[0] == 0 && o[num_q] == total, op, ": pos_offsets must run from 0 to ", total,
              " (the number of positives), got ", o[0], " .. ", o[num_q]);
  for (int64_t q = 0; q < num_q; ++q) {
    TORCH_CHECK(o[q + 1] >= o[q], op, ": pos_offsets must be non-decreasing, got ", o[q],
                " then ", o[q + 1], " at query ", q);
  }
}

// The same check for pos_offsets on any device: a CUDA tensor is copied to the host first (a
// few KB and one synchronisation per call), so bad offsets raise instead of sending the kernels
// out of bounds.
inline void check_rank_offsets(const char* op, const at::Tensor& pos_offsets, int64_t total) {
  const at::Tensor host = pos_offsets.to(at::kCPU).contiguous();
  check_rank_offsets(op, host.const_data_ptr<int64_t>(), host.size(0) - 1, total);
}

// The input check of _distance_gemm (both backends): a [Q, D] and b [G, D] floating point,
// same dtype and device.
inline void check_distance_gemm_inputs(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "_distance_gemm";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), op,
              ": a and b must be 2-D [num, dim] with the same dim, got ", shape_str(a.sizes()),
              " and ", shape_str(b.sizes()));
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && a.scalar_type() == b.scalar_type(), op,
              ": a and b must have the same floating point dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": a and b must be on the same device, got ",
              a.device(), " and ", b.device());
}

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
