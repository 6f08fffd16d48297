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
#include <vector>

#include "../ops/rank_eval.h"

namespace edaan_fast {
namespace {

using namespace rank_math;

constexpr int64_t kBlock = 16;

template <typename scalar_t>
void count_rows(const at::Tensor& dist, const int64_t* q_pids, const int64_t* g_pids,
                const int64_t* offsets, const scalar_t* pos_dist, const int64_t* pos_gidx,
                int64_t g_offset, int64_t* counts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = dist.size(0), G = dist.size(1), row_stride = dist.stride(0);
  const scalar_t* base = dist.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(G, 1));
  at::parallel_for(0, Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pd;
    std::vector<int64_t> bins;
    for (int64_t q = begin; q < end; ++q) {
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
        bool any = false;
        for (int64_t j = 0; j < kBlock; ++j) any |= !(static_cast<acc_t>(row[j0 + j]) > dmax);
        if (!any) continue;
        for (int64_t j = j0; j < j0 + kBlock; ++j) {
          const acc_t d = static_cast<acc_t>(row[j]);
          if (d > dmax) continue;
          const int64_t b = item_bin<acc_t>(pd.data(), pg, P, d, g_offset + j, g_pids[j], qp);
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
        const int64_t b = item_bin<acc_t>(pd.data(), pg, P, d, g_offset + j, g_pids[j], qp);
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
  const int64_t Q = d.size(0), total = pdist.size(0);
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[Q] == total, "_rank_count_preceding: pos_offsets must run from 0 to ",
              total, " (the number of positives), got ", o[0], " .. ", o[Q]);
  for (int64_t q = 0; q < Q; ++q) {
    TORCH_CHECK(o[q + 1] >= o[q], "_rank_count_preceding: pos_offsets must be non-decreasing, got ",
                o[q], " then ", o[q + 1], " at query ", q);
  }
  at::Tensor counts = at::zeros({total}, pg.options());
  if (total == 0 || Q == 0) return counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(),
                                  "rank_count_preceding_cpu", [&] {
    count_rows<scalar_t>(d, qp.const_data_ptr<int64_t>(), gp.const_data_ptr<int64_t>(), o,
                         pdist.const_data_ptr<scalar_t>(), pg.const_data_ptr<int64_t>(), g_offset,
                         counts.mutable_data_ptr<int64_t>());
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CPU, m) {
  m.impl("_rank_count_preceding", &rank_count_preceding_cpu);
}

}  // namespace edaan_fast
