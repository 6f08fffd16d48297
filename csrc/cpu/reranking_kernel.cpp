// CPU kernels of the k-reciprocal re-ranking steps (math: csrc/ops/reranking.h).
//
// All four are parallel over rows (at::parallel_for) with thread-local scratch:
//   knn_lists         two passes over a row of the tile: the squared distances and their
//                     maximum, then the selection: a sorted list of k (value, index) pairs,
//                     with a test of 16 raw values at a time against a bound derived from the
//                     list's last value; only a block that may hold a better entry is looked at
//                     item by item (m / scale, exact comparison). Expected insertions per row:
//                     O(k log(N / k)); no sort of the row. The two passes are compiled for
//                     AVX-512, AVX2 and the baseline, picked at load time (target_clones).
//   k_reciprocal_sets R*(i) of each row into a padded scratch row, then packed as CSR.
//   query_expansion   counts, prefix sum, fill: a kq-way merge of sorted CSR rows per row.
//   jaccard_rerank_   a counting sort of the gallery rows by column (the inverted index), then
//                     per query a dense accumulator of G values and eq. 12 in place.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../ops/reranking.h"

namespace edaan_fast {
namespace {

using namespace rerank_math;

constexpr int64_t kBlock = 16;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EDAAN_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EDAAN_FAST_SIMD_CLONES
#endif
#define EDAAN_FAST_ALWAYS_INLINE inline __attribute__((always_inline))

// One row: m = squared distances, scale, kept columns, and the k smallest of m / scale.
template <typename scalar_t, int64_t kKind>
EDAAN_FAST_ALWAYS_INLINE void knn_row(const scalar_t* s, const scalar_t* cs, int64_t N, int64_t k,
                                      int64_t keep_from, scalar_t row_sq,
                                      at::opmath_type<scalar_t>* m,
                                      at::opmath_type<scalar_t>* vals, int64_t* idx,
                                      int64_t* out_i, scalar_t* out_d, scalar_t* scale,
                                      scalar_t* kept) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t rs = static_cast<acc_t>(row_sq);
  acc_t mx = acc_t(0);
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t j = 0; j < N; ++j) {
    const acc_t v = squared_distance<acc_t>(static_cast<acc_t>(s[j]), rs,
                                            kKind == 1 ? static_cast<acc_t>(cs[j]) : acc_t(0), kKind);
    m[j] = v;
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  const acc_t c = row_scale<acc_t>(nan ? std::numeric_limits<acc_t>::quiet_NaN() : mx);
  *scale = static_cast<scalar_t>(c);
  if (!std::isfinite(c)) {  // reported by the caller; the lists are placeholders
    for (int64_t t = 0; t < k; ++t) {
      out_i[t] = t;
      out_d[t] = static_cast<scalar_t>(NAN);
    }
    return;
  }
  for (int64_t j = keep_from; j < N; ++j) kept[j - keep_from] = static_cast<scalar_t>(m[j] / c);
  int64_t count = 0;
  for (int64_t j = 0; j < k; ++j) topk_insert<acc_t>(vals, idx, count, k, m[j] / c, j);
  acc_t bound = candidate_bound<acc_t>(vals[k - 1], c);
  int64_t j0 = k;
  for (; j0 + kBlock <= N; j0 += kBlock) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t t = 0; t < kBlock; ++t) any |= m[j0 + t] <= bound;
    if (!any) continue;
    for (int64_t j = j0; j < j0 + kBlock; ++j) {
      if (m[j] <= bound && topk_insert<acc_t>(vals, idx, count, k, m[j] / c, j)) {
        bound = candidate_bound<acc_t>(vals[k - 1], c);
      }
    }
  }
  for (int64_t j = j0; j < N; ++j) {
    if (m[j] <= bound && topk_insert<acc_t>(vals, idx, count, k, m[j] / c, j)) {
      bound = candidate_bound<acc_t>(vals[k - 1], c);
    }
  }
  for (int64_t t = 0; t < k; ++t) {
    out_i[t] = idx[t];
    out_d[t] = static_cast<scalar_t>(vals[t]);
  }
}

// Non-template entry points, one per (dtype, score kind), each compiled for several ISAs.
#define EDAAN_FAST_KNN_ROW(NAME, T, KIND)                                                        \
  EDAAN_FAST_SIMD_CLONES void NAME(const T* s, const T* cs, int64_t N, int64_t k,               \
                                   int64_t keep_from, T row_sq, at::opmath_type<T>* m,          \
                                   at::opmath_type<T>* vals, int64_t* idx, int64_t* out_i,       \
                                   T* out_d, T* scale, T* kept) {                                \
    knn_row<T, KIND>(s, cs, N, k, keep_from, row_sq, m, vals, idx, out_i, out_d, scale, kept);   \
  }
EDAAN_FAST_KNN_ROW(knn_row_f0, float, 0)
EDAAN_FAST_KNN_ROW(knn_row_f1, float, 1)
EDAAN_FAST_KNN_ROW(knn_row_f2, float, 2)
EDAAN_FAST_KNN_ROW(knn_row_d0, double, 0)
EDAAN_FAST_KNN_ROW(knn_row_d1, double, 1)
EDAAN_FAST_KNN_ROW(knn_row_d2, double, 2)
#undef EDAAN_FAST_KNN_ROW

template <typename T>
using KnnRowFn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, T, at::opmath_type<T>*,
                          at::opmath_type<T>*, int64_t*, int64_t*, T*, T*, T*);

template <typename T>
KnnRowFn<T> knn_row_fn(int64_t kind);
template <>
KnnRowFn<float> knn_row_fn<float>(int64_t kind) {
  return kind == 0 ? knn_row_f0 : kind == 1 ? knn_row_f1 : knn_row_f2;
}
template <>
KnnRowFn<double> knn_row_fn<double>(int64_t kind) {
  return kind == 0 ? knn_row_d0 : kind == 1 ? knn_row_d1 : knn_row_d2;
}

template <typename scalar_t>
void knn_rows(const at::Tensor& scores, const scalar_t* row_sq, const scalar_t* col_sq, int64_t k,
              int64_t kind, int64_t keep_from, int64_t* nn, scalar_t* nn_dist, scalar_t* scale,
              scalar_t* kept, int64_t kept_ld) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = scores.size(0), N = scores.size(1), ld = scores.stride(0);
  const scalar_t* base = scores.const_data_ptr<scalar_t>();
  const KnnRowFn<scalar_t> row_fn = knn_row_fn<scalar_t>(kind);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(N), vals(k);
    std::vector<int64_t> idx(k);
    for (int64_t r = begin; r < end; ++r) {
      row_fn(base + r * ld, col_sq, N, k, keep_from, kind == 1 ? row_sq[r] : scalar_t(0), m.data(),
             vals.data(), idx.data(), nn + r * k, nn_dist + r * k, scale + r, kept + r * kept_ld);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_lists_cpu(
    const at::Tensor& scores, const at::Tensor& row_sq, const at::Tensor& col_sq, int64_t k,
    c10::string_view metric, const at::Tensor& kept) {
  const int64_t kind = rerank_scores_kind(metric);
  check_knn_lists_inputs(scores, row_sq, col_sq, k, kind, kept);
  const at::Tensor s = scores.stride(1) == 1 ? scores : scores.contiguous();
  const int64_t B = s.size(0), N = s.size(1);
  at::Tensor nn = at::empty({B, k}, s.options().dtype(at::kLong));
  at::Tensor nn_dist = at::empty({B, k}, s.options());
  at::Tensor scale = at::empty({B}, s.options());
  const int64_t keep_from = N - kept.size(1);
  if (B == 0) return {nn, nn_dist, scale};
  const at::Tensor rsq = kind == 1 ? row_sq.contiguous() : row_sq;
  const at::Tensor csq = kind == 1 ? col_sq.contiguous() : col_sq;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "knn_lists_cpu", [&] {
    knn_rows<scalar_t>(s, kind == 1 ? rsq.const_data_ptr<scalar_t>() : nullptr,
                       kind == 1 ? csq.const_data_ptr<scalar_t>() : nullptr, k, kind, keep_from,
                       nn.mutable_data_ptr<int64_t>(), nn_dist.mutable_data_ptr<scalar_t>(),
                       scale.mutable_data_ptr<scalar_t>(), kept.mutable_data_ptr<scalar_t>(),
                       kept.stride(0));
  });
  return {nn, nn_dist, scale};
}

// --- _knn_lists_sliced: the CUDA kernel's decomposition of a row, run on the CPU ----------
// The same outputs as knn_lists (without kept columns) through the CUDA kernel's steps: the
// row's NaN-aware maximum, every thread's slice_topk over the columns t, t + T, ... (T =
// threads_per_row), each warp's merge of its 32 lists and the merge of the warps' lists, all
// with the header's functions (the CUDA warp merge is a shuffle argmin over the same heads under
// the same order: the same list). A test op: the CPU tests check that this equals knn_lists.

template <typename scalar_t>
void knn_rows_sliced(const at::Tensor& scores, const scalar_t* row_sq, const scalar_t* col_sq,
                     int64_t k, int64_t kind, int64_t threads, int64_t* nn, scalar_t* nn_dist,
                     scalar_t* scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = scores.size(0), N = scores.size(1), ld = scores.stride(0);
  const int64_t warps = threads / 32;
  const scalar_t* base = scores.const_data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> lane_v(threads * k), warp_v(warps * k);
    std::vector<int64_t> lane_i(threads * k), warp_i(warps * k), lane_n(threads), warp_n(warps),
        heads(std::max<int64_t>(warps, 32));
    for (int64_t r = begin; r < end; ++r) {
      const RawRow<scalar_t, acc_t> m_of{base + r * ld, col_sq,
                                         kind == 1 ? static_cast<acc_t>(row_sq[r]) : acc_t(0),
                                         kind};
      acc_t mx = acc_t(0);
      for (int64_t j = 0; j < N; ++j) mx = nan_max<acc_t>(mx, m_of(j));
      const acc_t c = row_scale<acc_t>(mx);
      scale[r] = static_cast<scalar_t>(c);
      if (!std::isfinite(c)) {
        for (int64_t t = 0; t < k; ++t) {
          nn[r * k + t] = t;
          nn_dist[r * k + t] = static_cast<scalar_t>(NAN);
        }
        continue;
      }
      for (int64_t t = 0; t < threads; ++t) {
        lane_n[t] = slice_topk<acc_t>(m_of, t, N, threads, c, k, lane_v.data() + t * k,
                                      lane_i.data() + t * k);
      }
      for (int64_t w = 0; w < warps; ++w) {
        warp_n[w] = merge_topk<acc_t, acc_t>(lane_v.data() + w * 32 * k,
                                             lane_i.data() + w * 32 * k, lane_n.data() + w * 32,
                                             32, k, k, heads.data(), warp_v.data() + w * k,
                                             warp_i.data() + w * k);
      }
      merge_topk<acc_t, scalar_t>(warp_v.data(), warp_i.data(), warp_n.data(), warps, k, k,
                                  heads.data(), nn_dist + r * k, nn + r * k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_lists_sliced_cpu(
    const at::Tensor& scores, const at::Tensor& row_sq, const at::Tensor& col_sq, int64_t k,
    c10::string_view metric, int64_t threads_per_row) {
  const int64_t kind = rerank_scores_kind(metric);
  const at::Tensor no_kept = at::empty({scores.dim() == 2 ? scores.size(0) : 0, 0}, scores.options());
  check_knn_lists_inputs(scores, row_sq, col_sq, k, kind, no_kept);
  TORCH_CHECK(threads_per_row >= 32 && threads_per_row % 32 == 0 &&
                  threads_per_row <= 32 * kKnnMaxRowWarps,
              "_knn_lists_sliced: threads_per_row must be a multiple of 32 in [32, ",
              32 * kKnnMaxRowWarps, "], got ", threads_per_row);
  const at::Tensor s = scores.stride(1) == 1 ? scores : scores.contiguous();
  const int64_t B = s.size(0);
  at::Tensor nn = at::empty({B, k}, s.options().dtype(at::kLong));
  at::Tensor nn_dist = at::empty({B, k}, s.options());
  at::Tensor scale = at::empty({B}, s.options());
  if (B == 0) return {nn, nn_dist, scale};
  const at::Tensor rsq = kind == 1 ? row_sq.contiguous() : row_sq;
  const at::Tensor csq = kind == 1 ? col_sq.contiguous() : col_sq;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "knn_lists_sliced_cpu", [&] {
    knn_rows_sliced<scalar_t>(s, kind == 1 ? rsq.const_data_ptr<scalar_t>() : nullptr,
                              kind == 1 ? csq.const_data_ptr<scalar_t>() : nullptr, k, kind,
                              threads_per_row, nn.mutable_data_ptr<int64_t>(),
                              nn_dist.mutable_data_ptr<scalar_t>(),
                              scale.mutable_data_ptr<scalar_t>());
  });
  return {nn, nn_dist, scale};
}

// --- knn_features: the fused k-NN from features -------------------------------------------
// Each thread owns a range of rows and walks the N columns in blocks of kFusedCols: one GEMM
// of kFusedRows x kFusedCols scores (256 KB for float32: with the GEMM's packed panels, about
// 600 KB, it stays in a 1 MB L2; 1,024 columns did not, and the selection pass ran from L3
// at 1.4x the GEMM's time instead of 1.25x), then, while the block
// is in cache, the squared distances, the running row maximum and the selection on raw values
// (a sorted list of k plus the few near-ties of raw_bound that may still overtake after the
// division by the scale). Nothing N x N, and no row of N scores, is ever written. A row's kept
// columns (query rows: M[q, Q:], the caller's output) receive the raw values and are divided by
// the scale once it is known. A row whose k-th M would be subnormal or zero, or whose near-ties
// overflow kSpillCap, is redone exactly by knn_row over its recomputed scores.

constexpr int64_t kFusedRows = 128;
constexpr int64_t kFusedCols = 512;
constexpr size_t kSpillCap = 4096;
constexpr size_t kSpillPrune = 16;  // pruned at sizes 16, 32, 64, ... (powers of two)

template <typename acc_t>
struct FusedRow {
  acc_t mx = acc_t(0);
  int nan = 0;
  int64_t count = 0;
  acc_t bound = std::numeric_limits<acc_t>::infinity();
  bool overflow = false;
  acc_t* vals = nullptr;
  int64_t* idx = nullptr;
  std::vector<std::pair<acc_t, int64_t>> spill;  // raw near-ties outside the list of k
};

template <typename acc_t>
void spill_push(FusedRow<acc_t>& row, acc_t v, int64_t j) {
  if (row.overflow) return;
  row.spill.emplace_back(v, j);
  // the bound only tightens: drop what it has passed (kept small: N rows hold one each)
  if (row.spill.size() < kSpillPrune || (row.spill.size() & (row.spill.size() - 1)) != 0) return;
  const acc_t bound = row.bound;
  row.spill.erase(std::remove_if(row.spill.begin(), row.spill.end(),
                                 [bound](const auto& e) { return !(e.first <= bound); }),
                  row.spill.end());
  if (row.spill.size() >= kSpillCap) {  // a flood of near-ties: redo the row exactly
    row.overflow = true;
    row.spill.clear();
    row.spill.shrink_to_fit();
  }
}

// Offers a raw value that passed the bound test to the row's list (and its near-ties).
template <typename acc_t>
void fused_offer(FusedRow<acc_t>& row, int64_t k, acc_t v, int64_t j) {
  const bool full = row.count == k;
  const acc_t ev = full ? row.vals[k - 1] : acc_t(0);
  const int64_t ei = full ? row.idx[k - 1] : 0;
  if (topk_insert<acc_t>(row.vals, row.idx, row.count, k, v, j)) {
    if (row.count == k) row.bound = raw_bound<acc_t>(row.vals[k - 1]);
    if (full && ev <= row.bound) spill_push(row, ev, ei);  // may still tie after the division
  } else {
    spill_push(row, v, j);
  }
}

// The bits of the 16 values s[0, 16) that are <= b (ordered: a NaN is never a candidate): one
// AVX-512 compare where the CPU has it (a plain loop does not vectorise into one), else a loop.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) uint32_t le_mask16_avx512(const float* s, float b) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_set1_ps(b), _CMP_LE_OQ);
}
__attribute__((target("avx512f"))) uint32_t le_mask16_avx512(const double* s, double b) {
  const __m512d v = _mm512_set1_pd(b);
  return static_cast<uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(s), v, _CMP_LE_OQ)) |
         (static_cast<uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(s + 8), v, _CMP_LE_OQ)) << 8);
}
const bool kHasAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}();
#else
template <typename T>
uint32_t le_mask16_avx512(const T*, T) { return 0; }
constexpr bool kHasAvx512 = false;
#endif

template <typename scalar_t>
inline uint32_t le_mask(const scalar_t* s, int64_t n, scalar_t b) {
  static_assert(kBlock == 16, "le_mask16_avx512 compares 16 values");
  if (n == kBlock && kHasAvx512) return le_mask16_avx512(s, b);
  uint32_t mask = 0;
  for (int64_t t = 0; t < n; ++t) mask |= static_cast<uint32_t>(s[t] <= b) << t;
  return mask;
}

// One row's segment of a score block: raw values in place, maximum, kept columns, selection.
template <typename scalar_t, int64_t kKind>
EDAAN_FAST_ALWAYS_INLINE void fused_segment(scalar_t* s, const scalar_t* cs, int64_t c0,
                                            int64_t cb, int64_t k, scalar_t rs, int64_t keep_from,
                                            scalar_t* kept_row, FusedRow<scalar_t>& row) {
  scalar_t mx = row.mx;
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t j = 0; j < cb; ++j) {
    const scalar_t v =
        squared_distance<scalar_t>(s[j], rs, kKind == 1 ? cs[c0 + j] : scalar_t(0), kKind);
    s[j] = v;
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  row.mx = mx;
  row.nan |= nan;
  if (kept_row != nullptr && c0 + cb > keep_from) {
    const int64_t from = std::max<int64_t>(keep_from, c0);
    std::copy(s + (from - c0), s + cb, kept_row + (from - keep_from));
  }
  // candidates 16 at a time: a bit mask of the values under the bound, then only its set bits
  // (no branch per value: near the top of a row, a block often holds one candidate)
  for (int64_t j0 = 0; j0 < cb; j0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, cb - j0);
    uint32_t mask = le_mask<scalar_t>(s + j0, n, row.bound);
    while (mask != 0) {
      const int64_t j = j0 + __builtin_ctz(mask);
      mask &= mask - 1;
      if (s[j] <= row.bound) fused_offer<scalar_t>(row, k, s[j], c0 + j);
    }
  }
}

#define EDAAN_FAST_FUSED_SEGMENT(NAME, T, KIND)                                                  \
  EDAAN_FAST_SIMD_CLONES void NAME(T* s, const T* cs, int64_t c0, int64_t cb, int64_t k, T rs,   \
                                   int64_t keep_from, T* kept_row, FusedRow<T>& row) {           \
    fused_segment<T, KIND>(s, cs, c0, cb, k, rs, keep_from, kept_row, row);                      \
  }
EDAAN_FAST_FUSED_SEGMENT(fused_segment_f1, float, 1)
EDAAN_FAST_FUSED_SEGMENT(fused_segment_f2, float, 2)
EDAAN_FAST_FUSED_SEGMENT(fused_segment_d1, double, 1)
EDAAN_FAST_FUSED_SEGMENT(fused_segment_d2, double, 2)
#undef EDAAN_FAST_FUSED_SEGMENT

template <typename T>
using FusedSegmentFn = void (*)(T*, const T*, int64_t, int64_t, int64_t, T, int64_t, T*,
                                FusedRow<T>&);
template <typename T>
FusedSegmentFn<T> fused_segment_fn(int64_t kind);
template <>
FusedSegmentFn<float> fused_segment_fn<float>(int64_t kind) {
  return kind == 1 ? fused_segment_f1 : fused_segment_f2;
}
template <>
FusedSegmentFn<double> fused_segment_fn<double>(int64_t kind) {
  return kind == 1 ? fused_segment_d1 : fused_segment_d2;
}

// The row's result from its state: scale, the k smallest (M, index), kept columns divided by
// the scale. Returns false when the row must be redone exactly (see above).
template <typename scalar_t>
bool fused_finish(FusedRow<scalar_t>& row, int64_t k, int64_t* out_i, scalar_t* out_d,
                  scalar_t* scale, scalar_t* kept_row, int64_t K) {
  const scalar_t c =
      row_scale<scalar_t>(row.nan ? std::numeric_limits<scalar_t>::quiet_NaN() : row.mx);
  *scale = c;
  if (!std::isfinite(c)) {  // reported by the caller; the lists are placeholders
    for (int64_t t = 0; t < k; ++t) {
      out_i[t] = t;
      out_d[t] = static_cast<scalar_t>(NAN);
    }
    return true;
  }
  if (row.overflow || row.count < k || !(row.vals[k - 1] / c >= std::numeric_limits<scalar_t>::min())) {
    return false;
  }
  std::vector<std::pair<scalar_t, int64_t>> cand;
  cand.reserve(k + row.spill.size());
  for (int64_t t = 0; t < k; ++t) cand.emplace_back(row.vals[t] / c, row.idx[t]);
  for (const auto& e : row.spill) {
    if (e.first <= row.bound) cand.emplace_back(e.first / c, e.second);
  }
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [](const auto& a, const auto& b) {
    return key_less<scalar_t>(a.first, a.second, b.first, b.second);
  });
  for (int64_t t = 0; t < k; ++t) {
    out_i[t] = cand[t].second;
    out_d[t] = cand[t].first;
  }
  for (int64_t j = 0; j < K; ++j) kept_row[j] = kept_row[j] / c;
  return true;
}

// Scores of rows [a0, a0 + rb) against columns [c0, c0 + cb) into out ([rb, cb], contiguous),
// float32 products in full float32 (through float64 when oneDNN may reduce them).
void fused_gemm(const at::Tensor& f, const at::Tensor& f64, int64_t a0, int64_t rb, int64_t c0,
                int64_t cb, at::Tensor& out) {
  if (f64.defined()) {
    out.copy_(at::mm(f64.narrow(0, a0, rb), f64.narrow(0, c0, cb).t()));
  } else {
    at::mm_out(out, f.narrow(0, a0, rb), f.narrow(0, c0, cb).t());
  }
}

template <typename scalar_t>
struct FusedArgs {
  at::Tensor f, f64;
  const scalar_t* sq;
  int64_t row_start, B, k, kind, keep_from, kept_ld;
  int64_t* nn;
  scalar_t* nn_dist;
  scalar_t* scale;
  scalar_t* kept;
};

// The rows [r0, r1) of the op (one thread's share): column blocks outermost, so each GEMM's
// column panel is read once per row block and the selection state of every row stays small.
template <typename scalar_t>
void fused_rows(const FusedArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  const int64_t N = a.f.size(0), k = a.k, K = N - a.keep_from, R = r1 - r0;
  std::vector<scalar_t> vals(R * k);
  std::vector<int64_t> idx(R * k);
  std::vector<FusedRow<scalar_t>> rows(R);
  for (int64_t r = 0; r < R; ++r) {
    rows[r].vals = vals.data() + r * k;
    rows[r].idx = idx.data() + r * k;
  }
  const auto segment = fused_segment_fn<scalar_t>(a.kind);
  at::Tensor buf = at::empty({kFusedRows * kFusedCols}, a.f.options());
  for (int64_t c0 = 0; c0 < N; c0 += kFusedCols) {
    const int64_t cb = std::min(kFusedCols, N - c0);
    for (int64_t b0 = r0; b0 < r1; b0 += kFusedRows) {
      const int64_t rb = std::min(kFusedRows, r1 - b0);
      at::Tensor out = buf.narrow(0, 0, rb * cb).view({rb, cb});
      fused_gemm(a.f, a.f64, a.row_start + b0, rb, c0, cb, out);
      scalar_t* s = out.mutable_data_ptr<scalar_t>();
      for (int64_t r = b0; r < b0 + rb; ++r) {
        const scalar_t rs = a.kind == 1 ? a.sq[a.row_start + r] : scalar_t(0);
        segment(s + (r - b0) * cb, a.sq, c0, cb, k, rs, a.keep_from,
                K > 0 ? a.kept + r * a.kept_ld : nullptr, rows[r - r0]);
      }
    }
  }
  std::vector<at::opmath_type<scalar_t>> m, lv;
  std::vector<int64_t> li;
  for (int64_t r = r0; r < r1; ++r) {
    if (fused_finish<scalar_t>(rows[r - r0], k, a.nn + r * k, a.nn_dist + r * k, a.scale + r,
                               a.kept + r * a.kept_ld, K)) {
      continue;
    }
    // the exact path: the row's N scores, then the two-pass selection of knn_lists
    m.resize(N), lv.resize(k), li.resize(k);
    at::Tensor srow = at::empty({1, N}, a.f.options());
    fused_gemm(a.f, a.f64, a.row_start + r, 1, 0, N, srow);
    const scalar_t rs = a.kind == 1 ? a.sq[a.row_start + r] : scalar_t(0);
    knn_row_fn<scalar_t>(a.kind)(srow.const_data_ptr<scalar_t>(), a.sq, N, k, a.keep_from, rs,
                                 m.data(), lv.data(), li.data(), a.nn + r * k,
                                 a.nn_dist + r * k, a.scale + r, a.kept + r * a.kept_ld);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_features_cpu(
    const at::Tensor& features, const at::Tensor& sq, int64_t row_start, int64_t row_end,
    int64_t k, c10::string_view metric, const at::Tensor& kept) {
  const int64_t kind = rerank_scores_kind(metric);
  check_knn_features_inputs(features, sq, row_start, row_end, k, kind, kept);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor f = features.contiguous();
  const int64_t B = row_end - row_start, N = f.size(0);
  at::Tensor nn = at::empty({B, k}, f.options().dtype(at::kLong));
  at::Tensor nn_dist = at::empty({B, k}, f.options());
  at::Tensor scale = at::empty({B}, f.options());
  if (B == 0) return {nn, nn_dist, scale};
  const at::Tensor s2 = kind == 1 ? sq.contiguous() : sq;
  const bool via_double = f.scalar_type() == at::kFloat && cpu_fp32_matmul_reduced();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "knn_features_cpu", [&] {
    FusedArgs<scalar_t> a{f, via_double ? f.to(at::kDouble) : at::Tensor(),
                          kind == 1 ? s2.const_data_ptr<scalar_t>() : nullptr, row_start, B, k,
                          kind, N - kept.size(1), kept.stride(0),
                          nn.mutable_data_ptr<int64_t>(), nn_dist.mutable_data_ptr<scalar_t>(),
                          scale.mutable_data_ptr<scalar_t>(), kept.mutable_data_ptr<scalar_t>()};
    // one contiguous share of rows per thread (whole row blocks)
    const int64_t blocks = (B + kFusedRows - 1) / kFusedRows;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      fused_rows<scalar_t>(a, b0 * kFusedRows, std::min(B, b1 * kFusedRows));
    });
  });
  return {nn, nn_dist, scale};
}

void check_table(const char* op, const at::Tensor& nn) {
  check_table_contents(op, nn.const_data_ptr<int64_t>(), nn.size(0), nn.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> k_reciprocal_sets_cpu(
    const at::Tensor& nn_in, const at::Tensor& nn_dist_in, int64_t k1, int64_t row_start,
    int64_t row_end) {
  check_k_reciprocal_inputs(nn_in, nn_dist_in, k1, row_start, row_end);
  const at::Tensor nn = nn_in.contiguous(), nn_dist = nn_dist_in.contiguous();
  check_table("k_reciprocal_sets", nn);
  const int64_t N = nn.size(0), ld = nn.size(1), B = row_end - row_start;
  const int64_t ka = std::min<int64_t>(k1 + 1, N), kh = std::min<int64_t>(half_size(k1), N);
  const int64_t width = expansion_width(ka, kh);
  at::Tensor ptr = at::zeros({B + 1}, nn.options());
  int64_t* p = ptr.mutable_data_ptr<int64_t>();
  const int64_t* t = nn.const_data_ptr<int64_t>();
  // R*(i) of every row into a padded scratch (width per row), sizes into ptr[1:]
  std::vector<int64_t> sets(static_cast<size_t>(B) * width);
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> half(kh);
    for (int64_t b = begin; b < end; ++b) {
      p[b + 1] = k_reciprocal_expansion(t, ld, row_start + b, ka, kh, sets.data() + b * width,
                                        half.data());
    }
  });
  for (int64_t b = 0; b < B; ++b) p[b + 1] += p[b];
  at::Tensor col = at::empty({p[B]}, nn.options());
  at::Tensor dist = at::empty({p[B]}, nn_dist.options());
  int64_t* oc = col.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(nn_dist.scalar_type(), "k_reciprocal_sets_cpu", [&] {
    const scalar_t* td = nn_dist.const_data_ptr<scalar_t>();
    scalar_t* od = dist.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t i = row_start + b;
        const int64_t* row = sets.data() + b * width;
        for (int64_t e = p[b]; e < p[b + 1]; ++e) {
          oc[e] = row[e - p[b]];
          od[e] = known_distance<scalar_t>(t + i * ld, td + i * ld, ld, oc[e]);
        }
      }
    });
  });
  return {ptr, col, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> query_expansion_cpu(
    const at::Tensor& ptr_in, const at::Tensor& col_in, const at::Tensor& val_in,
    const at::Tensor& nn_in, int64_t k2, int64_t row_start, int64_t row_end) {
  check_query_expansion_inputs(ptr_in, col_in, val_in, nn_in, k2, row_start, row_end);
  const at::Tensor ptr = ptr_in.contiguous(), col = col_in.contiguous(), val = val_in.contiguous();
  const at::Tensor nn = nn_in.contiguous();
  const int64_t N = nn.size(0), ld = nn.size(1), B = row_end - row_start;
  check_csr_contents("query_expansion", "v", ptr.const_data_ptr<int64_t>(), N,
                     col.const_data_ptr<int64_t>(), col.size(0), N);
  check_table("query_expansion", nn);
  at::Tensor out_ptr = at::zeros({B + 1}, ptr.options());
  int64_t* op = out_ptr.mutable_data_ptr<int64_t>();
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int64_t* c = col.const_data_ptr<int64_t>();
  const int64_t* t = nn.const_data_ptr<int64_t>();
  at::Tensor out_col, out_val;
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "query_expansion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = val.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cursor(k2);
      for (int64_t b = begin; b < end; ++b) {
        op[b + 1] = mean_of_rows<scalar_t, acc_t>(p, c, v, t + (row_start + b) * ld, k2,
                                                  cursor.data(), nullptr, nullptr);
      }
    });
    for (int64_t b = 0; b < B; ++b) op[b + 1] += op[b];
    out_col = at::empty({op[B]}, col.options());
    out_val = at::empty({op[B]}, val.options());
    int64_t* oc = out_col.mutable_data_ptr<int64_t>();
    scalar_t* ov = out_val.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cursor(k2);
      for (int64_t b = begin; b < end; ++b) {
        mean_of_rows<scalar_t, acc_t>(p, c, v, t + (row_start + b) * ld, k2, cursor.data(),
                                      oc + op[b], ov + op[b]);
      }
    });
  });
  return {out_ptr, out_col, out_val};
}

void jaccard_rerank_cpu(const at::Tensor& dist, const at::Tensor& q_ptr_in,
                        const at::Tensor& q_col_in, const at::Tensor& q_val_in,
                        const at::Tensor& g_ptr_in, const at::Tensor& g_col_in,
                        const at::Tensor& g_val_in, int64_t num_columns, double lambda) {
  check_jaccard_inputs(dist, q_ptr_in, q_col_in, q_val_in, g_ptr_in, g_col_in, g_val_in,
                       num_columns, lambda);
  const at::Tensor q_ptr = q_ptr_in.contiguous(), q_col = q_col_in.contiguous(),
                   q_val = q_val_in.contiguous();
  const at::Tensor g_ptr = g_ptr_in.contiguous(), g_col = g_col_in.contiguous(),
                   g_val = g_val_in.contiguous();
  const int64_t B = dist.size(0), G = dist.size(1), C = num_columns;
  const int64_t* qp = q_ptr.const_data_ptr<int64_t>();
  const int64_t* qc = q_col.const_data_ptr<int64_t>();
  const int64_t* gp = g_ptr.const_data_ptr<int64_t>();
  const int64_t* gc = g_col.const_data_ptr<int64_t>();
  const int64_t nnz_g = g_col.size(0);
  check_csr_contents("jaccard_rerank_", "q", qp, B, qc, q_col.size(0), C);
  check_csr_contents("jaccard_rerank_", "g", gp, G, gc, nnz_g, C);
  if (B == 0 || G == 0) return;
  // The inverted index: a counting sort of the gallery entries by column (rows ascending).
  std::vector<int64_t> col_ptr(C + 1, 0), inv_row(nnz_g);
  for (int64_t e = 0; e < nnz_g; ++e) ++col_ptr[gc[e] + 1];
  for (int64_t c = 0; c < C; ++c) col_ptr[c + 1] += col_ptr[c];
  std::vector<int64_t> fill(col_ptr.begin(), col_ptr.end() - 1), inv_pos(nnz_g);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t e = gp[g]; e < gp[g + 1]; ++e) {
      const int64_t at = fill[gc[e]]++;
      inv_row[at] = g;
      inv_pos[at] = e;
    }
  }
  at::Tensor d = dist.is_contiguous() ? dist : dist.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q_val.scalar_type(), "jaccard_rerank_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qv = q_val.const_data_ptr<scalar_t>();
    const scalar_t* gv_rows = g_val.const_data_ptr<scalar_t>();
    std::vector<scalar_t> inv_val(nnz_g);
    for (int64_t a = 0; a < nnz_g; ++a) inv_val[a] = gv_rows[inv_pos[a]];
    const int64_t* ir = inv_row.data();
    const int64_t* cp = col_ptr.data();
    const scalar_t* iv = inv_val.data();
    scalar_t* o = d.mutable_data_ptr<scalar_t>();
    const acc_t lam = static_cast<acc_t>(lambda);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(G);
      for (int64_t q = begin; q < end; ++q) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t e = qp[q]; e < qp[q + 1]; ++e) {
          const acc_t v = static_cast<acc_t>(qv[e]);
          const int64_t c = qc[e];
          for (int64_t f = cp[c]; f < cp[c + 1]; ++f) {
            const acc_t w = static_cast<acc_t>(iv[f]);
            acc[ir[f]] += v < w ? v : w;
          }
        }
        scalar_t* row = o + q * G;
        for (int64_t g = 0; g < G; ++g) {
          row[g] = static_cast<scalar_t>(
              reranked_distance<acc_t>(acc[g], static_cast<acc_t>(row[g]), lam));
        }
      }
    });
  });
  if (!d.is_same(dist)) dist.copy_(d);
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CPU, m) {
  m.impl("knn_lists", &knn_lists_cpu);
  m.impl("_knn_lists_sliced", &knn_lists_sliced_cpu);
  m.impl("knn_features", &knn_features_cpu);
  m.impl("k_reciprocal_sets", &k_reciprocal_sets_cpu);
  m.impl("query_expansion", &query_expansion_cpu);
  m.impl("jaccard_rerank_", &jaccard_rerank_cpu);
}

}  // namespace edaan_fast
