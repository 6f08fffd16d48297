// CPU kernels of mask_blend / mask_background (math: csrc/ops/mask_blend.h).
//
// Planar (NCHW) inputs are walked in blocks of pixels: for each block every channel plane is
// streamed once with unit stride (the compiler vectorises these loops), and the mask gradient
// of the block is accumulated over the channels in a float buffer -- one pass over memory for
// the forward and one for the backward. channels_last inputs with a broadcast mask are walked
// pixel by pixel with the header's per-pixel functions.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu_clones.h"
#include "../ops/mask_blend.h"

namespace edaan_fast {
namespace {

using namespace mask_blend_math;

// Row loops: EDAAN_FAST_CPU_CLONES (cpu_clones.h), so the float16/bfloat16 conversions
// vectorise too.
constexpr int64_t kBlock = 2048;            // pixels per block
constexpr int64_t kElementGrain = 1 << 15;  // elements per parallel task

// y[p] = forward(f[p], b[p], m[p]) for one channel row of a block (f == nullptr: fg = 0).
template <typename scalar_t, bool kHasFg>
EDAAN_FAST_CPU_CLONES void forward_row(const scalar_t* __restrict__ f,
                                       const scalar_t* __restrict__ b,
                                       const scalar_t* __restrict__ m, scalar_t* __restrict__ y,
                                       int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = 0; p < len; ++p) {
    const acc_t fv = kHasFg ? static_cast<acc_t>(f[p]) : acc_t(0);
    y[p] = static_cast<scalar_t>(
        forward<acc_t>(fv, static_cast<acc_t>(b[p]), static_cast<acc_t>(m[p])));
  }
}

// One channel row of a block, backward: writes the fg/bg gradients, adds the mask gradient
// into acc (summed over the channels of the block by the caller's loop).
template <typename scalar_t, bool kHasFg>
EDAAN_FAST_CPU_CLONES void backward_row(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ f, const scalar_t* __restrict__ b,
    const scalar_t* __restrict__ m, scalar_t* __restrict__ gf, scalar_t* __restrict__ gb,
    at::opmath_type<scalar_t>* __restrict__ acc, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = 0; p < len; ++p) {
    const acc_t fv = kHasFg ? static_cast<acc_t>(f[p]) : acc_t(0);
    acc_t g_fg, g_bg, g_m;
    backward<acc_t>(static_cast<acc_t>(g[p]), fv, static_cast<acc_t>(b[p]),
                    static_cast<acc_t>(m[p]), g_fg, g_bg, g_m);
    if constexpr (kHasFg) gf[p] = static_cast<scalar_t>(g_fg);
    gb[p] = static_cast<scalar_t>(g_bg);
    acc[p] += g_m;
  }
}

template <typename scalar_t>
EDAAN_FAST_CPU_CLONES void store_row(const at::opmath_type<scalar_t>* __restrict__ acc,
                                     scalar_t* __restrict__ out, int64_t len) {
  for (int64_t p = 0; p < len; ++p) out[p] = static_cast<scalar_t>(acc[p]);
}

// The planar walk: n images of c channel planes of hw values sharing an [n, hw] mask. A full
// [N, C, H, W] mask in the inputs' own layout is the same walk with n = 1, c = 1, hw = numel.
struct PlanarWalk {
  int64_t n, c, hw;
};

PlanarWalk planar_walk(const BlendInputs& in) {
  if (in.layout == BlendLayout::kElementwise) return {1, 1, in.bg.numel()};
  return {in.n, in.c, in.hw};
}

template <typename F>
void for_each_block(const PlanarWalk& w, const F& body) {
  const int64_t blocks = (w.hw + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kElementGrain / (kBlock * w.c));
  at::parallel_for(0, w.n * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks;
      const int64_t p0 = (t % blocks) * kBlock;
      body(n, p0, std::min(kBlock, w.hw - p0));
    }
  });
}

template <typename scalar_t, bool kHasFg>
void forward_cpu(const BlendInputs& in, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* fg = kHasFg ? in.fg.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bg = in.bg.const_data_ptr<scalar_t>();
  const scalar_t* mk = in.mask.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  if (in.layout == BlendLayout::kInterleaved) {
    const int64_t C = in.c;
    at::parallel_for(0, in.n * in.hw, std::max<int64_t>(1, kElementGrain / C),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t px = begin; px < end; ++px) {
                         forward_pixel<scalar_t, acc_t, kHasFg>(
                             kHasFg ? fg + px * C : nullptr, bg + px * C, mk[px], o + px * C, C, 1);
                       }
                     });
    return;
  }
  const PlanarWalk w = planar_walk(in);
  for_each_block(w, [&](int64_t n, int64_t p0, int64_t len) {
    const scalar_t* m = mk + n * w.hw + p0;
    for (int64_t c = 0; c < w.c; ++c) {
      const int64_t base = (n * w.c + c) * w.hw + p0;
      forward_row<scalar_t, kHasFg>(kHasFg ? fg + base : nullptr, bg + base, m, o + base, len);
    }
  });
}

template <typename scalar_t, bool kHasFg>
void backward_cpu(const BlendInputs& in, const at::Tensor& grad, at::Tensor& grad_fg,
                  at::Tensor& grad_bg, at::Tensor& grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* fg = kHasFg ? in.fg.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bg = in.bg.const_data_ptr<scalar_t>();
  const scalar_t* mk = in.mask.const_data_ptr<scalar_t>();
  scalar_t* gf = kHasFg ? grad_fg.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = grad_bg.mutable_data_ptr<scalar_t>();
  scalar_t* gm = grad_mask.mutable_data_ptr<scalar_t>();

  if (in.layout == BlendLayout::kInterleaved) {
    const int64_t C = in.c;
    at::parallel_for(0, in.n * in.hw, std::max<int64_t>(1, kElementGrain / C),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t px = begin; px < end; ++px) {
                         const int64_t o = px * C;
                         gm[px] = static_cast<scalar_t>(backward_pixel<scalar_t, acc_t, kHasFg>(
                             g + o, kHasFg ? fg + o : nullptr, bg + o, mk[px],
                             kHasFg ? gf + o : nullptr, gb + o, C, 1));
                       }
                     });
    return;
  }
  const PlanarWalk w = planar_walk(in);
  for_each_block(w, [&](int64_t n, int64_t p0, int64_t len) {
    acc_t acc[kBlock];
    std::fill(acc, acc + len, acc_t(0));
    const scalar_t* m = mk + n * w.hw + p0;
    for (int64_t c = 0; c < w.c; ++c) {
      const int64_t base = (n * w.c + c) * w.hw + p0;
      backward_row<scalar_t, kHasFg>(g + base, kHasFg ? fg + base : nullptr, bg + base, m,
                                     kHasFg ? gf + base : nullptr, gb + base, acc, len);
    }
    store_row<scalar_t>(acc, gm + n * w.hw + p0, len);
  });
}

template <bool kHasFg>
at::Tensor blend_forward_cpu(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& mask) {
  const BlendInputs in = prepare_blend_inputs(fg, bg, mask);
  at::Tensor out = at::empty(in.bg.sizes(), in.bg.options().memory_format(in.format));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mask_blend_cpu",
                                  [&] { forward_cpu<scalar_t, kHasFg>(in, out); });
  return out;
}

template <bool kHasFg>
std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cpu(const at::Tensor& grad,
                                                                  const at::Tensor& fg,
                                                                  const at::Tensor& bg,
                                                                  const at::Tensor& mask) {
  const BlendInputs in = prepare_blend_inputs(fg, bg, mask);
  const at::Tensor g = grad.contiguous(in.format);
  const BlendGrads grads = allocate_blend_grads(in, kHasFg);
  at::Tensor grad_fg = grads.fg, grad_bg = grads.bg, grad_mask = grads.mask;
  if (grad_bg.numel() != 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad_bg.scalar_type(), "mask_blend_backward_cpu",
        [&] { backward_cpu<scalar_t, kHasFg>(in, g, grad_fg, grad_bg, grad_mask); });
  }
  return {grad_fg, grad_bg, grad_mask};
}

at::Tensor mask_blend_cpu(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& mask) {
  check_mask_blend_inputs("mask_blend", fg, bg, mask, "bg");
  return blend_forward_cpu<true>(fg, bg, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_blend_backward_cpu(const at::Tensor& grad,
                                                                       const at::Tensor& fg,
                                                                       const at::Tensor& bg,
                                                                       const at::Tensor& mask) {
  check_mask_blend_inputs("_mask_blend_backward", fg, bg, mask, "bg");
  check_mask_blend_grad("_mask_blend_backward", grad, bg);
  return blend_backward_cpu<true>(grad, fg, bg, mask);
}

at::Tensor mask_background_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_mask_blend_inputs("mask_background", at::Tensor(), x, mask, "x");
  return blend_forward_cpu<false>(at::Tensor(), x, mask);
}

std::tuple<at::Tensor, at::Tensor> mask_background_backward_cpu(const at::Tensor& grad,
                                                                const at::Tensor& x,
                                                                const at::Tensor& mask) {
  check_mask_blend_inputs("_mask_background_backward", at::Tensor(), x, mask, "x");
  check_mask_blend_grad("_mask_background_backward", grad, x);
  auto grads = blend_backward_cpu<false>(grad, at::Tensor(), x, mask);
  return {std::get<1>(grads), std::get<2>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CPU, m) {
  m.impl("mask_blend", &mask_blend_cpu);
  m.impl("_mask_blend_backward", &mask_blend_backward_cpu);
  m.impl("mask_background", &mask_background_cpu);
  m.impl("_mask_background_backward", &mask_background_backward_cpu);
}

}  // namespace edaan_fast
