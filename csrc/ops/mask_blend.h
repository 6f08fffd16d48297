// mask_blend / mask_background: the math of EDAAN eq. (1)/(2), written once.
//
//   mask_blend(fg, bg, mask)   = mask * fg + (1 - mask) * bg
//   mask_background(x, mask)   = (1 - mask) * x            (= mask_blend(0, x, mask))
//
// fg, bg: [N, C, H, W]; mask: [N, 1, H, W] (broadcast over channels) or [N, C, H, W].
// Both backends (csrc/cpu, csrc/cuda) call the functions below, so the CPU tests run the
// very arithmetic the GPU runs. Accumulation is in acc_t = at::opmath_type<scalar_t>.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "common.h"

namespace edaan_fast {
namespace mask_blend_math {

// Per element, forward. Written as m*fg + (1-m)*bg (not bg + m*(fg-bg)) so that m == 1 gives
// fg exactly and m == 0 gives bg exactly.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t forward(acc_t fg, acc_t bg, acc_t m) {
  return m * fg + (acc_t(1) - m) * bg;
}

// Per element, backward: d/dfg = m*g, d/dbg = (1-m)*g, d/dm = g*(fg-bg) (summed over the
// channels by the caller when the mask is broadcast).
template <typename acc_t>
C10_HOST_DEVICE inline void backward(
    acc_t g, acc_t fg, acc_t bg, acc_t m, acc_t& g_fg, acc_t& g_bg, acc_t& g_m) {
  g_fg = m * g;
  g_bg = (acc_t(1) - m) * g;
  g_m = g * (fg - bg);
}

// One pixel of a broadcast mask: C channel values at `stride_c` apart share one mask value.
// kHasFg == false is mask_background (fg == 0, no fg pointer).
template <typename scalar_t, typename acc_t, bool kHasFg>
C10_HOST_DEVICE inline void forward_pixel(
    const scalar_t* fg, const scalar_t* bg, scalar_t mask, scalar_t* out, int64_t channels,
    int64_t stride_c) {
  const acc_t m = static_cast<acc_t>(mask);
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t i = c * stride_c;
    const acc_t f = kHasFg ? static_cast<acc_t>(fg[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(forward<acc_t>(f, static_cast<acc_t>(bg[i]), m));
  }
}

// One pixel of a broadcast mask, backward: writes the channel gradients and returns the mask
// gradient summed over the channels (in acc_t).
template <typename scalar_t, typename acc_t, bool kHasFg>
C10_HOST_DEVICE inline acc_t backward_pixel(
    const scalar_t* grad, const scalar_t* fg, const scalar_t* bg, scalar_t mask,
    scalar_t* grad_fg, scalar_t* grad_bg, int64_t channels, int64_t stride_c) {
  const acc_t m = static_cast<acc_t>(mask);
  acc_t g_m_sum = acc_t(0);
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t i = c * stride_c;
    const acc_t f = kHasFg ? static_cast<acc_t>(fg[i]) : acc_t(0);
    acc_t g_fg, g_bg, g_m;
    backward<acc_t>(static_cast<acc_t>(grad[i]), f, static_cast<acc_t>(bg[i]), m, g_fg, g_bg,
                    g_m);
    if (kHasFg) grad_fg[i] = static_cast<scalar_t>(g_fg);
    grad_bg[i] = static_cast<scalar_t>(g_bg);
    g_m_sum += g_m;
  }
  return g_m_sum;
}

}  // namespace mask_blend_math

// How the kernels walk the tensors (decided once, on the host).
enum class BlendLayout {
  kPlanar,       // NCHW contiguous, mask [N,1,H,W]: channel planes of H*W values
  kInterleaved,  // channels_last, mask [N,1,H,W]: C values per pixel
  kElementwise,  // mask [N,C,H,W] in the same layout: plain elementwise
};

// Inputs made dense in one memory format, and the walk that fits them.
struct BlendInputs {
  at::Tensor fg;  // undefined for mask_background
  at::Tensor bg;
  at::Tensor mask;
  at::MemoryFormat format;
  BlendLayout layout;
  int64_t n, c, hw;
};

// The one input check of both ops; `op` names the op in messages, `fg` may be undefined
// (mask_background), `bg_name` is "bg" or "x".
inline void check_mask_blend_inputs(
    const char* op, const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& mask,
    const char* bg_name) {
  TORCH_CHECK(bg.dim() == 4, op, ": ", bg_name, " must be a 4-D [N, C, H, W] tensor, got ",
              bg.dim(), "-D ", shape_str(bg.sizes()));
  TORCH_CHECK(at::isFloatingType(bg.scalar_type()), op, ": ", bg_name,
              " must be floating point (float32, float16, bfloat16 or float64), got ",
              bg.scalar_type());
  if (fg.defined()) {
    TORCH_CHECK(fg.sizes() == bg.sizes(), op, ": fg and bg must have the same shape, got fg ",
                shape_str(fg.sizes()), " and bg ", shape_str(bg.sizes()));
    TORCH_CHECK(fg.scalar_type() == bg.scalar_type(), op,
                ": fg and bg must have the same dtype, got fg ", fg.scalar_type(), " and bg ",
                bg.scalar_type());
    TORCH_CHECK(fg.device() == bg.device(), op,
                ": fg and bg must be on the same device, got fg on ", fg.device(),
                " and bg on ", bg.device());
  }
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == bg.size(0) && mask.size(2) == bg.size(2) &&
                  mask.size(3) == bg.size(3) && (mask.size(1) == 1 || mask.size(1) == bg.size(1)),
              op, ": mask must be [N, 1, H, W] or [N, C, H, W] matching ", bg_name, " ",
              shape_str(bg.sizes()), ", got ", shape_str(mask.sizes()));
  TORCH_CHECK(mask.scalar_type() == bg.scalar_type(), op, ": mask must have the dtype of ",
              bg_name, " (", bg.scalar_type(), "), got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == bg.device(), op, ": mask must be on the device of ", bg_name,
              " (", bg.device(), "), got ", mask.device());
}

// The backward's incoming gradient must match the forward output.
inline void check_mask_blend_grad(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == like.sizes() && grad.scalar_type() == like.scalar_type(), op,
              ": grad must match the forward output ", shape_str(like.sizes()), " ",
              like.scalar_type(), ", got ", shape_str(grad.sizes()), " ", grad.scalar_type());
  TORCH_CHECK(grad.device() == like.device(), op, ": grad must be on ", like.device(), ", got ",
              grad.device());
}

// Makes every input dense in the memory format of bg and picks the walk.
inline BlendInputs prepare_blend_inputs(const at::Tensor& fg, const at::Tensor& bg,
                                        const at::Tensor& mask) {
  BlendInputs in;
  in.format = suggest_memory_format(bg);
  in.bg = bg.contiguous(in.format);
  if (fg.defined()) in.fg = fg.contiguous(in.format);
  in.n = bg.size(0);
  in.c = bg.size(1);
  in.hw = bg.size(2) * bg.size(3);
  const bool broadcast = mask.size(1) == 1 && in.c != 1;
  if (broadcast) {
    // [N,1,H,W] has the same memory order in both formats.
    in.mask = mask.contiguous();
    in.layout = in.format == at::MemoryFormat::ChannelsLast ? BlendLayout::kInterleaved
                                                             : BlendLayout::kPlanar;
  } else {
    in.mask = mask.contiguous(in.format);
    in.layout = BlendLayout::kElementwise;
  }
  return in;
}

// The backward's outputs, allocated once for both backends: grad_fg (undefined without fg),
// grad_bg in the inputs' memory format, grad_mask in the mask's. With nothing to walk (C == 0
// or an empty batch) the kernels do not run and the mask gradient, a sum over zero channels,
// is zeros.
struct BlendGrads {
  at::Tensor fg, bg, mask;
};

inline BlendGrads allocate_blend_grads(const BlendInputs& in, bool has_fg) {
  const auto opts = in.bg.options().memory_format(in.format);
  BlendGrads g;
  if (has_fg) g.fg = at::empty(in.bg.sizes(), opts);
  g.bg = at::empty(in.bg.sizes(), opts);
  const auto mask_opts = in.mask.options().memory_format(
      in.layout == BlendLayout::kElementwise ? in.format : at::MemoryFormat::Contiguous);
  g.mask = g.bg.numel() == 0 ? at::zeros(in.mask.sizes(), mask_opts)
                             : at::empty(in.mask.sizes(), mask_opts);
  return g;
}

}  // namespace edaan_fast
