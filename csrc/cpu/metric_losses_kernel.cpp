// CPU kernels of batch_hard_mining / triplet_loss / quartet_loss (math: csrc/ops/metric_losses.h).
//
// Forward: the Gram matrix G = x x^T with BLAS (float or double; symmetric blocks), then one pass over the anchors
// (at::parallel_for): each anchor reads its Gram row (positive and negative) and the row of its
// negative (second negative), turning Gram values into distances on the fly; no [B, B]
// distance matrix and no autograd graph are built.
// Backward: the embedding gradient is a sum over the (at most 3 per anchor) selected pairs. The
// pair contributions (metric_losses.h) are sorted by the row they land on (a counting sort,
// O(B)), so each thread owns whole output rows: no atomics, no per-thread buffers, O(B * D)
// work, and the same sums in the same order as the CUDA backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ops/metric_losses.h"

namespace edaan_fast {
namespace {

using namespace metric_loss_math;

// G = x x^T exploiting symmetry: block row k computes only G[k, k:] (BLAS GEMMs into views of G),
// the blocks left of the diagonal are mirrored from above it. With 4 block rows this is 10/16 of
// the GEMM work of one full at::mm; small problems take the single call.
at::Tensor gram_matrix_cpu(const at::Tensor& x) {
  const int64_t B = x.size(0), Dim = x.size(1);
  if (B < 128 || Dim < 256 || (x.scalar_type() == at::kFloat && cpu_fp32_matmul_reduced())) {
    return full_fp32_mm_nt(x, x);  // full float32 even where oneDNN may use bfloat16 (common.h)
  }
  const int64_t blocks = B >= 256 ? 4 : 2;
  const int64_t bs = (B + blocks - 1) / blocks;
  at::Tensor gram = at::empty({B, B}, x.options());
  for (int64_t r0 = 0; r0 < B; r0 += bs) {
    const int64_t rows = std::min(bs, B - r0);
    at::Tensor out = gram.narrow(0, r0, rows).narrow(1, r0, B - r0);
    at::mm_out(out, x.narrow(0, r0, rows), x.narrow(0, r0, B - r0).t());
  }
  for (int64_t r0 = bs; r0 < B; r0 += bs) {
    const int64_t rows = std::min(bs, B - r0);
    gram.narrow(0, r0, rows).narrow(1, 0, r0).copy_(gram.narrow(0, 0, r0).narrow(1, r0, rows).t());
  }
  return gram;
}

inline int64_t anchor_grain(int64_t B) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(B, 1)); }

template <typename acc_t, typename Row>
inline void mine_anchor(const Row& row, const int64_t* labels, int64_t B, int64_t i, bool want_m,
                        Pick<acc_t>& pos, Pick<acc_t>& neg, Pick<acc_t>& sec) {
  pos = no_pick<acc_t>();
  neg = no_pick<acc_t>();
  sec = no_pick<acc_t>();
  scan_pos_neg<acc_t>(row, labels, B, i, 0, 1, pos, neg);
  if (want_m && neg.j >= 0) scan_second_neg<acc_t>(row, labels, B, neg.j, labels[i], 0, 1, sec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_hard_mining_cpu(const at::Tensor& dist_in, const at::Tensor& labels_in) {
  check_batch_hard_mining_inputs(dist_in, labels_in);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dist.scalar_type(), "batch_hard_mining_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* D = dist.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const MatrixRow<scalar_t, acc_t> row{D, B};
    scalar_t* oap = d_ap.mutable_data_ptr<scalar_t>();
    scalar_t* oan = d_an.mutable_data_ptr<scalar_t>();
    scalar_t* omn = d_mn.mutable_data_ptr<scalar_t>();
    int64_t* op = p.mutable_data_ptr<int64_t>();
    int64_t* on = n.mutable_data_ptr<int64_t>();
    int64_t* om = m.mutable_data_ptr<int64_t>();
    int8_t* ov = valid.mutable_data_ptr<int8_t>();
    at::parallel_for(0, B, anchor_grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        Pick<acc_t> pos, neg, sec;
        mine_anchor<acc_t>(row, y, B, i, true, pos, neg, sec);
        write_mining<scalar_t, acc_t>(D, B, i, pos, neg, sec, oap, oan, omn, op, on, om, ov);
      }
    });
  });
  return {d_ap, d_an, d_mn, p, n, m, valid};
}

// Mines every anchor from the Gram matrix and writes the per-anchor term, its level, the picked
// indices (p, n, m; -1 if absent), their distances and the unscaled pair coefficients.
template <typename acc_t, Metric kMetric>
void loss_forward_rows(const at::Tensor& gram, const at::Tensor& diag, const at::Tensor& labels,
                       LossKind kind, acc_t margin, at::Tensor& terms, at::Tensor& level,
                       at::Tensor& idx, at::Tensor& pair_dist, at::Tensor& coef) {
  const int64_t B = gram.size(0);
  const acc_t* G = gram.const_data_ptr<acc_t>();
  const acc_t* dg = diag.const_data_ptr<acc_t>();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const GramRow<acc_t, kMetric> row{G, dg, B};
  const LossOutputs<acc_t> out{terms.mutable_data_ptr<acc_t>(), level.mutable_data_ptr<int8_t>(),
                               idx.mutable_data_ptr<int64_t>(), pair_dist.mutable_data_ptr<acc_t>(),
                               coef.mutable_data_ptr<acc_t>()};
  const bool want_m = kind == LossKind::kQuartet;
  at::parallel_for(0, B, anchor_grain(B), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Pick<acc_t> pos, neg, sec;
      mine_anchor<acc_t>(row, y, B, i, want_m, pos, neg, sec);
      write_anchor<acc_t, kMetric>(row, kind, margin, i, pos, neg, sec, out);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> metric_loss_forward_cpu(
    const at::Tensor& emb, const at::Tensor& labels_in, double margin, c10::string_view metric_name,
    c10::string_view loss_name) {
  const char* op = "_metric_loss_forward";
  check_metric_loss_inputs(op, emb, labels_in, margin);
  const Metric metric = parse_metric(op, metric_name);
  const LossKind kind = parse_loss_kind(op, loss_name);
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
    const at::Tensor gram = gram_matrix_cpu(x);
    at::Tensor diag = gram.diagonal().contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "metric_loss_forward_cpu", [&] {
      if (metric == Metric::kEuclidean) {
        loss_forward_rows<scalar_t, Metric::kEuclidean>(gram, diag, labels, kind, margin, terms,
                                                        level, idx, pair_dist, coef);
      } else {
        scalar_t* d = diag.mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < B; ++i) d[i] = inv_norm_from_sq(d[i]);
        loss_forward_rows<scalar_t, Metric::kCosine>(gram, diag, labels, kind, margin, terms,
                                                     level, idx, pair_dist, coef);
      }
    });
  }
  at::Tensor loss = finish_metric_loss(terms, level, coef);
  return {loss, idx, pair_dist, coef};
}

template <typename acc_t>
at::Tensor metric_loss_backward_rows(acc_t g, const at::Tensor& x, const at::Tensor& idx,
                                     const at::Tensor& pair_dist, const at::Tensor& coef,
                                     Metric metric) {
  const int64_t B = x.size(0), Dim = x.size(1);
  const acc_t* X = x.const_data_ptr<acc_t>();

  // |x_r|^2, for the cosine metric.
  std::vector<acc_t> sq(metric == Metric::kCosine ? B : 0);
  if (metric == Metric::kCosine) {
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(Dim, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        acc_t s = 0;
        const acc_t* xr = X + r * Dim;
        for (int64_t d = 0; d < Dim; ++d) s += xr[d] * xr[d];
        sq[r] = s;
      }
    });
  }

  // The contributions (metric_losses.h), sorted stably by target row (counting sort, O(B)).
  const int64_t E = 6 * B;
  std::vector<RowContribution<acc_t>> contrib(static_cast<size_t>(E));
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    contrib[e] = pair_contribution<acc_t>(idx.const_data_ptr<int64_t>(),
                                          pair_dist.const_data_ptr<acc_t>(),
                                          coef.const_data_ptr<acc_t>(), sq.data(), g, metric, e);
    if (contrib[e].target >= 0) ++start[contrib[e].target + 1];
  }
  for (int64_t r = 0; r < B; ++r) start[r + 1] += start[r];
  std::vector<int64_t> other(static_cast<size_t>(start[B]));
  std::vector<acc_t> alpha(static_cast<size_t>(start[B])), beta(static_cast<size_t>(start[B]));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (const RowContribution<acc_t>& c : contrib) {
    if (c.target < 0) continue;
    const int64_t t = fill[c.target]++;
    other[t] = c.other;
    alpha[t] = c.alpha;
    beta[t] = c.beta;
  }

  // Each thread owns whole output rows; the loops compute row_grad_element for every d of the
  // row, contribution by contribution (so the inner loop vectorises over d).
  at::Tensor gx = at::empty({B, Dim}, x.options());
  acc_t* out = gx.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(Dim, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      acc_t* o = out + r * Dim;
      const acc_t* xr = X + r * Dim;
      const acc_t al = row_alpha<acc_t>(alpha.data(), start[r], start[r + 1]);
      for (int64_t d = 0; d < Dim; ++d) o[d] = al * xr[d];
      for (int64_t t = start[r]; t < start[r + 1]; ++t) {
        const acc_t be = beta[t];
        const acc_t* xo = X + other[t] * Dim;
        for (int64_t d = 0; d < Dim; ++d) o[d] += be * xo[d];
      }
    }
  });
  return gx;
}

at::Tensor metric_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& emb,
                                    const at::Tensor& idx_in, const at::Tensor& pair_dist_in,
                                    const at::Tensor& coef_in, c10::string_view metric_name) {
  check_metric_loss_backward_inputs(grad, emb, idx_in, pair_dist_in, coef_in);
  const Metric metric = parse_metric("_metric_loss_backward", metric_name);
  const auto acc = metric_acc_type(emb.scalar_type());
  const at::Tensor x = emb.to(acc).contiguous();
  const at::Tensor idx = idx_in.contiguous();
  const at::Tensor pair_dist = pair_dist_in.to(acc).contiguous();
  const at::Tensor coef = coef_in.to(acc).contiguous();
  if (x.numel() == 0) return at::zeros_like(emb, at::MemoryFormat::Contiguous);
  at::Tensor gx;
  AT_DISPATCH_FLOATING_TYPES(acc, "metric_loss_backward_cpu", [&] {
    const scalar_t g = grad.to(acc).item<scalar_t>();
    gx = metric_loss_backward_rows<scalar_t>(g, x, idx, pair_dist, coef, metric);
  });
  return gx.to(emb.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CPU, m) {
  m.impl("batch_hard_mining", &batch_hard_mining_cpu);
  m.impl("_metric_loss_forward", &metric_loss_forward_cpu);
  m.impl("_metric_loss_backward", &metric_loss_backward_cpu);
}

}  // namespace edaan_fast
