// k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017): the per-row math of its four
// fused steps, written once for both backends.
//
// Symbols (N = Q + G items, queries first):
//   M[i, j]    the original distance of the paper, d(i, j)^2 / max_j' d(i, j')^2 (row-normalised
//              squared distance, as the authors' code computes it);
//   N(i, k)    the k smallest entries of row i of M in the stable order on (M[i, j], j);
//   R(i, k)    {j in N(i, k) : i in N(j, k)} (eq. 4);
//   R*(i)      R(i, k1 + 1) plus every R(q, k_half) of a q in R(i, k1 + 1) that shares more
//              than 2/3 of its members with R(i, k1 + 1) (eq. 6); k_half = round(k1 / 2) + 1
//              with round half to even, as numpy's np.around;
//   V[i, j]    exp(-M[i, j]) on R*(i), normalised to sum 1 (eq. 7); local query expansion
//              (eq. 11) replaces V[i] by the mean of V over N(i, k2);
//   d_J(q, g)  1 - s / (2 - s), s = sum_c min(V[q, c], V[g, c]) (eq. 10: sum max = 2 - s because
//              every row of V sums to 1).
//
// Steps (csrc/cpu/reranking_kernel.cpp, csrc/cuda/reranking_kernel.cu):
//   knn_lists           one row tile of scores -> N(i, k) with M values, the row scale, and
//                       (for query rows, into the caller's output) M's gallery columns;
//   k_reciprocal_sets   N(., k) table -> R*(i) as CSR (sorted column indices) with the M values
//                       the table already knows;
//   query_expansion     V (CSR) -> the mean of V over N(i, k2) (CSR), rows merged in column order;
//   jaccard_rerank_     query rows of V (CSR) x the inverted index of the gallery rows -> d_J,
//                       mixed in place with M (eq. 12).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "rank_eval.h"

namespace edaan_fast {

// How knn_lists reads its scores tile.
enum class RerankScores : int64_t {
  kDistance = 0,   // scores are distances d: M_raw = d * d
  kEuclidean = 1,  // scores are dot products f_i . f_j: M_raw = max(|f_i|^2 + |f_j|^2 - 2 s, 0)
  kCosine = 2,     // scores are cosine similarities: M_raw = max(1 - s, 0)^2
};

namespace rerank_math {

using rank_math::key_less;  // the stable order on (value, index)

// The un-normalised M entry of one score. A NaN score stays NaN (so that it is reported).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t squared_distance(acc_t s, acc_t row_sq, acc_t col_sq, int64_t kind) {
  if (kind == static_cast<int64_t>(RerankScores::kDistance)) return s * s;
  if (kind == static_cast<int64_t>(RerankScores::kEuclidean)) {
    const acc_t d2 = row_sq + col_sq - acc_t(2) * s;
    return d2 < acc_t(0) ? acc_t(0) : d2;
  }
  const acc_t d = acc_t(1) - s;
  return d < acc_t(0) ? acc_t(0) : d * d;
}

// Running maximum that keeps a NaN once seen (a NaN row is reported, never ranked).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t nan_max(acc_t a, acc_t b) {
  return (b != b || b > a) ? b : a;
}

// The divisor of a row of M: its maximum, 1 for an all-zero row; NaN/inf stay (reported).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t row_scale(acc_t row_max) {
  return (row_max != row_max || row_max > acc_t(0)) ? row_max : acc_t(1);
}

// A raw value m can only enter a list whose last value is `thr` (after m / scale rounds) when
// m <= this bound: a cheap test on the raw values, exact check (m / scale) afterwards. The slack
// (1e-5 relative) covers the rounding of m / scale and of thr * scale many times over.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t candidate_bound(acc_t thr, acc_t scale) {
  return thr * scale * acc_t(1.00001) + acc_t(1e-30);
}

// The fused k-NN (knn_features) selects on raw values m before the row scale is known. With
// m_k the k-th smallest raw value so far, every j whose M = m_j / scale can tie with or precede
// the k-th M after rounding has m_j <= raw_bound(m_k), as long as that k-th M is a normal
// number (two roundings of a division move a value by at most 2^-52 / 2^-23 relative, far
// inside the 1e-5 slack); the kernel redoes a row exactly when it is not.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t raw_bound(acc_t mk) {
  return mk * acc_t(1.00001);
}

// Inserts (v, j) into the list vals/idx of `count` entries sorted by (value, index), keeping at
// most k entries. Returns whether it went in.
template <typename acc_t>
C10_HOST_DEVICE inline bool topk_insert(acc_t* vals, int64_t* idx, int64_t& count, int64_t k,
                                        acc_t v, int64_t j) {
  if (count == k && !key_less<acc_t>(v, j, vals[k - 1], idx[k - 1])) return false;
  int64_t p = count < k ? count++ : k - 1;
  while (p > 0 && key_less<acc_t>(v, j, vals[p - 1], idx[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = j;
  return true;
}

// --- k nearest neighbours of a row, split into column slices and merged -------------------
// The CUDA knn_lists gives a row to a block of several warps: thread t of T scans the columns
// t, t + T, t + 2T, ... (its slice) and keeps their k best (slice_topk); each warp merges its 32
// threads' lists, and one thread merges the warps' lists (merge_topk). The union of the slices'
// lists holds the row's k best, and (value, index) is a strict total order on a row's entries
// (distinct indices; the values are finite: a row holding NaN or inf gets placeholders before
// any selection), so every merge order gives the same list as the CPU's scan of the whole row.
// The CPU op _knn_lists_sliced runs the same two functions over the same decomposition.

// The raw squared distance of column j of one row of scores (the functor slice_topk reads).
template <typename scalar_t, typename acc_t>
struct RawRow {
  const scalar_t* s;
  const scalar_t* col_sq;  // read for kEuclidean only
  acc_t row_sq;
  int64_t kind;
  C10_HOST_DEVICE acc_t operator()(int64_t j) const {
    return squared_distance<acc_t>(
        static_cast<acc_t>(s[j]), row_sq,
        kind == static_cast<int64_t>(RerankScores::kEuclidean) ? static_cast<acc_t>(col_sq[j])
                                                                : acc_t(0),
        kind);
  }
};

// Warps that share a row in the CUDA knn_lists: the power of two (at most kKnnMaxRowWarps) that
// gives each thread at most kKnnColsPerThread columns, so a long row is scanned by up to 256
// threads and a short one by one warp.
constexpr int64_t kKnnMaxRowWarps = 8;
constexpr int64_t kKnnColsPerThread = 64;
C10_HOST_DEVICE inline int64_t knn_row_warps(int64_t N) {
  int64_t w = 1;
  while (w < kKnnMaxRowWarps && w * 32 * kKnnColsPerThread < N) w *= 2;
  return w;
}

// The head of a sorted list of `count` entries at position `head`, or the sentinel
// (+inf, INT64_MAX) that follows every real entry once the list is spent.
template <typename acc_t>
C10_HOST_DEVICE inline void list_head(const acc_t* vals, const int64_t* idx, int64_t count,
                                      int64_t head, acc_t& v, int64_t& i) {
  const bool live = head < count;
  v = live ? vals[head] : acc_t(INFINITY);
  i = live ? idx[head] : INT64_MAX;
}

// The k smallest (m_of(j) / scale, j) of one slice of a row, the columns j = begin, begin + step,
// ... < end, sorted by (value, index) into vals/idx (room for k); returns how many, the smaller
// of k and the slice's columns (a slice may hold fewer than k). m_of(j): the raw squared
// distance of column j. The same raw bound test as the CPU kernel's scan (candidate_bound), so
// a column is divided by the scale only when it may enter.
template <typename acc_t, typename RawFn>
C10_HOST_DEVICE inline int64_t slice_topk(const RawFn& m_of, int64_t begin, int64_t end,
                                          int64_t step, acc_t scale, int64_t k, acc_t* vals,
                                          int64_t* idx) {
  int64_t count = 0;
  acc_t bound = acc_t(INFINITY);
  for (int64_t j = begin; j < end; j += step) {
    const acc_t m = m_of(j);
    if (m <= bound && topk_insert<acc_t>(vals, idx, count, k, m / scale, j) && count == k) {
      bound = candidate_bound<acc_t>(vals[k - 1], scale);
    }
  }
  return count;
}

// The k smallest entries of `lists` sorted lists (list l: vals + l * ld, idx + l * ld, counts[l]
// entries) in (value, index) order, into out_v/out_i: k rounds, each taking the smallest head
// (ties: the smaller index) and advancing that list. Returns how many were written (fewer than
// k only when the lists hold fewer). heads: `lists` int64 of scratch.
template <typename acc_t, typename out_t>
C10_HOST_DEVICE inline int64_t merge_topk(const acc_t* vals, const int64_t* idx,
                                          const int64_t* counts, int64_t lists, int64_t ld,
                                          int64_t k, int64_t* heads, out_t* out_v,
                                          int64_t* out_i) {
  for (int64_t l = 0; l < lists; ++l) heads[l] = 0;
  for (int64_t t = 0; t < k; ++t) {
    acc_t v;
    int64_t i;
    list_head<acc_t>(vals, idx, counts[0], heads[0], v, i);
    int64_t who = 0;
    for (int64_t l = 1; l < lists; ++l) {
      acc_t ov;
      int64_t oi;
      list_head<acc_t>(vals + l * ld, idx + l * ld, counts[l], heads[l], ov, oi);
      if (key_less<acc_t>(ov, oi, v, i)) {
        v = ov;
        i = oi;
        who = l;
      }
    }
    if (i == INT64_MAX) return t;  // every list is spent
    ++heads[who];
    out_v[t] = static_cast<out_t>(v);
    out_i[t] = i;
  }
  return k;
}

// |N(q, k1/2 + 1)| as the authors compute it: int(np.around(k1 / 2)) + 1, round half to even.
C10_HOST_DEVICE inline int64_t half_size(int64_t k1) {
  int64_t h = k1 / 2;
  if ((k1 & 1) && (h & 1)) ++h;  // x.5 rounds to the even neighbour
  return h + 1;
}

// The widest R*(i): R(i, ka) plus ka sets R(q, kh).
C10_HOST_DEVICE inline int64_t expansion_width(int64_t ka, int64_t kh) { return ka * (kh + 1); }

// R(i, k) (eq. 4) into out, in the order of N(i, k); returns its size. nn: [N, ld] table.
C10_HOST_DEVICE inline int64_t reciprocal(const int64_t* nn, int64_t ld, int64_t i, int64_t k,
                                          int64_t* out) {
  int64_t n = 0;
  for (int64_t a = 0; a < k; ++a) {
    const int64_t j = nn[i * ld + a];
    const int64_t* back = nn + j * ld;
    bool hit = false;
    for (int64_t b = 0; b < k; ++b) hit |= back[b] == i;
    if (hit) out[n++] = j;
  }
  return n;
}

// R*(i) (eq. 6), sorted ascending and without duplicates, into out[0, result). out: room for
// expansion_width(ka, kh) entries; half: kh int64 of scratch.
C10_HOST_DEVICE inline int64_t k_reciprocal_expansion(const int64_t* nn, int64_t ld, int64_t i,
                                                      int64_t ka, int64_t kh, int64_t* out,
                                                      int64_t* half) {
  const int64_t na = reciprocal(nn, ld, i, ka, out);
  int64_t n = na;
  for (int64_t a = 0; a < na; ++a) {
    const int64_t nh = reciprocal(nn, ld, out[a], kh, half);
    // move the members of R(q, kh) that are not in R(i, ka) to the front: only they can add
    int64_t outside = 0;
    for (int64_t b = 0; b < nh; ++b) {
      bool in = false;
      for (int64_t c = 0; c < na; ++c) in |= half[b] == out[c];
      if (!in) half[outside++] = half[b];
    }
    if (3 * (nh - outside) > 2 * nh) {  // |R(q, kh) & R(i, ka)| > 2/3 |R(q, kh)|, exactly
      for (int64_t b = 0; b < outside; ++b) out[n++] = half[b];
    }
  }
  for (int64_t a = 1; a < n; ++a) {  // insertion sort: n is a few dozen
    const int64_t v = out[a];
    int64_t p = a;
    while (p > 0 && out[p - 1] > v) {
      out[p] = out[p - 1];
      --p;
    }
    out[p] = v;
  }
  int64_t m = 0;
  for (int64_t a = 0; a < n; ++a) {
    if (m == 0 || out[a] != out[m - 1]) out[m++] = out[a];
  }
  return m;
}

// The M value of (i, j) if j is in the neighbour list of i, else NaN (the caller computes it).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t known_distance(const int64_t* nn_row, const scalar_t* nn_dist_row,
                                               int64_t ld, int64_t j) {
  for (int64_t t = 0; t < ld; ++t) {
    if (nn_row[t] == j) return nn_dist_row[t];
  }
  return static_cast<scalar_t>(NAN);
}

// Local query expansion (eq. 11) of one row: the mean of the CSR rows nb[0, kq) (columns
// ascending in each row), merged in column order; each column's values are added in the order
// t = 0 .. kq-1 and divided by kq, as numpy's mean over the stacked rows does. Writes
// out_col/out_val when they are non-null; returns the number of columns. cursor: kq int64.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline int64_t mean_of_rows(const int64_t* ptr, const int64_t* col,
                                            const scalar_t* val, const int64_t* nb, int64_t kq,
                                            int64_t* cursor, int64_t* out_col, scalar_t* out_val) {
  for (int64_t t = 0; t < kq; ++t) cursor[t] = ptr[nb[t]];
  int64_t n = 0;
  while (true) {
    int64_t c = -1;
    for (int64_t t = 0; t < kq; ++t) {
      const int64_t p = cursor[t];
      if (p < ptr[nb[t] + 1] && (c < 0 || col[p] < c)) c = col[p];
    }
    if (c < 0) return n;
    acc_t s = acc_t(0);
    for (int64_t t = 0; t < kq; ++t) {
      const int64_t p = cursor[t];
      if (p < ptr[nb[t] + 1] && col[p] == c) {
        s += static_cast<acc_t>(val[p]);
        cursor[t] = p + 1;
      }
    }
    if (out_col != nullptr) {
      out_col[n] = c;
      out_val[n] = static_cast<scalar_t>(s / static_cast<acc_t>(kq));
    }
    ++n;
  }
}

// Eq. 12 from the accumulated s = sum_c min(V[q, c], V[g, c]) and the original distance:
// d_J = 1 - s / (2 - s) (eq. 10), then d_J (1 - lambda) + M lambda, as the authors' code.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t reranked_distance(acc_t s, acc_t m, acc_t lambda) {
  const acc_t jaccard = acc_t(1) - s / (acc_t(2) - s);
  return jaccard * (acc_t(1) - lambda) + m * lambda;
}

}  // namespace rerank_math

// --- the one input check of each op (both backends) ------------------------------------------

inline int64_t rerank_scores_kind(c10::string_view metric) {
  if (metric == "distance") return static_cast<int64_t>(RerankScores::kDistance);
  if (metric == "euclidean") return static_cast<int64_t>(RerankScores::kEuclidean);
  if (metric == "cosine") return static_cast<int64_t>(RerankScores::kCosine);
  TORCH_CHECK(false, "knn_lists: metric must be \"distance\", \"euclidean\" or \"cosine\", got \"",
              std::string(metric), "\"");
  return -1;
}

inline void check_rerank_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_knn_lists_inputs(const at::Tensor& scores, const at::Tensor& row_sq,
                                   const at::Tensor& col_sq, int64_t k, int64_t kind,
                                   const at::Tensor& kept) {
  constexpr const char* op = "knn_lists";
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be a 2-D [rows, N] tile, got ", scores.dim(),
              "-D ", shape_str(scores.sizes()));
  check_rerank_float(op, "scores", scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= N, op, ": k must be in [1, N = ", N, "] (N: the columns of scores), got ",
              k);
  TORCH_CHECK(kept.dim() == 2 && kept.size(0) == B && kept.size(1) <= N &&
                  kept.scalar_type() == scores.scalar_type(),
              op, ": kept must be ", scores.scalar_type(), " [", B, ", K <= ", N,
              "] (it receives the last K columns of M), got ", kept.scalar_type(), " ",
              shape_str(kept.sizes()));
  TORCH_CHECK(kept.size(1) <= 1 || kept.stride(1) == 1, op,
              ": kept must have contiguous rows (stride 1 along dim 1), got strides ",
              shape_str(kept.strides()));
  TORCH_CHECK(kept.device() == scores.device(), op, ": kept must be on the device of scores (",
              scores.device(), "), got ", kept.device());
  if (kind == static_cast<int64_t>(RerankScores::kEuclidean)) {
    TORCH_CHECK(row_sq.dim() == 1 && row_sq.size(0) == B && row_sq.scalar_type() == scores.scalar_type(),
                op, ": row_sq must be ", scores.scalar_type(), " [", B, "] (one squared norm per row) for "
                "metric \"euclidean\", got ", row_sq.scalar_type(), " ", shape_str(row_sq.sizes()));
    TORCH_CHECK(col_sq.dim() == 1 && col_sq.size(0) == N && col_sq.scalar_type() == scores.scalar_type(),
                op, ": col_sq must be ", scores.scalar_type(), " [", N, "] (one squared norm per column) "
                "for metric \"euclidean\", got ", col_sq.scalar_type(), " ", shape_str(col_sq.sizes()));
    TORCH_CHECK(row_sq.device() == scores.device() && col_sq.device() == scores.device(), op,
                ": row_sq and col_sq must be on the device of scores (", scores.device(), "), got ",
                row_sq.device(), " and ", col_sq.device());
  }
}

inline void check_knn_features_inputs(const at::Tensor& f, const at::Tensor& sq,
                                      int64_t row_start, int64_t row_end, int64_t k, int64_t kind,
                                      const at::Tensor& kept) {
  constexpr const char* op = "knn_features";
  TORCH_CHECK(f.dim() == 2, op, ": features must be a 2-D [N, D] matrix, got ", f.dim(), "-D ",
              shape_str(f.sizes()));
  check_rerank_float(op, "features", f);
  TORCH_CHECK(kind != static_cast<int64_t>(RerankScores::kDistance), op,
              ": metric must be \"euclidean\" or \"cosine\" (features, not distances), got "
              "\"distance\"");
  const int64_t N = f.size(0);
  TORCH_CHECK(k >= 1 && k <= N, op, ": k must be in [1, N = ", N, "] (N: the rows of features), got ",
              k);
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= N, op,
              ": rows must satisfy 0 <= row_start <= row_end <= N = ", N, ", got ", row_start, " .. ",
              row_end);
  const int64_t B = row_end - row_start;
  TORCH_CHECK(kept.dim() == 2 && kept.size(0) == B && kept.size(1) <= N &&
                  kept.scalar_type() == f.scalar_type(),
              op, ": kept must be ", f.scalar_type(), " [", B, ", K <= ", N,
              "] (it receives the last K columns of M), got ", kept.scalar_type(), " ",
              shape_str(kept.sizes()));
  TORCH_CHECK(kept.size(1) <= 1 || kept.stride(1) == 1, op,
              ": kept must have contiguous rows (stride 1 along dim 1), got strides ",
              shape_str(kept.strides()));
  TORCH_CHECK(kept.device() == f.device(), op, ": kept must be on the device of features (",
              f.device(), "), got ", kept.device());
  if (kind == static_cast<int64_t>(RerankScores::kEuclidean)) {
    TORCH_CHECK(sq.dim() == 1 && sq.size(0) == N && sq.scalar_type() == f.scalar_type() &&
                    sq.device() == f.device(),
                op, ": sq must be ", f.scalar_type(), " [", N, "] on ", f.device(),
                " (the squared norms of the features) for metric \"euclidean\", got ",
                sq.scalar_type(), " ", shape_str(sq.sizes()), " on ", sq.device());
  }
}

inline void check_k_reciprocal_inputs(const at::Tensor& nn, const at::Tensor& nn_dist, int64_t k1,
                                      int64_t row_start, int64_t row_end) {
  constexpr const char* op = "k_reciprocal_sets";
  TORCH_CHECK(nn.dim() == 2 && nn.scalar_type() == at::kLong, op,
              ": nn must be an int64 [N, k] neighbour table, got ", nn.scalar_type(), " ",
              shape_str(nn.sizes()));
  TORCH_CHECK(nn_dist.sizes() == nn.sizes(), op, ": nn_dist must be ", shape_str(nn.sizes()),
              " like nn, got ", shape_str(nn_dist.sizes()));
  check_rerank_float(op, "nn_dist", nn_dist);
  TORCH_CHECK(nn_dist.device() == nn.device(), op, ": nn_dist must be on the device of nn (",
              nn.device(), "), got ", nn_dist.device());
  const int64_t N = nn.size(0);
  TORCH_CHECK(k1 >= 1, op, ": k1 must be >= 1, got ", k1);
  const int64_t ka = std::min<int64_t>(k1 + 1, N);
  TORCH_CHECK(nn.size(1) >= ka, op, ": nn must hold at least min(k1 + 1, N) = ", ka,
              " neighbours per row, got ", nn.size(1));
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= N, op,
              ": rows must satisfy 0 <= row_start <= row_end <= N = ", N, ", got ", row_start, " .. ",
              row_end);
}

inline void check_csr(const char* op, const char* name, const at::Tensor& ptr,
                      const at::Tensor& idx, const at::Tensor& val) {
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) >= 1 && ptr.scalar_type() == at::kLong, op, ": ", name,
              "_ptr must be int64 [rows + 1], got ", ptr.scalar_type(), " ", shape_str(ptr.sizes()));
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": ", name,
              " indices must be int64 1-D, got ", idx.scalar_type(), " ", shape_str(idx.sizes()));
  TORCH_CHECK(val.dim() == 1 && val.size(0) == idx.size(0), op, ": ", name, "_val must be [",
              idx.size(0), "] like its indices, got ", shape_str(val.sizes()));
  check_rerank_float(op, (std::string(name) + "_val").c_str(), val);
  TORCH_CHECK(ptr.device() == val.device() && idx.device() == val.device(), op, ": the ", name,
              " tensors must be on one device, got ", ptr.device(), ", ", idx.device(), ", ",
              val.device());
}

inline void check_query_expansion_inputs(const at::Tensor& ptr, const at::Tensor& col,
                                         const at::Tensor& val, const at::Tensor& nn, int64_t k2,
                                         int64_t row_start, int64_t row_end) {
  constexpr const char* op = "query_expansion";
  check_csr(op, "v", ptr, col, val);
  TORCH_CHECK(nn.dim() == 2 && nn.scalar_type() == at::kLong, op,
              ": nn must be an int64 [N, k] neighbour table, got ", nn.scalar_type(), " ",
              shape_str(nn.sizes()));
  const int64_t N = nn.size(0);
  TORCH_CHECK(ptr.size(0) == N + 1, op, ": v_ptr must be [N + 1] = [", N + 1,
              "] (one row per row of nn), got ", shape_str(ptr.sizes()));
  TORCH_CHECK(k2 >= 1 && k2 <= nn.size(1), op, ": k2 must be in [1, ", nn.size(1),
              "] (the neighbours per row of nn), got ", k2);
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= N, op,
              ": rows must satisfy 0 <= row_start <= row_end <= N = ", N, ", got ", row_start, " .. ",
              row_end);
  TORCH_CHECK(nn.device() == val.device(), op, ": nn must be on the device of v_val (", val.device(),
              "), got ", nn.device());
}

inline void check_jaccard_inputs(const at::Tensor& dist, const at::Tensor& q_ptr,
                                 const at::Tensor& q_col, const at::Tensor& q_val,
                                 const at::Tensor& g_ptr, const at::Tensor& g_col,
                                 const at::Tensor& g_val, int64_t num_columns, double lambda) {
  constexpr const char* op = "jaccard_rerank_";
  TORCH_CHECK(dist.dim() == 2, op, ": dist must be a 2-D [queries, gallery] tensor, got ",
              dist.dim(), "-D ", shape_str(dist.sizes()));
  check_rerank_float(op, "dist", dist);
  check_csr(op, "q", q_ptr, q_col, q_val);
  check_csr(op, "g", g_ptr, g_col, g_val);
  TORCH_CHECK(q_ptr.size(0) == dist.size(0) + 1, op, ": q_ptr must be [", dist.size(0) + 1,
              "] (one row per dist row), got ", shape_str(q_ptr.sizes()));
  TORCH_CHECK(g_ptr.size(0) == dist.size(1) + 1, op, ": g_ptr must be [", dist.size(1) + 1,
              "] (one row per dist column), got ", shape_str(g_ptr.sizes()));
  TORCH_CHECK(q_val.scalar_type() == dist.scalar_type() && g_val.scalar_type() == dist.scalar_type(),
              op, ": q_val and g_val must have the dtype of dist (", dist.scalar_type(), "), got ",
              q_val.scalar_type(), " and ", g_val.scalar_type());
  TORCH_CHECK(q_val.device() == dist.device() && g_val.device() == dist.device(), op,
              ": q and g must be on the device of dist (", dist.device(), "), got ", q_val.device(),
              " and ", g_val.device());
  TORCH_CHECK(num_columns >= 0, op, ": num_columns must be >= 0, got ", num_columns);
  TORCH_CHECK(lambda >= 0.0 && lambda <= 1.0, op, ": lambda_value must be in [0, 1], got ", lambda);
}

// What is wrong with row r of a CSR matrix of `rows` rows and nnz entries (0: nothing): its
// offsets (1: not from 0 to nnz, or decreasing), an index outside [0, bound) (2), or indices
// not strictly ascending within the row (3: the kernels rely on unique, sorted columns -- the
// CUDA jaccard kernel is race-free only when a gallery row holds each column once). Written
// once: the CPU check and the CUDA validation kernel both call it.
enum CsrFault : int { kCsrOk = 0, kCsrOffsets = 1, kCsrRange = 2, kCsrOrder = 3 };

C10_HOST_DEVICE inline int csr_row_fault(const int64_t* ptr, int64_t rows, int64_t r,
                                         const int64_t* idx, int64_t nnz, int64_t bound) {
  if (rows == 0) return (ptr[0] != 0 || nnz != 0) ? kCsrOffsets : kCsrOk;
  if ((r == 0 && ptr[0] != 0) || (r == rows - 1 && ptr[rows] != nnz)) return kCsrOffsets;
  const int64_t a = ptr[r], b = ptr[r + 1];
  if (a < 0 || b < a || b > nnz) return kCsrOffsets;
  for (int64_t e = a; e < b; ++e) {
    if (idx[e] < 0 || idx[e] >= bound) return kCsrRange;
    if (e > a && idx[e] <= idx[e - 1]) return kCsrOrder;
  }
  return kCsrOk;
}

// Whether a neighbour-table entry is a row index in [0, n).
C10_HOST_DEVICE inline bool table_entry_ok(int64_t v, int64_t n) { return v >= 0 && v < n; }

// CSR / inverted-index contents, checked on the host (the CUDA ops run csr_row_fault on the
// device and, only when it finds a fault, copy the tensors here for the message): offsets from
// 0 to nnz, non-decreasing; indices in [0, bound), strictly ascending within a row.
inline void check_csr_contents(const char* op, const char* name, const int64_t* ptr, int64_t rows,
                               const int64_t* idx, int64_t nnz, int64_t bound) {
  TORCH_CHECK(ptr[0] == 0 && ptr[rows] == nnz, op, ": ", name, "_ptr must run from 0 to ", nnz,
              " (the number of entries), got ", ptr[0], " .. ", ptr[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ptr[r + 1] >= ptr[r], op, ": ", name, "_ptr must be non-decreasing, got ", ptr[r],
                " then ", ptr[r + 1], " at row ", r);
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (csr_row_fault(ptr, rows, r, idx, nnz, bound) == kCsrOk) continue;
    for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
      TORCH_CHECK(idx[e] >= 0 && idx[e] < bound, op, ": ", name, " indices must be in [0, ", bound,
                  "), got ", idx[e], " at entry ", e);
      TORCH_CHECK(e == ptr[r] || idx[e] > idx[e - 1], op, ": ", name,
                  " indices must be strictly ascending within a row, got ", idx[e - 1], " then ",
                  idx[e], " in row ", r);
    }
  }
}

// The neighbour table's entries must be row indices in [0, N) (checked on the host; the CUDA
// ops test table_entry_ok on the device first).
inline void check_table_contents(const char* op, const int64_t* p, int64_t rows, int64_t ld) {
  for (int64_t e = 0; e < rows * ld; ++e) {
    TORCH_CHECK(table_entry_ok(p[e], rows), op, ": nn entries must be row indices in [0, ", rows,
                "), got ", p[e], " in row ", e / std::max<int64_t>(ld, 1));
  }
}

}  // namespace edaan_fast
