// batch_hard_mining / triplet_loss / quartet_loss: the math of EDAAN eq. (6)/(7), written once.
//
// Distances D over a batch of embeddings x (rows of emb [B, Dim]):
//   euclidean: D[i,j] = sqrt(clamp_min(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12))  (as torchreid)
//   cosine:    D[i,j] = 1 - (x_i / max(|x_i|, 1e-12)) . (x_j / max(|x_j|, 1e-12))
// Both come from the Gram matrix G = x x^T (one BLAS GEMM) and its diagonal.
//
// Batch-hard mining, per anchor i (ties: the lowest index wins; NaN wins over any number, as
// torch.max/min propagate NaN, so non-finite embeddings give a NaN loss):
//   p(i) = argmax_{j != i, y_j == y_i} D[i,j]              hardest positive
//   n(i) = argmin_{y_j != y_i} D[i,j]                      hardest negative
//   m(i) = argmin_{y_k not in {y_i, y_n(i)}} D[n(i),k]     second negative (a third identity)
// Terms: triplet (eq. 6)  relu(D[i,p] - D[i,n] + margin), soft margin softplus(D[i,p] - D[i,n]);
//        quartet (eq. 7)  relu(D[i,p] - D[i,n] + D[i,p] - D[m,n] + margin), falling back to the
//        triplet term for an anchor whose batch has no third identity.
//
// The scans below take a start and a stride so that the CPU (start 0, stride 1) and a CUDA warp
// (start lane, stride 32, then a shuffle reduction with the same `beats_*` rules) run the very
// same comparisons.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <string>

#include "common.h"

namespace edaan_fast {

enum class Metric : int { kEuclidean = 0, kCosine = 1 };
enum class LossKind : int { kTriplet = 0, kSoftTriplet = 1, kQuartet = 2 };

// Per-anchor level in `valid` (batch_hard_mining) and in the losses.
constexpr int8_t kNoTerm = 0;       // no positive or no negative: the anchor is skipped
constexpr int8_t kTripletTerm = 1;  // p and n exist (a quartet anchor falls back to eq. 6)
constexpr int8_t kQuartetTerm = 2;  // p, n and m exist

namespace metric_loss_math {

constexpr double kEuclideanClamp = 1e-12;  // clamp of the squared euclidean distance
constexpr double kNormEps = 1e-12;         // F.normalize's eps (cosine)
constexpr double kSoftplusThreshold = 20;  // torch.nn.functional.softplus's default

template <typename acc_t>
C10_HOST_DEVICE inline bool is_nan(acc_t v) {
  return v != v;
}

// ---- distances from the Gram matrix ----------------------------------------------------------

// Squared euclidean distance before the clamp.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t euclidean_d2(acc_t sq_i, acc_t sq_j, acc_t g_ij) {
  return sq_i + sq_j - acc_t(2) * g_ij;
}

// sqrt(clamp_min(d2, 1e-12)); NaN stays NaN (as torch.clamp).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t euclidean_from_d2(acc_t d2) {
  const acc_t eps = static_cast<acc_t>(kEuclideanClamp);
  return std::sqrt(d2 < eps ? eps : d2);
}

// 1 / max(|x|, 1e-12) from |x|^2 = G_ii.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_norm_from_sq(acc_t sq) {
  const acc_t norm = std::sqrt(sq);
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (norm < eps ? eps : norm);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t cosine_distance(acc_t g_ij, acc_t inv_i, acc_t inv_j) {
  return acc_t(1) - g_ij * inv_i * inv_j;
}

// Row accessors the scans read D through: `diag` holds G_ii (euclidean) or 1/max(|x_i|, eps)
// (cosine), `gram` the [B, B] Gram matrix.
template <typename acc_t, Metric kMetric>
struct GramRow {
  const acc_t* gram;
  const acc_t* diag;
  int64_t B;
  C10_HOST_DEVICE inline acc_t operator()(int64_t r, int64_t j) const {
    const acc_t g = gram[r * B + j];
    if (kMetric == Metric::kEuclidean) {
      return euclidean_from_d2(euclidean_d2(diag[r], diag[j], g));
    } else {
      return cosine_distance(g, diag[r], diag[j]);
    }
  }
};

// A given distance matrix (batch_hard_mining), compared in acc_t.
template <typename scalar_t, typename acc_t>
struct MatrixRow {
  const scalar_t* dist;
  int64_t B;
  C10_HOST_DEVICE inline acc_t operator()(int64_t r, int64_t j) const {
    return static_cast<acc_t>(dist[r * B + j]);
  }
};

// ---- selection with deterministic ties ---------------------------------------------------------

template <typename acc_t>
struct Pick {
  acc_t v;
  int64_t j;  // -1: nothing picked yet
};

template <typename acc_t>
C10_HOST_DEVICE inline Pick<acc_t> no_pick() {
  return Pick<acc_t>{acc_t(0), -1};
}

// Does (v, j) replace `best` as the maximum? NaN beats numbers; equal values: lower index.
template <typename acc_t>
C10_HOST_DEVICE inline bool beats_max(acc_t v, int64_t j, const Pick<acc_t>& best) {
  if (best.j < 0) return j >= 0;
  if (j < 0) return false;
  const bool vn = is_nan(v), bn = is_nan(best.v);
  if (vn || bn) return vn && (!bn || j < best.j);
  return v > best.v || (v == best.v && j < best.j);
}

// Does (v, j) replace `best` as the minimum? NaN beats numbers; equal values: lower index.
template <typename acc_t>
C10_HOST_DEVICE inline bool beats_min(acc_t v, int64_t j, const Pick<acc_t>& best) {
  if (best.j < 0) return j >= 0;
  if (j < 0) return false;
  const bool vn = is_nan(v), bn = is_nan(best.v);
  if (vn || bn) return vn && (!bn || j < best.j);
  return v < best.v || (v == best.v && j < best.j);
}

// Hardest positive and hardest negative of anchor i over j = start, start + stride, ...
template <typename acc_t, typename Row>
C10_HOST_DEVICE inline void scan_pos_neg(const Row& row, const int64_t* labels, int64_t B,
                                         int64_t i, int64_t start, int64_t stride,
                                         Pick<acc_t>& pos, Pick<acc_t>& neg) {
  const int64_t y = labels[i];
  for (int64_t j = start; j < B; j += stride) {
    const acc_t d = row(i, j);
    if (labels[j] == y) {
      if (j != i && beats_max(d, j, pos)) pos = Pick<acc_t>{d, j};
    } else if (beats_min(d, j, neg)) {
      neg = Pick<acc_t>{d, j};
    }
  }
}

// Second negative: the sample closest to n whose identity is neither y_i nor y_n.
template <typename acc_t, typename Row>
C10_HOST_DEVICE inline void scan_second_neg(const Row& row, const int64_t* labels, int64_t B,
                                            int64_t n, int64_t y_i, int64_t start,
                                            int64_t stride, Pick<acc_t>& sec) {
  const int64_t y_n = labels[n];
  for (int64_t k = start; k < B; k += stride) {
    const int64_t yk = labels[k];
    if (yk == y_i || yk == y_n) continue;
    const acc_t d = row(n, k);
    if (beats_min(d, k, sec)) sec = Pick<acc_t>{d, k};
  }
}

// ---- the loss term of one anchor and its derivatives -------------------------------------------

template <typename acc_t>
struct AnchorTerm {
  acc_t loss;           // L_i (0 when the anchor has no term)
  acc_t ga, gb, gc;     // dL_i/dD[i,p], dL_i/dD[i,n], dL_i/dD[m,n]
  int8_t level;         // kNoTerm, kTripletTerm or kQuartetTerm
};

// a = D[i,p], b = D[i,n], c = D[m,n]; relu/softplus as torch computes them and their gradients
// (relu: gradient unless the output is <= 0; softplus: identity above the threshold 20).
template <typename acc_t>
C10_HOST_DEVICE inline AnchorTerm<acc_t> anchor_term(LossKind kind, acc_t margin, bool has_p,
                                                     bool has_n, bool has_m, acc_t a, acc_t b,
                                                     acc_t c) {
  AnchorTerm<acc_t> t{acc_t(0), acc_t(0), acc_t(0), acc_t(0), kNoTerm};
  if (!(has_p && has_n)) return t;
  if (kind == LossKind::kQuartet && has_m) {
    t.level = kQuartetTerm;
    const acc_t z = a - b + a - c + margin;
    t.loss = z <= acc_t(0) ? acc_t(0) : z;  // relu, NaN propagates
    if (!(z <= acc_t(0))) {  // torch's relu backward: gradient unless the output is <= 0
      t.ga = acc_t(2);
      t.gb = acc_t(-1);
      t.gc = acc_t(-1);
    }
    return t;
  }
  t.level = kTripletTerm;
  if (kind == LossKind::kSoftTriplet) {
    const acc_t z = a - b;
    if (z > static_cast<acc_t>(kSoftplusThreshold)) {
      t.loss = z;
      t.ga = acc_t(1);
    } else {
      const acc_t e = std::exp(z);
      t.loss = std::log1p(e);
      t.ga = e / (e + acc_t(1));
    }
    t.gb = -t.ga;
  } else {
    const acc_t z = a - b + margin;
    t.loss = z <= acc_t(0) ? acc_t(0) : z;
    if (!(z <= acc_t(0))) {
      t.ga = acc_t(1);
      t.gb = acc_t(-1);
    }
  }
  return t;
}

// The factor the backward multiplies (x_u - x_v) by, for a euclidean pair: dL/dD * dD/dd2 * 2
// = dL/dD / D where the squared distance was not clamped, 0 where it was (torch.clamp passes no
// gradient below the bound, so all-equal embeddings get a zero, finite gradient).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t euclidean_pair_coef(acc_t dL_dD, acc_t d2, acc_t D) {
  return d2 >= static_cast<acc_t>(kEuclideanClamp) ? dL_dD / D : acc_t(0);
}

// Gradient of one pair term w.r.t. row r, whose partner is row o:
//   dL/dx_r += alpha * x_r + beta * x_o
// euclidean: coef = dL/dD / D (see euclidean_pair_coef): alpha = coef, beta = -coef.
// cosine:    coef = dL/dD; with x^ = x * inv, inv = 1/max(|x|, eps), cos = 1 - D:
//            dD/dx_r = -inv_r (x^_o - cos x^_r) when |x_r| >= eps, else -x^_o / eps.
template <typename acc_t>
C10_HOST_DEVICE inline void pair_grad(Metric metric, acc_t coef, acc_t D, acc_t inv_r,
                                      bool norm_r_ok, acc_t inv_o, acc_t& alpha, acc_t& beta) {
  if (metric == Metric::kEuclidean) {
    alpha = coef;
    beta = -coef;
  } else {
    beta = -coef * inv_o * inv_r;
    alpha = norm_r_ok ? coef * (acc_t(1) - D) * inv_r * inv_r : acc_t(0);
  }
}

// ---- per-anchor outputs, shared by both backends ----------------------------------------------

// batch_hard_mining's outputs for anchor i (distances copied exactly from `dist`).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void write_mining(const scalar_t* dist, int64_t B, int64_t i,
                                         const Pick<acc_t>& pos, const Pick<acc_t>& neg,
                                         const Pick<acc_t>& sec, scalar_t* d_ap, scalar_t* d_an,
                                         scalar_t* d_mn, int64_t* p, int64_t* n, int64_t* m,
                                         int8_t* valid) {
  p[i] = pos.j;
  n[i] = neg.j;
  m[i] = sec.j;
  d_ap[i] = pos.j >= 0 ? dist[i * B + pos.j] : scalar_t(0);
  d_an[i] = neg.j >= 0 ? dist[i * B + neg.j] : scalar_t(0);
  d_mn[i] = sec.j >= 0 ? dist[neg.j * B + sec.j] : scalar_t(0);
  valid[i] = (pos.j >= 0 && neg.j >= 0) ? (sec.j >= 0 ? kQuartetTerm : kTripletTerm) : kNoTerm;
}

// Where the loss forward writes: per anchor the term and its level; per anchor and pair
// k = 0 (i,p), 1 (i,n), 2 (m,n) the indices (p, n, m; -1 if unused), the distance and the
// coefficient the backward uses (euclidean: dL_i/dD / D, or 0 below the clamp; cosine:
// dL_i/dD), both still to be divided by the number of anchors with a term.
template <typename acc_t>
struct LossOutputs {
  acc_t* terms;
  int8_t* level;
  int64_t* idx;
  acc_t* pair_dist;
  acc_t* coef;
};

template <typename acc_t, Metric kMetric>
C10_HOST_DEVICE inline acc_t pair_coef(const GramRow<acc_t, kMetric>& row, acc_t dL_dD,
                                       int64_t r, int64_t j, acc_t D) {
  if (kMetric == Metric::kEuclidean) {
    // The same Gram entry, in the same orientation, the distance was computed from.
    return euclidean_pair_coef(
        dL_dD, euclidean_d2(row.diag[r], row.diag[j], row.gram[r * row.B + j]), D);
  }
  return dL_dD;
}

template <typename acc_t, Metric kMetric>
C10_HOST_DEVICE inline void write_anchor(const GramRow<acc_t, kMetric>& row, LossKind kind,
                                         acc_t margin, int64_t i, const Pick<acc_t>& pos,
                                         const Pick<acc_t>& neg, const Pick<acc_t>& sec,
                                         const LossOutputs<acc_t>& out) {
  const AnchorTerm<acc_t> t =
      anchor_term<acc_t>(kind, margin, pos.j >= 0, neg.j >= 0, sec.j >= 0, pos.v, neg.v, sec.v);
  const bool has_t = t.level != kNoTerm, has_q = t.level == kQuartetTerm;
  out.terms[i] = t.loss;
  out.level[i] = t.level;
  out.idx[3 * i + 0] = pos.j;
  out.idx[3 * i + 1] = neg.j;
  out.idx[3 * i + 2] = has_q ? sec.j : -1;
  out.pair_dist[3 * i + 0] = pos.j >= 0 ? pos.v : acc_t(0);
  out.pair_dist[3 * i + 1] = neg.j >= 0 ? neg.v : acc_t(0);
  out.pair_dist[3 * i + 2] = has_q ? sec.v : acc_t(0);
  out.coef[3 * i + 0] = has_t ? pair_coef(row, t.ga, i, pos.j, pos.v) : acc_t(0);
  out.coef[3 * i + 1] = has_t ? pair_coef(row, t.gb, i, neg.j, neg.v) : acc_t(0);
  out.coef[3 * i + 2] = has_q ? pair_coef(row, t.gc, neg.j, sec.j, sec.v) : acc_t(0);
}

// The backward's pair k of anchor a: (u, v) = (a, p), (a, n) or (m, n).
C10_HOST_DEVICE inline void pair_rows(const int64_t* idx, int64_t a, int k, int64_t& u,
                                      int64_t& v) {
  u = k == 2 ? idx[3 * a + 2] : a;
  v = k == 0 ? idx[3 * a + 0] : idx[3 * a + 1];
}

// ---- the backward, written once: contributions sorted by the row they land on --------------
//
// The embedding gradient is a sum of at most 6 B contributions, numbered
// e = (3 a + k) * 2 + side: pair k of anchor a adds alpha * x_target + beta * x_other to row
// `target` (side 0: target u, other v; side 1: target v, other u). Both backends sort the
// contributions stably by target (so each row keeps the order of e) and then walk each output
// row's contributions in that fixed order: no atomics, the same sums in the same order on every
// run (bit-identical gradients, as torch.use_deterministic_algorithms asks).

template <typename acc_t>
struct RowContribution {
  int64_t target;  // the row it lands on; -1 when the pair is unused
  int64_t other;
  acc_t alpha, beta;
};

// Contribution e (see above). sq: |x_r|^2 per row (cosine only; may be null for euclidean).
template <typename acc_t>
C10_HOST_DEVICE inline RowContribution<acc_t> pair_contribution(
    const int64_t* idx, const acc_t* pair_dist, const acc_t* coef, const acc_t* sq, acc_t g,
    Metric metric, int64_t e) {
  const int64_t pair = e / 2, a = pair / 3;
  const int k = static_cast<int>(pair % 3), side = static_cast<int>(e % 2);
  int64_t u, v;
  pair_rows(idx, a, k, u, v);
  const acc_t c = coef[pair];
  RowContribution<acc_t> out{-1, -1, acc_t(0), acc_t(0)};
  if (u < 0 || v < 0 || c == acc_t(0)) return out;
  const int64_t r = side == 0 ? u : v, o = side == 0 ? v : u;
  const bool cos = metric == Metric::kCosine;
  const acc_t inv_r = cos ? inv_norm_from_sq(sq[r]) : acc_t(0);
  const acc_t inv_o = cos ? inv_norm_from_sq(sq[o]) : acc_t(0);
  const bool ok_r = cos && std::sqrt(sq[r]) >= static_cast<acc_t>(kNormEps);
  pair_grad<acc_t>(metric, g * c, pair_dist[pair], inv_r, ok_r, inv_o, out.alpha, out.beta);
  out.target = r;
  out.other = o;
  return out;
}

// The summed alpha of one row's contributions [begin, end), in their order.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t row_alpha(const acc_t* alpha, int64_t begin, int64_t end) {
  acc_t al = acc_t(0);
  for (int64_t t = begin; t < end; ++t) al += alpha[t];
  return al;
}

// Element d of output row r: alpha_r x_r[d] + sum_t beta_t x_{other_t}[d], t in order.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t row_grad_element(const acc_t* x, int64_t Dim, int64_t r, int64_t d,
                                              acc_t alpha_r, const int64_t* other,
                                              const acc_t* beta, int64_t begin, int64_t end) {
  acc_t o = alpha_r * x[r * Dim + d];
  for (int64_t t = begin; t < end; ++t) o += beta[t] * x[other[t] * Dim + d];
  return o;
}

}  // namespace metric_loss_math

// ---- host-side checks and helpers shared by both backends --------------------------------------

inline Metric parse_metric(const char* op, c10::string_view metric) {
  if (metric == "euclidean") return Metric::kEuclidean;
  if (metric == "cosine") return Metric::kCosine;
  TORCH_CHECK(false, op, ": metric must be \"euclidean\" or \"cosine\", got \"",
              std::string(metric), "\"");
}

inline LossKind parse_loss_kind(const char* op, c10::string_view kind) {
  if (kind == "triplet") return LossKind::kTriplet;
  if (kind == "soft_triplet") return LossKind::kSoftTriplet;
  if (kind == "quartet") return LossKind::kQuartet;
  TORCH_CHECK(false, op, ": loss must be \"triplet\", \"soft_triplet\" or \"quartet\", got \"",
              std::string(kind), "\"");
}

inline void check_labels(const char* op, const at::Tensor& labels, int64_t B,
                         const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == B, op,
              ": labels must be int64 [", B, "] (one per row of ", like_name, "), got ",
              labels.scalar_type(), " ", shape_str(labels.sizes()));
  TORCH_CHECK(labels.device() == like.device(), op, ": labels must be on the device of ",
              like_name, " (", like.device(), "), got ", labels.device());
}

// The one input check of the loss ops (triplet_loss, quartet_loss, _metric_loss_forward).
inline void check_metric_loss_inputs(const char* op, const at::Tensor& emb,
                                     const at::Tensor& labels, double margin) {
  TORCH_CHECK(emb.dim() == 2, op, ": emb must be a 2-D [B, D] tensor, got ", emb.dim(), "-D ",
              shape_str(emb.sizes()));
  TORCH_CHECK(at::isFloatingType(emb.scalar_type()), op,
              ": emb must be floating point (float32, float16, bfloat16 or float64), got ",
              emb.scalar_type());
  TORCH_CHECK(std::isfinite(margin), op, ": margin must be finite, got ", margin);
  check_labels(op, labels, emb.size(0), emb, "emb");
}

inline void check_batch_hard_mining_inputs(const at::Tensor& dist, const at::Tensor& labels) {
  const char* op = "batch_hard_mining";
  TORCH_CHECK(dist.dim() == 2 && dist.size(0) == dist.size(1), op,
              ": dist must be a square 2-D [B, B] tensor, got ", shape_str(dist.sizes()));
  TORCH_CHECK(at::isFloatingType(dist.scalar_type()), op,
              ": dist must be floating point (float32, float16, bfloat16 or float64), got ",
              dist.scalar_type());
  check_labels(op, labels, dist.size(0), dist, "dist");
}

inline void check_metric_loss_backward_inputs(const at::Tensor& grad, const at::Tensor& emb,
                                              const at::Tensor& idx, const at::Tensor& pair_dist,
                                              const at::Tensor& coef) {
  const char* op = "_metric_loss_backward";
  TORCH_CHECK(emb.dim() == 2 && at::isFloatingType(emb.scalar_type()), op,
              ": emb must be a floating point 2-D [B, D] tensor, got ", emb.scalar_type(), " ",
              shape_str(emb.sizes()));
  const int64_t B = emb.size(0);
  TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one value (the loss is a scalar), got ",
              shape_str(grad.sizes()));
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == B &&
                  idx.size(1) == 3,
              op, ": idx must be int64 [", B, ", 3], got ", idx.scalar_type(), " ",
              shape_str(idx.sizes()));
  for (const at::Tensor* t : {&pair_dist, &coef}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == 3 &&
                    at::isFloatingType(t->scalar_type()),
                op, ": pair_dist and coef must be floating [", B, ", 3], got ",
                t->scalar_type(), " ", shape_str(t->sizes()));
  }
  for (const at::Tensor* t : {&grad, &idx, &pair_dist, &coef}) {
    TORCH_CHECK(t->device() == emb.device(), op, ": all inputs must be on the device of emb (",
                emb.device(), "), got ", t->device());
  }
}

// The accumulation dtype of a loss over `emb`: float64 for float64, else float32.
inline at::ScalarType metric_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Reduction shared by both backends: loss = sum(L_i) / max(#anchors with a term, 1), and the
// per-pair coefficients scaled by the same 1 / max(V, 1) (V == 0: loss 0, zero gradient).
inline at::Tensor finish_metric_loss(const at::Tensor& terms, const at::Tensor& level,
                                     at::Tensor& coef) {
  const at::Tensor denom = level.gt(0).sum().clamp_min(1).to(terms.scalar_type());
  coef.div_(denom);
  return terms.sum().div_(denom);
}

}  // namespace edaan_fast
