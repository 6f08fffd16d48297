// CPU kernels of mask_blend / mask_background (math: csrc/ops/mask_blend.h).
//
// Planar (NCHW) inputs are walked in blocks of pixels: for each block every channel plane is
// streamed once with unit stride (the compiler vectorises these loops), and the mask gradient
// of the block is accumulated over the channels in a float buffer -- one pass over memory for
// the forward and one for the backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../ops/mask_blend.h"

namespace edaan_fast {
namespace {

using namespace mask_blend_math;

constexpr int64_t kBlock = 2048;             // pixels per planar block
constexpr int64_t kElementGrain = 1 << 15;   // elements per elementwise task

template <typename scalar_t, bool kHasFg>
void forward_cpu(const BlendInputs& in, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* fg = kHasFg ? in.fg.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bg = in.bg.const_data_ptr<scalar_t>();
  const scalar_t* mk = in.mask.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t C = in.c, HW = in.hw;

  switch (in.layout) {
    case BlendLayout::kElementwise: {
      at::parallel_for(0, out.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t f = kHasFg ? static_cast<acc_t>(fg[i]) : acc_t(0);
          o[i] = static_cast<scalar_t>(
              forward<acc_t>(f, static_cast<acc_t>(bg[i]), static_cast<acc_t>(mk[i])));
        }
      });
      break;
    }
    case BlendLayout::kPlanar: {
      const int64_t blocks = (HW + kBlock - 1) / kBlock;
      const int64_t grain = std::max<int64_t>(1, kElementGrain / (kBlock * C));
      at::parallel_for(0, in.n * blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / blocks;
          const int64_t p0 = (t % blocks) * kBlock;
          const int64_t len = std::min(kBlock, HW - p0);
          const scalar_t* m = mk + n * HW + p0;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t base = (n * C + c) * HW + p0;
            const scalar_t* b = bg + base;
            scalar_t* y = o + base;
            if constexpr (kHasFg) {
              const scalar_t* f = fg + base;
              for (int64_t p = 0; p < len; ++p) {
                y[p] = static_cast<scalar_t>(forward<acc_t>(
                    static_cast<acc_t>(f[p]), static_cast<acc_t>(b[p]), static_cast<acc_t>(m[p])));
              }
            } else {
              for (int64_t p = 0; p < len; ++p) {
                y[p] = static_cast<scalar_t>(forward<acc_t>(
                    acc_t(0), static_cast<acc_t>(b[p]), static_cast<acc_t>(m[p])));
              }
            }
          }
        }
      });
      break;
    }
    case BlendLayout::kInterleaved: {
      const int64_t grain = std::max<int64_t>(1, kElementGrain / C);
      at::parallel_for(0, in.n * HW, grain, [&](int64_t begin, int64_t end) {
        for (int64_t px = begin; px < end; ++px) {
          forward_pixel<scalar_t, acc_t, kHasFg>(kHasFg ? fg + px * C : nullptr, bg + px * C,
                                                 mk[px], o + px * C, C, 1);
        }
      });
      break;
    }
  }
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
  const int64_t C = in.c, HW = in.hw;

  switch (in.layout) {
    case BlendLayout::kElementwise: {
      at::parallel_for(0, grad_bg.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t f = kHasFg ? static_cast<acc_t>(fg[i]) : acc_t(0);
          acc_t g_fg, g_bg, g_m;
          backward<acc_t>(static_cast<acc_t>(g[i]), f, static_cast<acc_t>(bg[i]),
                          static_cast<acc_t>(mk[i]), g_fg, g_bg, g_m);
          if constexpr (kHasFg) gf[i] = static_cast<scalar_t>(g_fg);
          gb[i] = static_cast<scalar_t>(g_bg);
          gm[i] = static_cast<scalar_t>(g_m);
        }
      });
      break;
    }
    case BlendLayout::kPlanar: {
      const int64_t blocks = (HW + kBlock - 1) / kBlock;
      const int64_t grain = std::max<int64_t>(1, kElementGrain / (kBlock * C));
      at::parallel_for(0, in.n * blocks, grain, [&](int64_t begin, int64_t end) {
        acc_t acc[kBlock];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / blocks;
          const int64_t p0 = (t % blocks) * kBlock;
          const int64_t len = std::min(kBlock, HW - p0);
          const scalar_t* m = mk + n * HW + p0;
          std::fill(acc, acc + len, acc_t(0));
          for (int64_t c = 0; c < C; ++c) {
            const int64_t base = (n * C + c) * HW + p0;
            const scalar_t* gr = g + base;
            const scalar_t* b = bg + base;
            scalar_t* gbp = gb + base;
            if constexpr (kHasFg) {
              const scalar_t* f = fg + base;
              scalar_t* gfp = gf + base;
              for (int64_t p = 0; p < len; ++p) {
                acc_t g_fg, g_bg, g_m;
                backward<acc_t>(static_cast<acc_t>(gr[p]), static_cast<acc_t>(f[p]),
                                static_cast<acc_t>(b[p]), static_cast<acc_t>(m[p]), g_fg, g_bg,
                                g_m);
                gfp[p] = static_cast<scalar_t>(g_fg);
                gbp[p] = static_cast<scalar_t>(g_bg);
                acc[p] += g_m;
              }
            } else {
              for (int64_t p = 0; p < len; ++p) {
                acc_t g_fg, g_bg, g_m;
                backward<acc_t>(static_cast<acc_t>(gr[p]), acc_t(0), static_cast<acc_t>(b[p]),
                                static_cast<acc_t>(m[p]), g_fg, g_bg, g_m);
                gbp[p] = static_cast<scalar_t>(g_bg);
                acc[p] += g_m;
              }
            }
          }
          scalar_t* gmp = gm + n * HW + p0;
          for (int64_t p = 0; p < len; ++p) gmp[p] = static_cast<scalar_t>(acc[p]);
        }
      });
      break;
    }
    case BlendLayout::kInterleaved: {
      const int64_t grain = std::max<int64_t>(1, kElementGrain / C);
      at::parallel_for(0, in.n * HW, grain, [&](int64_t begin, int64_t end) {
        for (int64_t px = begin; px < end; ++px) {
          const int64_t o = px * C;
          gm[px] = static_cast<scalar_t>(backward_pixel<scalar_t, acc_t, kHasFg>(
              g + o, kHasFg ? fg + o : nullptr, bg + o, mk[px], kHasFg ? gf + o : nullptr,
              gb + o, C, 1));
        }
      });
      break;
    }
  }
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
  const auto opts = in.bg.options().memory_format(in.format);
  at::Tensor grad_fg = kHasFg ? at::empty(in.bg.sizes(), opts) : at::Tensor();
  at::Tensor grad_bg = at::empty(in.bg.sizes(), opts);
  at::Tensor grad_mask = at::empty(in.mask.sizes(), in.mask.options().memory_format(
                                                        in.layout == BlendLayout::kElementwise
                                                            ? in.format
                                                            : at::MemoryFormat::Contiguous));
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
