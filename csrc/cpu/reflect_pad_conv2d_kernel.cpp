// CPU kernels of reflect_pad_conv2d (math and checks: csrc/ops/reflect_pad_conv2d.h).
//
// A direct convolution vectorised over the input channels. The input is read channels-last in
// the accumulation type (float for float32/bfloat16/float16, double for float64), its channels
// zero-filled up to a multiple of one 64-byte vector (16 floats / 8 doubles); the weight is
// rearranged to [C_out, k, k, C]. Every tap (i, j) of a pixel is then a vector load of the
// reflected source pixel's channels times a vector of weights, and the reflection is an index
// table per row and per column: no padded tensor. With C_out <= 4, C_out x (4 or 8) pixel
// accumulators stay in registers; each pixel's channel lanes are summed once at the end.
//
// forward:      parallel over the N * H output rows.
// grad_weight:  per output row and tap, a dot product over the row's pixels of the source
//               pixels with the output gradient, in registers; the rows are split into one
//               range per thread, each with its own partial sum (deterministic for a given
//               thread count), added at the end.
// grad_input:   the transposed convolution as a scatter of each output pixel's gradient over
//               the k x k (reflected) source pixels, parallel over the images.
// grad_bias:    the sum of the output gradient over N, H, W.
//
// Loops use GCC vector extensions (one 64-byte vector: a zmm register in the AVX-512 clone, two
// ymm in the AVX2 clone) and are compiled for AVX-512, AVX2 and baseline x86-64, picked at
// load time. Contraction into FMA is allowed here, unlike the rest of the library: this op
// does not promise the bitwise result of any other implementation, only the reference's value
// to rounding.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu_clones.h"
#include "../ops/reflect_pad_conv2d.h"

namespace edaan_fast {
namespace {

using reflect_conv_math::reflect_index;

// One 64-byte vector of T (V: a value; U: the same through an unaligned, aliasing pointer).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef double U __attribute__((vector_size(64), aligned(8), may_alias));
};

template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

#define LOADV(p) (*reinterpret_cast<const typename Vec<T>::U*>(p))
#define STOREV(p, v) (*reinterpret_cast<typename Vec<T>::U*>(p) = (v))

// Pixels per register block of the forward: C_out * kPixels accumulators (<= 16 of 32 zmm).
template <int CO>
constexpr int64_t kPixels = CO <= 2 ? 8 : 4;

// The problem as the kernels see it (accumulation type T).
struct Geometry {
  int64_t n, c, cp, h, w, co, k, p;
  const int32_t* rows;  // [H, k]: the source row of output row h, tap i
  const int32_t* cols;  // [W, k]: the source column of output column w, tap j
};

// Output rows [begin, end) of the forward. x: [N, H, W, CP]; wt: [CO, k, k, CP]; y: [N, CO, H, W].
template <typename T, int CO>
EDAAN_FAST_CPU_CLONES void forward_rows(const T* __restrict__ x, const T* __restrict__ wt,
                                        const T* __restrict__ bias, T* __restrict__ y,
                                        const Geometry g, int64_t begin, int64_t end) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = kLanes<T>;
  constexpr int64_t PB = kPixels<CO>;
  const int64_t H = g.h, W = g.w, CP = g.cp, k = g.k, p = g.p;
  const int64_t wstride = k * k * CP;  // one output channel of wt
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / H, h = t % H;
    const T* xn = x + n * H * W * CP;
    for (int64_t w0 = 0; w0 < W; w0 += PB) {
      // Pixels past the row's end repeat the last one (computed, not stored).
      const bool interior = w0 - p >= 0 && w0 + PB - 1 + p < W;
      V acc[PB][CO];
      for (int64_t b = 0; b < PB; ++b)
        for (int o = 0; o < CO; ++o) acc[b][o] = V{};
      for (int64_t i = 0; i < k; ++i) {
        const T* xr = xn + g.rows[h * k + i] * W * CP;
        for (int64_t j = 0; j < k; ++j) {
          const T* wij = wt + (i * k + j) * CP;
          int64_t off[PB];
          if (interior) {
            for (int64_t b = 0; b < PB; ++b) off[b] = (w0 + b + j - p) * CP;
          } else {
            for (int64_t b = 0; b < PB; ++b)
              off[b] = int64_t(g.cols[std::min(w0 + b, W - 1) * k + j]) * CP;
          }
          for (int64_t cb = 0; cb < CP; cb += L) {
            V wv[CO];
            for (int o = 0; o < CO; ++o) wv[o] = LOADV(wij + o * wstride + cb);
            for (int64_t b = 0; b < PB; ++b) {
              const V xv = LOADV(xr + off[b] + cb);
              for (int o = 0; o < CO; ++o) acc[b][o] += wv[o] * xv;
            }
          }
        }
      }
      const int64_t nb = std::min(PB, W - w0);
      for (int o = 0; o < CO; ++o) {
        T* yo = y + ((n * CO + o) * H + h) * W + w0;
        const T b0 = bias ? bias[o] : T(0);
        for (int64_t b = 0; b < nb; ++b) {
          // a tree over the lanes (halves added), not a chain of L dependent adds
          T lanes[L];
          __builtin_memcpy(lanes, &acc[b][o], sizeof(lanes));
          for (int64_t half = L / 2; half > 0; half /= 2)
            for (int64_t l = 0; l < half; ++l) lanes[l] += lanes[l + half];
          yo[b] = b0 + lanes[0];
        }
      }
    }
  }
}

// Output rows [begin, end) of grad_weight, added into gw [CO, k, k, CP]. gy: [N, CO, H, W].
template <typename T, int CO>
EDAAN_FAST_CPU_CLONES void grad_weight_rows(const T* __restrict__ x, const T* __restrict__ gy,
                                            T* __restrict__ gw, const Geometry g, int64_t begin,
                                            int64_t end) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = kLanes<T>;
  const int64_t H = g.h, W = g.w, CP = g.cp, k = g.k, p = g.p;
  const int64_t wstride = k * k * CP;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / H, h = t % H;
    const T* xn = x + n * H * W * CP;
    const T* go[CO];
    for (int o = 0; o < CO; ++o) go[o] = gy + ((n * CO + o) * H + h) * W;
    for (int64_t i = 0; i < k; ++i) {
      const T* xr = xn + g.rows[h * k + i] * W * CP;
      for (int64_t j = 0; j < k; ++j) {
        // Columns w whose source w + j - p lies inside the row need no table.
        const int64_t lo = std::max<int64_t>(0, p - j), hi = std::min<int64_t>(W, W + p - j);
        for (int64_t cb = 0; cb < CP; cb += L) {
          // four accumulators per output channel: four independent FMA chains even at C_out = 1
          V a0[CO], a1[CO], a2[CO], a3[CO];
          for (int o = 0; o < CO; ++o) a0[o] = a1[o] = a2[o] = a3[o] = V{};
          auto edge = [&](int64_t w) {
            const V xv = LOADV(xr + int64_t(g.cols[w * k + j]) * CP + cb);
            for (int o = 0; o < CO; ++o) a0[o] += go[o][w] * xv;
          };
          for (int64_t w = 0; w < lo; ++w) edge(w);
          const T* xs = xr + (j - p) * CP + cb;
          int64_t w = lo;
          for (; w + 3 < hi; w += 4) {
            const V x0 = LOADV(xs + w * CP), x1 = LOADV(xs + (w + 1) * CP);
            const V x2 = LOADV(xs + (w + 2) * CP), x3 = LOADV(xs + (w + 3) * CP);
            for (int o = 0; o < CO; ++o) {
              a0[o] += go[o][w] * x0;
              a1[o] += go[o][w + 1] * x1;
              a2[o] += go[o][w + 2] * x2;
              a3[o] += go[o][w + 3] * x3;
            }
          }
          for (; w < hi; ++w) {
            const V x0 = LOADV(xs + w * CP);
            for (int o = 0; o < CO; ++o) a1[o] += go[o][w] * x0;
          }
          for (int64_t e = std::max(hi, lo); e < W; ++e) edge(e);
          for (int o = 0; o < CO; ++o) {
            T* dst = gw + o * wstride + (i * k + j) * CP + cb;
            STOREV(dst, LOADV(dst) + ((a0[o] + a1[o]) + (a2[o] + a3[o])));
          }
        }
      }
    }
  }
}

// Images [begin, end) of grad_input, scattered into gx [N, H, W, CP] (zero on entry).
template <typename T, int CO>
EDAAN_FAST_CPU_CLONES void grad_input_images(const T* __restrict__ wt, const T* __restrict__ gy,
                                             T* __restrict__ gx, const Geometry g,
                                             int64_t begin, int64_t end) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = kLanes<T>;
  const int64_t H = g.h, W = g.w, CP = g.cp, k = g.k, p = g.p;
  const int64_t wstride = k * k * CP;
  for (int64_t n = begin; n < end; ++n) {
    T* gxn = gx + n * H * W * CP;
    for (int64_t h = 0; h < H; ++h) {
      const T* go[CO];
      for (int o = 0; o < CO; ++o) go[o] = gy + ((n * CO + o) * H + h) * W;
      for (int64_t i = 0; i < k; ++i) {
        T* xr = gxn + g.rows[h * k + i] * W * CP;
        for (int64_t j = 0; j < k; ++j) {
          const T* wij = wt + (i * k + j) * CP;
          const int64_t lo = std::max<int64_t>(0, p - j), hi = std::min<int64_t>(W, W + p - j);
          for (int64_t cb = 0; cb < CP; cb += L) {
            V wv[CO];
            for (int o = 0; o < CO; ++o) wv[o] = LOADV(wij + o * wstride + cb);
            auto put = [&](int64_t w, T* dst) {
              V v = LOADV(dst);
              for (int o = 0; o < CO; ++o) v += wv[o] * go[o][w];
              STOREV(dst, v);
            };
            for (int64_t w = 0; w < lo; ++w) put(w, xr + int64_t(g.cols[w * k + j]) * CP + cb);
            T* xs = xr + (j - p) * CP + cb;
            for (int64_t w = lo; w < hi; ++w) put(w, xs + w * CP);
            for (int64_t w = std::max(hi, lo); w < W; ++w)
              put(w, xr + int64_t(g.cols[w * k + j]) * CP + cb);
          }
        }
      }
    }
  }
}

#undef LOADV
#undef STOREV

template <typename F>
void dispatch_out_channels(int64_t co, const F& f) {
  switch (co) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}

// The inputs in the kernels' layout and accumulation type, and the reflection tables.
struct Prepared {
  at::Tensor x;   // [N, H, W, CP]
  at::Tensor wt;  // [CO, k, k, CP]
  std::vector<int32_t> rows, cols;
  Geometry g;
};

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// src [A, C, B1, B2] -> [A, B1, B2, CP] of `acc` with the channels past C zero (no copy when
// src already is that, e.g. a channels_last float32 x whose C is a multiple of the lanes).
at::Tensor channels_last_padded(const at::Tensor& src, int64_t cp, at::ScalarType acc) {
  const at::Tensor view = src.permute({0, 2, 3, 1});
  if (view.size(3) == cp && src.scalar_type() == acc && view.is_contiguous()) return view;
  at::Tensor out = cp == view.size(3)
                       ? at::empty({view.size(0), view.size(1), view.size(2), cp},
                                   src.options().dtype(acc))
                       : at::zeros({view.size(0), view.size(1), view.size(2), cp},
                                   src.options().dtype(acc));
  out.narrow(3, 0, view.size(3)).copy_(view);
  return out;
}

Prepared prepare(const at::Tensor& x, const at::Tensor& weight) {
  Prepared pr;
  const auto acc = acc_type(x.scalar_type());
  const int64_t lanes = acc == at::kDouble ? kLanes<double> : kLanes<float>;
  Geometry& g = pr.g;
  g.n = x.size(0);
  g.c = x.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.co = weight.size(0);
  g.k = weight.size(2);
  g.p = (g.k - 1) / 2;
  g.cp = (g.c + lanes - 1) / lanes * lanes;
  pr.x = channels_last_padded(x, g.cp, acc);
  pr.wt = channels_last_padded(weight, g.cp, acc);
  pr.rows.resize(g.h * g.k);
  pr.cols.resize(g.w * g.k);
  for (int64_t h = 0; h < g.h; ++h)
    for (int64_t i = 0; i < g.k; ++i)
      pr.rows[h * g.k + i] = static_cast<int32_t>(reflect_index(h + i - g.p, g.h));
  for (int64_t w = 0; w < g.w; ++w)
    for (int64_t j = 0; j < g.k; ++j)
      pr.cols[w * g.k + j] = static_cast<int32_t>(reflect_index(w + j - g.p, g.w));
  g.rows = pr.rows.data();
  g.cols = pr.cols.data();
  return pr;
}

// Work per task of at::parallel_for: about 64k vector FMAs.
int64_t grain_rows(const Geometry& g) {
  const int64_t per_row = std::max<int64_t>(1, g.w * g.k * g.k * g.co * (g.cp / 8 + 1));
  return std::max<int64_t>(1, (int64_t(1) << 16) / per_row);
}

at::Tensor reflect_pad_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  check_reflect_pad_conv2d_inputs("reflect_pad_conv2d", x, weight, bias);
  const auto fmt = suggest_memory_format(x);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor y = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)},
                           x.options().dtype(acc));
  if (y.numel() != 0) {
    const Prepared pr = prepare(x, weight);
    const bool has_bias = bias.has_value() && bias->defined();
    const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(acc, "reflect_pad_conv2d_cpu", [&] {
      const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
      dispatch_out_channels(pr.g.co, [&](auto co) {
        at::parallel_for(0, pr.g.n * pr.g.h, grain_rows(pr.g), [&](int64_t begin, int64_t end) {
          forward_rows<scalar_t, decltype(co)::value>(
              pr.x.const_data_ptr<scalar_t>(), pr.wt.const_data_ptr<scalar_t>(), bp,
              y.mutable_data_ptr<scalar_t>(), pr.g, begin, end);
        });
      });
    });
  }
  return y.to(x.scalar_type()).contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_pad_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  check_reflect_pad_conv2d_inputs("_reflect_pad_conv2d_backward", x, weight, c10::nullopt);
  check_reflect_pad_conv2d_grad("_reflect_pad_conv2d_backward", grad, x, weight);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const auto fmt = suggest_memory_format(x);
  const at::Tensor gy = grad.to(acc).contiguous();
  at::Tensor grad_bias = gy.sum({0, 2, 3}).to(dt);
  if (x.numel() == 0) {
    return {at::zeros(x.sizes(), x.options().memory_format(fmt)), at::zeros_like(weight, at::MemoryFormat::Contiguous),
            grad_bias};
  }
  const Prepared pr = prepare(x, weight);
  const Geometry& g = pr.g;
  at::Tensor gx = at::zeros({g.n, g.h, g.w, g.cp}, x.options().dtype(acc));
  const int64_t rows_total = g.n * g.h;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), rows_total / std::max<int64_t>(1, grain_rows(g))));
  at::Tensor gw_parts = at::zeros({parts, g.co, g.k, g.k, g.cp}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "reflect_pad_conv2d_backward_cpu", [&] {
    dispatch_out_channels(g.co, [&](auto co) {
      constexpr int CO = decltype(co)::value;
      const scalar_t* xp = pr.x.const_data_ptr<scalar_t>();
      const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
      scalar_t* gwp = gw_parts.mutable_data_ptr<scalar_t>();
      const int64_t part_size = g.co * g.k * g.k * g.cp;
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) {
          grad_weight_rows<scalar_t, CO>(xp, gyp, gwp + part * part_size, g,
                                         rows_total * part / parts,
                                         rows_total * (part + 1) / parts);
        }
      });
      at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
        grad_input_images<scalar_t, CO>(pr.wt.const_data_ptr<scalar_t>(), gyp,
                                        gx.mutable_data_ptr<scalar_t>(), g, begin, end);
      });
    });
  });
  at::Tensor grad_x = gx.narrow(3, 0, g.c).permute({0, 3, 1, 2}).to(dt).contiguous(fmt);
  at::Tensor grad_w =
      gw_parts.sum(0).narrow(3, 0, g.c).permute({0, 3, 1, 2}).to(dt).contiguous();
  return {grad_x, grad_w, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CPU, m) {
  m.impl("reflect_pad_conv2d", &reflect_pad_conv2d_cpu);
  m.impl("_reflect_pad_conv2d_backward", &reflect_pad_conv2d_backward_cpu);
}

}  // namespace edaan_fast
