// CUDA kernels of the k-reciprocal re-ranking steps (math: csrc/ops/reranking.h).
//
//   knn_lists         one block of several warps per row (knn_row_warps(N): up to 8), as many
//                     blocks as the device keeps resident: a block-wide NaN-aware max of the
//                     squared distances (recomputed from the scores, never stored), then each
//                     thread keeps the k best of its column slice (slice_topk: the CPU's bound
//                     test and insertion), each warp merges its 32 lists by k rounds of a
//                     shuffle argmin on (value, index), and one thread merges the warps' lists
//                     (merge_topk). Selection and merges: csrc/ops/reranking.h.
//   k_reciprocal_sets one thread per row into a padded scratch row, a device prefix sum of the
//                     sizes, then one thread per row packs its set as CSR.
//   query_expansion   one thread per row: a counting pass, a device prefix sum, a filling pass.
//   jaccard_rerank_   the inverted index by a stable device sort of the gallery entries by
//                     column; then one block per query: the block's threads share the work of
//                     one query entry (its column's gallery entries: distinct gallery rows, so no
//                     two threads touch one accumulator), with a barrier between entries, so
//                     every accumulator adds in the CPU's order: deterministic, equal to the CPU.
//                     The accumulator row lives in a [blocks, G] scratch of acc_t.
//   Inputs are validated on the device before use (csr_fault_kernel, table_fault_kernel).
//   Built with --fmad=false (setup.py, CMakeLists.txt): the header math rounds as on the CPU,
//   which compiles it without contraction (-ffp-contract=off), so equal operations in equal
//   order give equal bits. (knn_lists reads scores that cuBLAS computed: those equal the CPU's
//   only to rounding.)
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../ops/reranking.h"

namespace edaan_fast {
namespace {

using namespace rerank_math;

constexpr int kThreads = 256;
constexpr int kWarp = 32;

int64_t max_blocks() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
}

int64_t blocks_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, max_blocks()));
}

// --- device-side validation: one cheap kernel and one flag read per input ------------------
// The CPU checks a CSR's and a neighbour table's contents on the host; here the same per-row
// test (csr_row_fault, table_entry_ok in csrc/ops/reranking.h) runs on the device, and only a
// fault copies the tensors to the host, where the CPU's check raises with the same message.
// So a malformed input is a RuntimeError, never an illegal address.

__global__ void csr_fault_kernel(const int64_t* __restrict__ ptr, int64_t rows,
                                 const int64_t* __restrict__ idx, int64_t nnz, int64_t bound,
                                 int* __restrict__ flag) {
  const int64_t work = rows > 0 ? rows : 1;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < work;
       r += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (csr_row_fault(ptr, rows, r, idx, nnz, bound) != kCsrOk) *flag = 1;  // all write 1
  }
}

__global__ void table_fault_kernel(const int64_t* __restrict__ t, int64_t total, int64_t n,
                                   int* __restrict__ flag) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (!table_entry_ok(t[e], n)) *flag = 1;
  }
}

// ptr/idx contiguous int64 on the current device (rows = ptr.size(0) - 1).
void check_csr_on_device(const char* op, const char* name, const at::Tensor& ptr,
                         const at::Tensor& idx, int64_t bound) {
  const int64_t rows = ptr.size(0) - 1, nnz = idx.size(0);
  at::Tensor flag = at::zeros({1}, ptr.options().dtype(at::kInt));
  csr_fault_kernel<<<blocks_for(std::max<int64_t>(rows, 1), kThreads), kThreads, 0,
                     at::cuda::getCurrentCUDAStream()>>>(ptr.const_data_ptr<int64_t>(), rows,
                                                         idx.const_data_ptr<int64_t>(), nnz,
                                                         bound, flag.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (flag.item<int>() == 0) return;
  const at::Tensor hp = ptr.cpu(), hi = idx.cpu();
  check_csr_contents(op, name, hp.const_data_ptr<int64_t>(), rows, hi.const_data_ptr<int64_t>(),
                     nnz, bound);
  TORCH_CHECK(false, op, ": ", name, " is not a well-formed CSR matrix");  // not reached
}

// nn contiguous int64 [N, ld] on the current device.
void check_table_on_device(const char* op, const at::Tensor& nn) {
  if (nn.numel() == 0) return;
  at::Tensor flag = at::zeros({1}, nn.options().dtype(at::kInt));
  table_fault_kernel<<<blocks_for(nn.numel(), kThreads), kThreads, 0,
                       at::cuda::getCurrentCUDAStream()>>>(nn.const_data_ptr<int64_t>(),
                                                           nn.numel(), nn.size(0),
                                                           flag.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (flag.item<int>() == 0) return;
  const at::Tensor h = nn.cpu();
  check_table_contents(op, h.const_data_ptr<int64_t>(), h.size(0), h.size(1));
  TORCH_CHECK(false, op, ": nn is not a valid neighbour table");  // not reached
}

// One block per row (a grid-stride loop over the tile's rows), knn_row_warps(N) warps per block:
// the block's NaN-aware row maximum (warp shuffles, then one value per warp in shared memory),
// the kept columns, then every thread's k best of its column slice (slice_topk; its list in a
// per-block scratch row), each warp's merge of its 32 lists (k rounds of a shuffle argmin on
// (value, index) over the lanes' heads, list_head's sentinel for a spent list), and thread 0's
// merge of the warps' lists (merge_topk). Lists and merges are the header's, as the CPU op
// _knn_lists_sliced runs them.
template <typename scalar_t>
__global__ void knn_block_kernel(const scalar_t* __restrict__ scores, int64_t ld, int64_t B,
                                 int64_t N, const scalar_t* __restrict__ row_sq,
                                 const scalar_t* __restrict__ col_sq, int64_t k, int64_t kind,
                                 int64_t keep_from,
                                 at::opmath_type<scalar_t>* __restrict__ lane_vals,
                                 int64_t* __restrict__ lane_idx,
                                 at::opmath_type<scalar_t>* __restrict__ warp_vals,
                                 int64_t* __restrict__ warp_idx, int64_t* __restrict__ warp_count,
                                 int64_t* __restrict__ nn, scalar_t* __restrict__ nn_dist,
                                 scalar_t* __restrict__ scale, scalar_t* __restrict__ kept,
                                 int64_t kept_ld) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t reduce[kKnnMaxRowWarps + 1];  // one maximum per warp, then the row scale
  const int64_t threads = blockDim.x, tid = threadIdx.x;
  const int64_t warps = threads / kWarp, warp = tid / kWarp;
  const int lane = static_cast<int>(tid % kWarp);
  acc_t* lv = lane_vals + (blockIdx.x * threads + tid) * k;
  int64_t* li = lane_idx + (blockIdx.x * threads + tid) * k;
  acc_t* bv = warp_vals + blockIdx.x * warps * k;
  int64_t* bi = warp_idx + blockIdx.x * warps * k;
  int64_t* bc = warp_count + blockIdx.x * warps;
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    const RawRow<scalar_t, acc_t> m_of{scores + r * ld, col_sq,
                                       kind == 1 ? static_cast<acc_t>(row_sq[r]) : acc_t(0), kind};
    acc_t mx = acc_t(0);
    for (int64_t j = tid; j < N; j += threads) mx = nan_max<acc_t>(mx, m_of(j));
    for (int off = kWarp / 2; off > 0; off /= 2) {
      mx = nan_max<acc_t>(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    }
    if (lane == 0) reduce[warp] = mx;
    __syncthreads();
    if (tid == 0) {
      acc_t m = reduce[0];
      for (int64_t w = 1; w < warps; ++w) m = nan_max<acc_t>(m, reduce[w]);
      const acc_t c = row_scale<acc_t>(m);
      reduce[kKnnMaxRowWarps] = c;
      scale[r] = static_cast<scalar_t>(c);
    }
    __syncthreads();
    const acc_t c = reduce[kKnnMaxRowWarps];
    if (!isfinite(c)) {  // reported by the caller; the lists are placeholders
      for (int64_t t = tid; t < k; t += threads) {
        nn[r * k + t] = t;
        nn_dist[r * k + t] = static_cast<scalar_t>(NAN);
      }
      __syncthreads();  // every thread has read the scale before the next row writes it
      continue;
    }
    for (int64_t j = keep_from + tid; j < N; j += threads) {
      kept[r * kept_ld + j - keep_from] = static_cast<scalar_t>(m_of(j) / c);
    }
    const int64_t count = slice_topk<acc_t>(m_of, tid, N, threads, c, k, lv, li);
    // this warp's 32 lists -> one list of up to k in the block's scratch
    int64_t head = 0, got = 0;
    for (int64_t t = 0; t < k; ++t) {
      acc_t v;
      int64_t i;
      list_head<acc_t>(lv, li, count, head, v, i);
      int who = lane;
      for (int off = kWarp / 2; off > 0; off /= 2) {
        const acc_t ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, i, off);
        const int ow = __shfl_xor_sync(0xffffffffu, who, off);
        if (key_less<acc_t>(ov, oi, v, i)) {
          v = ov;
          i = oi;
          who = ow;
        }
      }
      if (i == INT64_MAX) break;  // the same on every lane: the warp's lists are spent
      if (lane == who) ++head;
      if (lane == 0) {
        bv[warp * k + t] = v;
        bi[warp * k + t] = i;
      }
      got = t + 1;
    }
    if (lane == 0) bc[warp] = got;
    __syncthreads();
    if (tid == 0) {
      int64_t heads[kKnnMaxRowWarps];
      merge_topk<acc_t, scalar_t>(bv, bi, bc, warps, k, k, heads, nn_dist + r * k, nn + r * k);
    }
    __syncthreads();  // the warps' lists are read before the next row overwrites them
  }
}

// Scratch of the per-thread and per-warp lists is kept under this size by shrinking the grid
// (only a very large k needs that: 21 neighbours at 1,056 blocks of 256 threads take 68 MB).
constexpr int64_t kKnnScratchBytes = int64_t(1) << 28;

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_lists_cuda(
    const at::Tensor& scores, const at::Tensor& row_sq, const at::Tensor& col_sq, int64_t k,
    c10::string_view metric, const at::Tensor& kept) {
  const int64_t kind = rerank_scores_kind(metric);
  check_knn_lists_inputs(scores, row_sq, col_sq, k, kind, kept);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.stride(1) == 1 ? scores : scores.contiguous();
  const int64_t B = s.size(0), N = s.size(1);
  at::Tensor nn = at::empty({B, k}, s.options().dtype(at::kLong));
  at::Tensor nn_dist = at::empty({B, k}, s.options());
  at::Tensor scale = at::empty({B}, s.options());
  const int64_t keep_from = N - kept.size(1);
  if (B == 0) return {nn, nn_dist, scale};
  const at::Tensor rsq = kind == 1 ? row_sq.contiguous() : row_sq;
  const at::Tensor csq = kind == 1 ? col_sq.contiguous() : col_sq;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // the grid: as many blocks as the device keeps resident, not more than there are rows
  const int64_t warps = knn_row_warps(N), threads = warps * kWarp;
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t per_sm = std::max<int64_t>(
      1, std::min<int64_t>(props->maxThreadsPerMultiProcessor / threads,
                           props->maxBlocksPerMultiProcessor));
  int64_t grid = std::min<int64_t>(B, props->multiProcessorCount * per_sm);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "knn_lists_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_block = (threads + warps) * k * static_cast<int64_t>(sizeof(acc_t) + sizeof(int64_t));
    grid = std::max<int64_t>(1, std::min<int64_t>(grid, kKnnScratchBytes / per_block));
    const auto acc_opts = s.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor lane_vals = at::empty({grid, threads, k}, acc_opts);
    at::Tensor lane_idx = at::empty({grid, threads, k}, nn.options());
    at::Tensor warp_vals = at::empty({grid, warps, k}, acc_opts);
    at::Tensor warp_idx = at::empty({grid, warps, k}, nn.options());
    at::Tensor warp_count = at::empty({grid, warps}, nn.options());
    knn_block_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), s.stride(0), B, N,
        kind == 1 ? rsq.const_data_ptr<scalar_t>() : nullptr,
        kind == 1 ? csq.const_data_ptr<scalar_t>() : nullptr, k, kind, keep_from,
        lane_vals.mutable_data_ptr<acc_t>(), lane_idx.mutable_data_ptr<int64_t>(),
        warp_vals.mutable_data_ptr<acc_t>(), warp_idx.mutable_data_ptr<int64_t>(),
        warp_count.mutable_data_ptr<int64_t>(), nn.mutable_data_ptr<int64_t>(),
        nn_dist.mutable_data_ptr<scalar_t>(), scale.mutable_data_ptr<scalar_t>(),
        kept.mutable_data_ptr<scalar_t>(), kept.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {nn, nn_dist, scale};
}

__global__ void k_reciprocal_kernel(const int64_t* __restrict__ nn, int64_t ld, int64_t row_start,
                                    int64_t B, int64_t ka, int64_t kh, int64_t* __restrict__ half,
                                    int64_t* __restrict__ sets, int64_t* __restrict__ sizes) {
  const int64_t width = expansion_width(ka, kh);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    sizes[b] = k_reciprocal_expansion(nn, ld, row_start + b, ka, kh, sets + b * width, half + b * kh);
  }
}

template <typename scalar_t>
__global__ void pack_sets_kernel(const int64_t* __restrict__ nn,
                                 const scalar_t* __restrict__ nn_dist, int64_t ld,
                                 int64_t row_start, int64_t B, int64_t width,
                                 const int64_t* __restrict__ sets, const int64_t* __restrict__ ptr,
                                 int64_t* __restrict__ col, scalar_t* __restrict__ dist) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = row_start + b;
    for (int64_t e = ptr[b]; e < ptr[b + 1]; ++e) {
      const int64_t j = sets[b * width + e - ptr[b]];
      col[e] = j;
      dist[e] = known_distance<scalar_t>(nn + i * ld, nn_dist + i * ld, ld, j);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> k_reciprocal_sets_cuda(
    const at::Tensor& nn_in, const at::Tensor& nn_dist_in, int64_t k1, int64_t row_start,
    int64_t row_end) {
  check_k_reciprocal_inputs(nn_in, nn_dist_in, k1, row_start, row_end);
  const c10::cuda::CUDAGuard guard(nn_in.device());
  const at::Tensor nn = nn_in.contiguous(), nn_dist = nn_dist_in.contiguous();
  check_table_on_device("k_reciprocal_sets", nn);
  const int64_t N = nn.size(0), B = row_end - row_start;
  const int64_t ka = std::min<int64_t>(k1 + 1, N), kh = std::min<int64_t>(half_size(k1), N);
  const int64_t width = expansion_width(ka, kh);
  at::Tensor ptr = at::zeros({B + 1}, nn.options());
  if (B == 0) return {ptr, at::empty({0}, nn.options()), at::empty({0}, nn_dist.options())};
  at::Tensor half = at::empty({B, kh}, nn.options());
  at::Tensor sets = at::empty({B, width}, nn.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(B, kThreads);
  k_reciprocal_kernel<<<blocks, kThreads, 0, stream>>>(
      nn.const_data_ptr<int64_t>(), nn.size(1), row_start, B, ka, kh,
      half.mutable_data_ptr<int64_t>(), sets.mutable_data_ptr<int64_t>(),
      ptr.mutable_data_ptr<int64_t>() + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::cumsum_out(ptr, ptr, 0);
  const int64_t nnz = ptr[B].item<int64_t>();
  at::Tensor col = at::empty({nnz}, nn.options());
  at::Tensor dist = at::empty({nnz}, nn_dist.options());
  AT_DISPATCH_FLOATING_TYPES(nn_dist.scalar_type(), "k_reciprocal_sets_cuda", [&] {
    pack_sets_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        nn.const_data_ptr<int64_t>(), nn_dist.const_data_ptr<scalar_t>(), nn.size(1), row_start, B,
        width, sets.const_data_ptr<int64_t>(), ptr.const_data_ptr<int64_t>(),
        col.mutable_data_ptr<int64_t>(), dist.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ptr, col, dist};
}

template <typename scalar_t>
__global__ void query_expansion_kernel(const int64_t* __restrict__ ptr,
                                       const int64_t* __restrict__ col,
                                       const scalar_t* __restrict__ val,
                                       const int64_t* __restrict__ nn, int64_t ld,
                                       int64_t row_start, int64_t B, int64_t k2,
                                       int64_t* __restrict__ cursor, int64_t* __restrict__ counts,
                                       const int64_t* __restrict__ out_ptr,
                                       int64_t* __restrict__ out_col, scalar_t* __restrict__ out_val) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t* nb = nn + (row_start + b) * ld;
    if (out_ptr == nullptr) {
      counts[b] = mean_of_rows<scalar_t, acc_t>(ptr, col, val, nb, k2, cursor + b * k2, nullptr,
                                                nullptr);
    } else {
      mean_of_rows<scalar_t, acc_t>(ptr, col, val, nb, k2, cursor + b * k2, out_col + out_ptr[b],
                                    out_val + out_ptr[b]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> query_expansion_cuda(
    const at::Tensor& ptr_in, const at::Tensor& col_in, const at::Tensor& val_in,
    const at::Tensor& nn_in, int64_t k2, int64_t row_start, int64_t row_end) {
  check_query_expansion_inputs(ptr_in, col_in, val_in, nn_in, k2, row_start, row_end);
  const c10::cuda::CUDAGuard guard(val_in.device());
  const at::Tensor ptr = ptr_in.contiguous(), col = col_in.contiguous(), val = val_in.contiguous();
  const at::Tensor nn = nn_in.contiguous();
  check_csr_on_device("query_expansion", "v", ptr, col, nn.size(0));
  check_table_on_device("query_expansion", nn);
  const int64_t B = row_end - row_start;
  at::Tensor out_ptr = at::zeros({B + 1}, ptr.options());
  if (B == 0) return {out_ptr, at::empty({0}, col.options()), at::empty({0}, val.options())};
  at::Tensor cursor = at::empty({B, k2}, ptr.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(B, kThreads);
  at::Tensor out_col, out_val;
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "query_expansion_cuda", [&] {
    query_expansion_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        ptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
        val.const_data_ptr<scalar_t>(), nn.const_data_ptr<int64_t>(), nn.size(1), row_start, B, k2,
        cursor.mutable_data_ptr<int64_t>(), out_ptr.mutable_data_ptr<int64_t>() + 1, nullptr,
        nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::cumsum_out(out_ptr, out_ptr, 0);
    const int64_t nnz = out_ptr[B].item<int64_t>();
    out_col = at::empty({nnz}, col.options());
    out_val = at::empty({nnz}, val.options());
    query_expansion_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        ptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
        val.const_data_ptr<scalar_t>(), nn.const_data_ptr<int64_t>(), nn.size(1), row_start, B, k2,
        cursor.mutable_data_ptr<int64_t>(), nullptr, out_ptr.const_data_ptr<int64_t>(),
        out_col.mutable_data_ptr<int64_t>(), out_val.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_ptr, out_col, out_val};
}

template <typename scalar_t>
__global__ void jaccard_kernel(const int64_t* __restrict__ q_ptr, const int64_t* __restrict__ q_col,
                               const scalar_t* __restrict__ q_val,
                               const int64_t* __restrict__ col_ptr,
                               const int64_t* __restrict__ inv_row,
                               const scalar_t* __restrict__ inv_val, int64_t B, int64_t G,
                               at::opmath_type<scalar_t> lambda,
                               at::opmath_type<scalar_t>* __restrict__ acc,
                               scalar_t* __restrict__ dist) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t q = blockIdx.x; q < B; q += gridDim.x) {
    acc_t* row = acc + blockIdx.x * G;
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) row[g] = acc_t(0);
    __syncthreads();
    for (int64_t e = q_ptr[q]; e < q_ptr[q + 1]; ++e) {
      const acc_t v = static_cast<acc_t>(q_val[e]);
      const int64_t c = q_col[e];
      for (int64_t f = col_ptr[c] + threadIdx.x; f < col_ptr[c + 1]; f += blockDim.x) {
        const acc_t w = static_cast<acc_t>(inv_val[f]);
        row[inv_row[f]] += v < w ? v : w;
      }
      __syncthreads();
    }
    scalar_t* out = dist + q * G;
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
      out[g] = static_cast<scalar_t>(
          reranked_distance<acc_t>(row[g], static_cast<acc_t>(out[g]), lambda));
    }
    __syncthreads();
  }
}

void jaccard_rerank_cuda(const at::Tensor& dist, const at::Tensor& q_ptr_in,
                         const at::Tensor& q_col_in, const at::Tensor& q_val_in,
                         const at::Tensor& g_ptr_in, const at::Tensor& g_col_in,
                         const at::Tensor& g_val_in, int64_t num_columns, double lambda) {
  check_jaccard_inputs(dist, q_ptr_in, q_col_in, q_val_in, g_ptr_in, g_col_in, g_val_in,
                       num_columns, lambda);
  const c10::cuda::CUDAGuard guard(dist.device());
  const at::Tensor q_ptr = q_ptr_in.contiguous(), q_col = q_col_in.contiguous(),
                   q_val = q_val_in.contiguous();
  const at::Tensor g_ptr = g_ptr_in.contiguous(), g_col = g_col_in.contiguous(),
                   g_val = g_val_in.contiguous();
  const int64_t B = dist.size(0), G = dist.size(1);
  check_csr_on_device("jaccard_rerank_", "q", q_ptr, q_col, num_columns);
  check_csr_on_device("jaccard_rerank_", "g", g_ptr, g_col, num_columns);
  if (B == 0 || G == 0) return;
  // the inverted index: gallery entries sorted by column (stable: rows ascending in a column)
  const at::Tensor g_rows =
      at::repeat_interleave(at::arange(G, g_ptr.options()), g_ptr.diff(), c10::nullopt);
  const auto sorted = at::sort(g_col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted);
  const at::Tensor inv_row = g_rows.index_select(0, order);
  const at::Tensor inv_val = g_val.index_select(0, order);
  at::Tensor col_ptr = at::zeros({num_columns + 1}, g_ptr.options());
  col_ptr.slice(0, 1).copy_(at::bincount(g_col, {}, num_columns).cumsum(0));
  at::Tensor d = dist.is_contiguous() ? dist : dist.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for(B, 1);
  AT_DISPATCH_FLOATING_TYPES(q_val.scalar_type(), "jaccard_rerank_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::empty({blocks, G}, d.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    jaccard_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        q_ptr.const_data_ptr<int64_t>(), q_col.const_data_ptr<int64_t>(),
        q_val.const_data_ptr<scalar_t>(), col_ptr.const_data_ptr<int64_t>(),
        inv_row.const_data_ptr<int64_t>(), inv_val.const_data_ptr<scalar_t>(), B, G,
        static_cast<acc_t>(lambda), acc.mutable_data_ptr<acc_t>(), d.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!d.is_same(dist)) dist.copy_(d);
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CUDA, m) {
  m.impl("knn_lists", &knn_lists_cuda);
  m.impl("k_reciprocal_sets", &k_reciprocal_sets_cuda);
  m.impl("query_expansion", &query_expansion_cuda);
  m.impl("jaccard_rerank_", &jaccard_rerank_cuda);
}

}  // namespace edaan_fast
