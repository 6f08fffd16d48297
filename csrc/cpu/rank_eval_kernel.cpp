// CPU kernel of _rank_count_preceding (math: csrc/ops/rank_eval.h).
//
// Parallel over queries (at::parallel_for). One pass over each dist row: blocks of 16
// distances are first tested together against the farthest positive (a branch-free loop the
// compiler vectorises); only a block holding an item that may precede a positive is walked one
// item at a time (pid test, binary search, bin bump). The pass reads each distance once, so it
// runs at memory bandwidth for the usual case where most of the gallery is farther than every
// positive. Rows may be strided (a column block of a larger matrix is read in place).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <vector>

#include "../ops/rank_eval.h"

namespace edaan_fast {
namespace {

using namespace rank_math;

constexpr int64_t kBlock = 16;

// Bit j set when item j of the block may precede a positive: !(row[j] > dmax), i.e. also for
// NaN. SSE2 (every x86-64) for float/double; a plain loop otherwise.
template <typename scalar_t, typename acc_t>
inline uint32_t block_candidates(const scalar_t* row, acc_t dmax) {
  uint32_t mask = 0;
  for (int64_t j = 0; j < kBlock; ++j) {
    mask |= uint32_t(!(static_cast<acc_t>(row[j]) > dmax)) << j;
  }
  return mask;
}

#if defined(__SSE2__)
template <>
inline uint32_t block_candidates<float, float>(const float* row, float dmax) {
  const __m128 m = _mm_set1_ps(dmax);
  uint32_t mask = 0;
  for (int j = 0; j < kBlock; j += 4) {
    mask |= uint32_t(_mm_movemask_ps(_mm_cmpngt_ps(_mm_loadu_ps(row + j), m))) << j;
  }
  return mask;
}

template <>
inline uint32_t block_candidates<double, double>(const double* row, double dmax) {
  const __m128d m = _mm_set1_pd(dmax);
  uint32_t mask = 0;
  for (int j = 0; j < kBlock; j += 2) {
    mask |= uint32_t(_mm_movemask_pd(_mm_cmpngt_pd(_mm_loadu_pd(row + j), m))) << j;
  }
  return mask;
}
#endif

template <typename scalar_t>
void count_rows(const at::Tensor& dist, const int64_t* q_pids, const int64_t* g_pids,
                const int64_t* offsets, const scalar_t* pos_dist, const int64_t* pos_gidx,
                int64_t g_offset, int64_t* counts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = dist.size(0), G = dist.size(1), row_stride = dist.stride(0);
  const scalar_t* base = dist.const_data_ptr<scalar_t>();
  // Queries are handed out in small chunks from a shared counter rather than split in equal
  // halves up front: on a loaded machine a thread that is descheduled then only delays the
  // chunk it holds, not half of the work.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(G, 1));
  const int64_t num_chunks = (Q + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> pd;
    std::vector<int64_t> bins;
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      for (int64_t q = c * chunk, end = std::min(Q, q + chunk); q < end; ++q) {
      const int64_t off = offsets[q], P = offsets[q + 1] - off;
      if (P == 0) continue;
      pd.resize(P);
      bins.assign(P + 1, 0);
      bool nan = false;
      for (int64_t k = 0; k < P; ++k) {
        pd[k] = static_cast<acc_t>(pos_dist[off + k]);
        nan |= pd[k] != pd[k];
      }
      const int64_t* pg = pos_gidx + off;
      const acc_t dmax = pd[P - 1];
      const int64_t qp = q_pids[q];
      const scalar_t* row = base + q * row_stride;
      int64_t j0 = 0;
      for (; j0 + kBlock <= G; j0 += kBlock) {
        uint32_t mask = block_candidates<scalar_t, acc_t>(row + j0, dmax);
        while (mask != 0) {
          const int64_t j = j0 + __builtin_ctz(mask);
          mask &= mask - 1;
          const acc_t d = static_cast<acc_t>(row[j]);
          const int64_t b = item_bin<acc_t, acc_t>(pd.data(), pg, P, d, g_offset + j, g_pids[j], qp);
          if (b < 0) {
            nan = true;
          } else {
            ++bins[b];
          }
        }
      }
      for (int64_t j = j0; j < G; ++j) {
        const acc_t d = static_cast<acc_t>(row[j]);
        if (d > dmax) continue;
        const int64_t b = item_bin<acc_t, acc_t>(pd.data(), pg, P, d, g_offset + j, g_pids[j], qp);
        if (b < 0) {
          nan = true;
        } else {
          ++bins[b];
        }
      }
      int64_t run = 0;
      for (int64_t k = 0; k < P; ++k) {
        run += bins[k];
        counts[off + k] = nan ? kRankNanFlag : run;
      }
      }
    }
  });
}

at::Tensor rank_count_preceding_cpu(const at::Tensor& dist, const at::Tensor& q_pids,
                                    const at::Tensor& g_pids, const at::Tensor& pos_offsets,
                                    const at::Tensor& pos_dist, const at::Tensor& pos_gidx,
                                    int64_t g_offset) {
  check_rank_count_inputs(dist, q_pids, g_pids, pos_offsets, pos_dist, pos_gidx, g_offset);
  const at::Tensor d = dist.stride(1) == 1 || dist.size(1) <= 1 ? dist : dist.contiguous();
  const at::Tensor qp = q_pids.contiguous(), gp = g_pids.contiguous();
  const at::Tensor off = pos_offsets.contiguous(), pdist = pos_dist.contiguous(),
                   pg = pos_gidx.contiguous();
  const int64_t total = pdist.size(0);
  check_rank_offsets("_rank_count_preceding", off, total);
  const int64_t* o = off.const_data_ptr<int64_t>();
  at::Tensor counts = at::zeros({total}, pg.options());
  if (total == 0 || d.size(0) == 0) return counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(),
                                  "rank_count_preceding_cpu", [&] {
    count_rows<scalar_t>(d, qp.const_data_ptr<int64_t>(), gp.const_data_ptr<int64_t>(), o,
                         pdist.const_data_ptr<scalar_t>(), pg.const_data_ptr<int64_t>(), g_offset,
                         counts.mutable_data_ptr<int64_t>());
  });
  return counts;
}

std::tuple<at::Tensor, at::Tensor> rank_sort_positives_cpu(const at::Tensor& pos_offsets,
                                                           const at::Tensor& pos_dist,
                                                           const at::Tensor& pos_gidx) {
  check_rank_sort_inputs(pos_offsets, pos_dist, pos_gidx);
  const at::Tensor off = pos_offsets.contiguous();
  const at::Tensor d_in = pos_dist.contiguous(), g_in = pos_gidx.contiguous();
  at::Tensor d = at::empty_like(d_in), g = at::empty_like(g_in);
  const int64_t Q = off.size(0) - 1, total = d.numel();
  check_rank_offsets("_rank_sort_positives", off, total);
  const int64_t* o = off.const_data_ptr<int64_t>();
  if (total == 0) return {d, g};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(),
                                  "rank_sort_positives_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* dp = d.mutable_data_ptr<scalar_t>();
    int64_t* gp = g.mutable_data_ptr<int64_t>();
    // Plain copies (a parallel copy would wake the thread pool for a few hundred KB).
    std::copy(d_in.const_data_ptr<scalar_t>(), d_in.const_data_ptr<scalar_t>() + total, dp);
    std::copy(g_in.const_data_ptr<int64_t>(), g_in.const_data_ptr<int64_t>() + total, gp);
    // Serial below ~1M positives: sorting a few per query is cheaper than waking threads.
    const int64_t grain = std::max<int64_t>(1, Q * ((int64_t(1) << 20) / std::max<int64_t>(d.numel(), 1)));
    at::parallel_for(0, Q, grain, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        sort_positives<scalar_t, acc_t>(dp + o[q], gp + o[q], o[q + 1] - o[q]);
      }
    });
  });
  return {d, g};
}

at::Tensor distance_gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_distance_gemm_inputs(a, b);
  return full_fp32_mm_nt(a, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CPU, m) {
  m.impl("_distance_gemm", &distance_gemm_cpu);
  m.impl("_rank_sort_positives", &rank_sort_positives_cpu);
  m.impl("_rank_count_preceding", &rank_count_preceding_cpu);
}

}  // namespace edaan_fast
