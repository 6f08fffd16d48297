// CUDA kernels of batch_hard_mining / triplet_loss / quartet_loss
// (math: csrc/ops/metric_losses.h).
//
// Forward: the Gram matrix G = x x^T with cuBLAS (at::mm, float or double), then one warp per
// anchor: the lanes scan the anchor's Gram row (strided by 32, coalesced), turning Gram values
// into distances on the fly, and a shuffle reduction with the header's tie rules picks p and n;
// the same warp then scans the row of n for the second negative m. Lane 0 writes the anchor's
// term. The mean is taken with two small reductions on the stream (no host synchronisation).
// The Gram matrix is taken in full float32 even where TF32 is allowed (at::NoTF32Guard).
// Backward, deterministic (no atomics): one thread per pair contribution writes it out, a
// stable sort groups them by the row they land on (keeping their order, as the CPU's counting
// sort does), and one block per output row walks its contributions in that fixed order with
// the threads over D: O(B log B + B * D), bit-identical from run to run.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../ops/metric_losses.h"

namespace edaan_fast {
namespace {

using namespace metric_loss_math;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kPairThreads = 256;

template <typename acc_t, bool kMax>
__device__ inline Pick<acc_t> warp_pick(Pick<acc_t> p) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const acc_t v = __shfl_xor_sync(0xffffffffu, p.v, off);
    const long long j = __shfl_xor_sync(0xffffffffu, static_cast<long long>(p.j), off);
    if (kMax ? beats_max<acc_t>(v, j, p) : beats_min<acc_t>(v, j, p)) {
      p.v = v;
      p.j = j;
    }
  }
  return p;
}

// The whole warp mines anchor i; every lane ends with the same picks.
template <typename acc_t, typename Row>
__device__ inline void mine_anchor_warp(const Row& row, const int64_t* labels, int64_t B,
                                        int64_t i, bool want_m, int lane, Pick<acc_t>& pos,
                                        Pick<acc_t>& neg, Pick<acc_t>& sec) {
  pos = no_pick<acc_t>();
  neg = no_pick<acc_t>();
  sec = no_pick<acc_t>();
  scan_pos_neg<acc_t>(row, labels, B, i, lane, kWarp, pos, neg);
  pos = warp_pick<acc_t, true>(pos);
  neg = warp_pick<acc_t, false>(neg);
  if (want_m && neg.j >= 0) {
    scan_second_neg<acc_t>(row, labels, B, neg.j, labels[i], lane, kWarp, sec);
    sec = warp_pick<acc_t, false>(sec);
  }
}

template <typename scalar_t>
__global__ void batch_hard_mining_kernel(const scalar_t* __restrict__ dist,
                                         const int64_t* __restrict__ labels, int64_t B,
                                         scalar_t* d_ap, scalar_t* d_an, scalar_t* d_mn,
                                         int64_t* p, int64_t* n, int64_t* m, int8_t* valid) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (i >= B) return;  // whole warps leave together
  const MatrixRow<scalar_t, acc_t> row{dist, B};
  Pick<acc_t> pos, neg, sec;
  mine_anchor_warp<acc_t>(row, labels, B, i, true, lane, pos, neg, sec);
  if (lane == 0) write_mining<scalar_t, acc_t>(dist, B, i, pos, neg, sec, d_ap, d_an, d_mn, p, n, m, valid);
}

template <typename acc_t, Metric kMetric>
__global__ void loss_forward_kernel(const acc_t* __restrict__ gram, const acc_t* __restrict__ diag,
                                    const int64_t* __restrict__ labels, int64_t B, LossKind kind,
                                    acc_t margin, LossOutputs<acc_t> out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (i >= B) return;
  const GramRow<acc_t, kMetric> row{gram, diag, B};
  Pick<acc_t> pos, neg, sec;
  mine_anchor_warp<acc_t>(row, labels, B, i, kind == LossKind::kQuartet, lane, pos, neg, sec);
  if (lane == 0) write_anchor<acc_t, kMetric>(row, kind, margin, i, pos, neg, sec, out);
}

// diag: G_ii -> 1 / max(sqrt(G_ii), eps), for the cosine metric.
template <typename acc_t>
__global__ void inv_norm_kernel(acc_t* diag, int64_t B) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < B) diag[i] = inv_norm_from_sq(diag[i]);
}

// One thread per contribution e (metric_losses.h): target (B for an unused pair, so that they
// sort last), other row, alpha and beta.
template <typename acc_t>
__global__ void contributions_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ sq,
                                     const int64_t* __restrict__ idx,
                                     const acc_t* __restrict__ pair_dist,
                                     const acc_t* __restrict__ coef, Metric metric, int64_t B,
                                     int64_t* __restrict__ target, int64_t* __restrict__ other,
                                     acc_t* __restrict__ alpha, acc_t* __restrict__ beta) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= 6 * B) return;
  const RowContribution<acc_t> c =
      pair_contribution<acc_t>(idx, pair_dist, coef, sq, grad[0], metric, e);
  target[e] = c.target < 0 ? B : c.target;
  other[e] = c.other;
  alpha[e] = c.alpha;
  beta[e] = c.beta;
}

// One block per output row r (grid-stride), threads over D; contributions [start[r],
// start[r + 1]) of the sorted arrays, walked in order.
template <typename acc_t>
__global__ void row_grad_kernel(const acc_t* __restrict__ x, const int64_t* __restrict__ start,
                                const int64_t* __restrict__ other, const acc_t* __restrict__ alpha,
                                const acc_t* __restrict__ beta, int64_t B, int64_t Dim,
                                acc_t* __restrict__ gx) {
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    const int64_t t0 = start[r], t1 = start[r + 1];
    const acc_t al = row_alpha<acc_t>(alpha, t0, t1);
    for (int64_t d = threadIdx.x; d < Dim; d += blockDim.x) {
      gx[r * Dim + d] = row_grad_element<acc_t>(x, Dim, r, d, al, other, beta, t0, t1);
    }
  }
}

inline unsigned anchor_blocks(int64_t B) {
  return static_cast<unsigned>((B + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_hard_mining_cuda(const at::Tensor& dist_in, const at::Tensor& labels_in) {
  check_batch_hard_mining_inputs(dist_in, labels_in);
  const c10::cuda::CUDAGuard guard(dist_in.device());
  const at::Tensor dist = dist_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t B = dist.size(0);
  at::Tensor d_ap = at::empty({B}, dist.options());
  at::Tensor d_an = at::empty({B}, dist.options());
  at::Tensor d_mn = at::empty({B}, dist.options());
  const auto idx_opts = labels.options().dtype(at::kLong);
  at::Tensor p = at::empty({B}, idx_opts), n = at::empty({B}, idx_opts), m = at::empty({B}, idx_opts);
  at::Tensor valid = at::empty({B}, labels.options().dtype(at::kChar));
  if (B == 0) return {d_ap, d_an, d_mn, p, n, m, valid};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dist.scalar_type(), "batch_hard_mining_cuda", [&] {
    batch_hard_mining_kernel<scalar_t><<<anchor_blocks(B), kWarp * kWarpsPerBlock, 0, stream>>>(
        dist.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), B,
        d_ap.mutable_data_ptr<scalar_t>(), d_an.mutable_data_ptr<scalar_t>(),
        d_mn.mutable_data_ptr<scalar_t>(), p.mutable_data_ptr<int64_t>(),
        n.mutable_data_ptr<int64_t>(), m.mutable_data_ptr<int64_t>(),
        valid.mutable_data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_ap, d_an, d_mn, p, n, m, valid};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> metric_loss_forward_cuda(
    const at::Tensor& emb, const at::Tensor& labels_in, double margin, c10::string_view metric_name,
    c10::string_view loss_name) {
  const char* op = "_metric_loss_forward";
  check_metric_loss_inputs(op, emb, labels_in, margin);
  const Metric metric = parse_metric(op, metric_name);
  const LossKind kind = parse_loss_kind(op, loss_name);
  const c10::cuda::CUDAGuard guard(emb.device());
  const auto acc = metric_acc_type(emb.scalar_type());
  const at::Tensor x = emb.to(acc).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t B = x.size(0);
  const auto opts = x.options();
  at::Tensor terms = at::zeros({B}, opts);
  at::Tensor level = at::zeros({B}, opts.dtype(at::kChar));
  at::Tensor idx = at::full({B, 3}, -1, opts.dtype(at::kLong));
  at::Tensor pair_dist = at::zeros({B, 3}, opts);
  at::Tensor coef = at::zeros({B, 3}, opts);
  if (B > 0) {
    const at::Tensor gram = full_fp32_mm_nt(x, x);
    at::Tensor diag = gram.diagonal().contiguous();
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "metric_loss_forward_cuda", [&] {
      const LossOutputs<scalar_t> out{terms.mutable_data_ptr<scalar_t>(),
                                      level.mutable_data_ptr<int8_t>(),
                                      idx.mutable_data_ptr<int64_t>(),
                                      pair_dist.mutable_data_ptr<scalar_t>(),
                                      coef.mutable_data_ptr<scalar_t>()};
      const scalar_t* g = gram.const_data_ptr<scalar_t>();
      const int64_t* y = labels.const_data_ptr<int64_t>();
      const scalar_t mg = static_cast<scalar_t>(margin);
      const unsigned threads = kWarp * kWarpsPerBlock;
      if (metric == Metric::kEuclidean) {
        loss_forward_kernel<scalar_t, Metric::kEuclidean><<<anchor_blocks(B), threads, 0, stream>>>(
            g, diag.const_data_ptr<scalar_t>(), y, B, kind, mg, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        inv_norm_kernel<scalar_t><<<static_cast<unsigned>((B + 255) / 256), 256, 0, stream>>>(
            diag.mutable_data_ptr<scalar_t>(), B);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        loss_forward_kernel<scalar_t, Metric::kCosine><<<anchor_blocks(B), threads, 0, stream>>>(
            g, diag.const_data_ptr<scalar_t>(), y, B, kind, mg, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  at::Tensor loss = finish_metric_loss(terms, level, coef);
  return {loss, idx, pair_dist, coef};
}

at::Tensor metric_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& emb,
                                     const at::Tensor& idx_in, const at::Tensor& pair_dist_in,
                                     const at::Tensor& coef_in, c10::string_view metric_name) {
  check_metric_loss_backward_inputs(grad, emb, idx_in, pair_dist_in, coef_in);
  const Metric metric = parse_metric("_metric_loss_backward", metric_name);
  const c10::cuda::CUDAGuard guard(emb.device());
  const auto acc = metric_acc_type(emb.scalar_type());
  const at::Tensor x = emb.to(acc).contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const at::Tensor pair_dist = pair_dist_in.to(acc).contiguous();
  const at::Tensor coef = coef_in.to(acc).contiguous();
  const at::Tensor g = grad.to(acc).reshape({1}).contiguous();
  const int64_t B = x.size(0), Dim = x.size(1);
  at::Tensor gx = at::empty({B, Dim}, x.options());
  if (gx.numel() == 0) return gx.to(emb.scalar_type());
  const at::Tensor sq = metric == Metric::kCosine ? x.mul(x).sum(1) : x.new_empty({0});
  const int64_t E = 6 * B;
  at::Tensor target = at::empty({E}, idx.options());
  at::Tensor other = at::empty({E}, idx.options());
  at::Tensor alpha = at::empty({E}, x.options()), beta = at::empty({E}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "metric_loss_contributions_cuda", [&] {
    contributions_kernel<scalar_t><<<static_cast<unsigned>((E + kPairThreads - 1) / kPairThreads),
                                     kPairThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(),
        metric == Metric::kCosine ? sq.const_data_ptr<scalar_t>() : nullptr,
        idx.const_data_ptr<int64_t>(), pair_dist.const_data_ptr<scalar_t>(),
        coef.const_data_ptr<scalar_t>(), metric, B, target.mutable_data_ptr<int64_t>(),
        other.mutable_data_ptr<int64_t>(), alpha.mutable_data_ptr<scalar_t>(),
        beta.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Stable: each row keeps its contributions in the order of e (deterministic, as on the CPU).
  const auto sorted = at::sort(target, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& order = std::get<1>(sorted);
  const at::Tensor start =
      at::searchsorted(std::get<0>(sorted), at::arange(B + 1, target.options()));
  const at::Tensor other_s = other.index_select(0, order);
  const at::Tensor alpha_s = alpha.index_select(0, order), beta_s = beta.index_select(0, order);
  const int64_t blocks = std::min<int64_t>(
      B, static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  AT_DISPATCH_FLOATING_TYPES(acc, "metric_loss_backward_cuda", [&] {
    row_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), kPairThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), start.const_data_ptr<int64_t>(),
        other_s.const_data_ptr<int64_t>(), alpha_s.const_data_ptr<scalar_t>(),
        beta_s.const_data_ptr<scalar_t>(), B, Dim, gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx.to(emb.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CUDA, m) {
  m.impl("batch_hard_mining", &batch_hard_mining_cuda);
  m.impl("_metric_loss_forward", &metric_loss_forward_cuda);
  m.impl("_metric_loss_backward", &metric_loss_backward_cuda);
}

}  // namespace edaan_fast
