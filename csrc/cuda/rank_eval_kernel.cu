// CUDA kernels of _rank_sort_positives / _rank_count_preceding (math: csrc/ops/rank_eval.h).
//
// Counting: one block per query (grid-stride over queries). The block loads the query's sorted
// positives into shared memory, its threads walk the dist row with coalesced loads, test each
// item against the farthest positive, and bump shared-memory bins (atomics) for the rare
// items that may precede a positive; thread 0 turns the bins into counts with a prefix sum. A
// query with more than kSharedPositives positives reads them from global memory and bins
// straight into its (zeroed) counts with global atomics. Sorting: one thread per query.
// pos_offsets is checked on the host before either kernel reads it.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../ops/rank_eval.h"

namespace edaan_fast {
namespace {

using namespace rank_math;

constexpr int kThreads = 256;
constexpr int kSharedPositives = 512;

template <typename scalar_t>
__global__ void count_preceding_kernel(const scalar_t* __restrict__ dist, int64_t row_stride,
                                       int64_t Q, int64_t G, const int64_t* __restrict__ q_pids,
                                       const int64_t* __restrict__ g_pids,
                                       const int64_t* __restrict__ offsets,
                                       const scalar_t* __restrict__ pos_dist,
                                       const int64_t* __restrict__ pos_gidx, int64_t g_offset,
                                       int64_t* __restrict__ counts) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s_d[kSharedPositives];
  __shared__ int64_t s_g[kSharedPositives];
  __shared__ unsigned int s_bins[kSharedPositives + 1];
  __shared__ int s_nan;
  for (int64_t q = blockIdx.x; q < Q; q += gridDim.x) {
    const int64_t off = offsets[q], P = offsets[q + 1] - off;
    if (P == 0) continue;  // uniform over the block
    const bool in_shared = P <= kSharedPositives;
    if (threadIdx.x == 0) s_nan = 0;
    // a NaN among any of the positives flags the query, as on the CPU (not only the last one)
    bool nan = false;
    for (int64_t k = threadIdx.x; k < P; k += blockDim.x) {
      const acc_t d = static_cast<acc_t>(pos_dist[off + k]);
      nan |= d != d;
      if (in_shared) {
        s_d[k] = d;
        s_g[k] = pos_gidx[off + k];
      }
    }
    if (in_shared) {
      for (int64_t k = threadIdx.x; k <= P; k += blockDim.x) s_bins[k] = 0;
    }
    __syncthreads();
    const acc_t dmax = static_cast<acc_t>(pos_dist[off + P - 1]);
    const int64_t qp = q_pids[q];
    const scalar_t* row = dist + q * row_stride;
    for (int64_t j = threadIdx.x; j < G; j += blockDim.x) {
      const acc_t d = static_cast<acc_t>(row[j]);
      if (d > dmax) continue;
      const int64_t b =
          in_shared ? item_bin<acc_t, acc_t>(s_d, s_g, P, d, g_offset + j, g_pids[j], qp)
                    : item_bin<acc_t, scalar_t>(pos_dist + off, pos_gidx + off, P, d,
                                                g_offset + j, g_pids[j], qp);
      if (b < 0) {
        nan = true;
      } else if (b < P) {
        if (in_shared) {
          atomicAdd(&s_bins[b], 1u);
        } else {
          atomicAdd(reinterpret_cast<unsigned long long*>(counts + off + b), 1ull);
        }
      }
    }
    if (nan) s_nan = 1;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t run = 0;
      for (int64_t k = 0; k < P; ++k) {
        run += in_shared ? static_cast<int64_t>(s_bins[k]) : counts[off + k];
        counts[off + k] = s_nan ? kRankNanFlag : run;
      }
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void sort_positives_kernel(const int64_t* __restrict__ offsets, int64_t Q,
                                      scalar_t* __restrict__ pos_dist,
                                      int64_t* __restrict__ pos_gidx) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < Q;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t off = offsets[q];
    sort_positives<scalar_t, acc_t>(pos_dist + off, pos_gidx + off, offsets[q + 1] - off);
  }
}

int64_t max_blocks() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
}

at::Tensor rank_count_preceding_cuda(const at::Tensor& dist, const at::Tensor& q_pids,
                                     const at::Tensor& g_pids, const at::Tensor& pos_offsets,
                                     const at::Tensor& pos_dist, const at::Tensor& pos_gidx,
                                     int64_t g_offset) {
  check_rank_count_inputs(dist, q_pids, g_pids, pos_offsets, pos_dist, pos_gidx, g_offset);
  const c10::cuda::CUDAGuard guard(dist.device());
  check_rank_offsets("_rank_count_preceding", pos_offsets, pos_dist.size(0));
  const at::Tensor d = dist.stride(1) == 1 || dist.size(1) <= 1 ? dist : dist.contiguous();
  const at::Tensor qp = q_pids.contiguous(), gp = g_pids.contiguous();
  const at::Tensor off = pos_offsets.contiguous(), pdist = pos_dist.contiguous(),
                   pg = pos_gidx.contiguous();
  const int64_t Q = d.size(0), G = d.size(1);
  at::Tensor counts = at::zeros({pdist.size(0)}, pg.options());
  if (counts.numel() == 0 || Q == 0) return counts;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(Q, max_blocks()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(),
                                  "rank_count_preceding_cuda", [&] {
    count_preceding_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        d.const_data_ptr<scalar_t>(), d.stride(0), Q, G, qp.const_data_ptr<int64_t>(),
        gp.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>(),
        pdist.const_data_ptr<scalar_t>(), pg.const_data_ptr<int64_t>(), g_offset,
        counts.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

std::tuple<at::Tensor, at::Tensor> rank_sort_positives_cuda(const at::Tensor& pos_offsets,
                                                            const at::Tensor& pos_dist,
                                                            const at::Tensor& pos_gidx) {
  check_rank_sort_inputs(pos_offsets, pos_dist, pos_gidx);
  const c10::cuda::CUDAGuard guard(pos_dist.device());
  check_rank_offsets("_rank_sort_positives", pos_offsets, pos_dist.size(0));
  const at::Tensor off = pos_offsets.contiguous();
  at::Tensor d = pos_dist.clone(at::MemoryFormat::Contiguous);
  at::Tensor g = pos_gidx.clone(at::MemoryFormat::Contiguous);
  const int64_t Q = off.size(0) - 1;
  if (d.numel() == 0 || Q == 0) return {d, g};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((Q + kThreads - 1) / kThreads,
                                                                max_blocks()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(),
                                  "rank_sort_positives_cuda", [&] {
    sort_positives_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        off.const_data_ptr<int64_t>(), Q, d.mutable_data_ptr<scalar_t>(),
        g.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d, g};
}

at::Tensor distance_gemm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_distance_gemm_inputs(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  return full_fp32_mm_nt(a, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CUDA, m) {
  m.impl("_distance_gemm", &distance_gemm_cuda);
  m.impl("_rank_sort_positives", &rank_sort_positives_cuda);
  m.impl("_rank_count_preceding", &rank_count_preceding_cuda);
}

}  // namespace edaan_fast
