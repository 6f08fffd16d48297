// CUDA kernels of mask_blend / mask_background (math: csrc/ops/mask_blend.h).
//
// A broadcast mask is handled one thread per pixel: the thread reads the mask once, walks the
// C channel values (coalesced across neighbouring threads in NCHW) and, in the backward, sums
// the mask gradient over channels in registers -- one pass forward, one pass backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../ops/mask_blend.h"

namespace edaan_fast {
namespace {

using namespace mask_blend_math;

constexpr int kThreads = 256;

inline int64_t grid_for(int64_t work) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, bool kHasFg>
__global__ void forward_elementwise_kernel(const scalar_t* __restrict__ fg,
                                           const scalar_t* __restrict__ bg,
                                           const scalar_t* __restrict__ mask,
                                           scalar_t* __restrict__ out, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const acc_t f = kHasFg ? static_cast<acc_t>(fg[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(
        forward<acc_t>(f, static_cast<acc_t>(bg[i]), static_cast<acc_t>(mask[i])));
  }
}

template <typename scalar_t, bool kHasFg>
__global__ void backward_elementwise_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ fg,
    const scalar_t* __restrict__ bg, const scalar_t* __restrict__ mask,
    scalar_t* __restrict__ grad_fg, scalar_t* __restrict__ grad_bg,
    scalar_t* __restrict__ grad_mask, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const acc_t f = kHasFg ? static_cast<acc_t>(fg[i]) : acc_t(0);
    acc_t g_fg, g_bg, g_m;
    backward<acc_t>(static_cast<acc_t>(grad[i]), f, static_cast<acc_t>(bg[i]),
                    static_cast<acc_t>(mask[i]), g_fg, g_bg, g_m);
    if (kHasFg) grad_fg[i] = static_cast<scalar_t>(g_fg);
    grad_bg[i] = static_cast<scalar_t>(g_bg);
    grad_mask[i] = static_cast<scalar_t>(g_m);
  }
}

// Offset of channel 0 of pixel `px` (= n * HW + p) and the distance between channels.
struct PixelWalk {
  int64_t C, HW;
  bool planar;
  __device__ int64_t offset(int64_t px) const {
    return planar ? (px / HW) * C * HW + px % HW : px * C;
  }
  __device__ int64_t stride_c() const { return planar ? HW : 1; }
};

template <typename scalar_t, bool kHasFg>
__global__ void forward_pixel_kernel(const scalar_t* __restrict__ fg,
                                     const scalar_t* __restrict__ bg,
                                     const scalar_t* __restrict__ mask,
                                     scalar_t* __restrict__ out, PixelWalk walk, int64_t pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t px = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; px < pixels;
       px += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t o = walk.offset(px);
    forward_pixel<scalar_t, acc_t, kHasFg>(kHasFg ? fg + o : nullptr, bg + o, mask[px], out + o,
                                           walk.C, walk.stride_c());
  }
}

template <typename scalar_t, bool kHasFg>
__global__ void backward_pixel_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ fg,
    const scalar_t* __restrict__ bg, const scalar_t* __restrict__ mask,
    scalar_t* __restrict__ grad_fg, scalar_t* __restrict__ grad_bg,
    scalar_t* __restrict__ grad_mask, PixelWalk walk, int64_t pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t px = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; px < pixels;
       px += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t o = walk.offset(px);
    grad_mask[px] = static_cast<scalar_t>(backward_pixel<scalar_t, acc_t, kHasFg>(
        grad + o, kHasFg ? fg + o : nullptr, bg + o, mask[px], kHasFg ? grad_fg + o : nullptr,
        grad_bg + o, walk.C, walk.stride_c()));
  }
}

template <bool kHasFg>
at::Tensor blend_forward_cuda(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(bg.device());
  const BlendInputs in = prepare_blend_inputs(fg, bg, mask);
  at::Tensor out = at::empty(in.bg.sizes(), in.bg.options().memory_format(in.format));
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mask_blend_cuda", [&] {
    const scalar_t* f = kHasFg ? in.fg.const_data_ptr<scalar_t>() : nullptr;
    if (in.layout == BlendLayout::kElementwise) {
      forward_elementwise_kernel<scalar_t, kHasFg><<<grid_for(out.numel()), kThreads, 0, stream>>>(
          f, in.bg.const_data_ptr<scalar_t>(), in.mask.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), out.numel());
    } else {
      const PixelWalk walk{in.c, in.hw, in.layout == BlendLayout::kPlanar};
      const int64_t pixels = in.n * in.hw;
      forward_pixel_kernel<scalar_t, kHasFg><<<grid_for(pixels), kThreads, 0, stream>>>(
          f, in.bg.const_data_ptr<scalar_t>(), in.mask.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), walk, pixels);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <bool kHasFg>
std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cuda(const at::Tensor& grad,
                                                                   const at::Tensor& fg,
                                                                   const at::Tensor& bg,
                                                                   const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(bg.device());
  const BlendInputs in = prepare_blend_inputs(fg, bg, mask);
  const at::Tensor g = grad.contiguous(in.format);
  const BlendGrads grads = allocate_blend_grads(in, kHasFg);
  at::Tensor grad_fg = grads.fg, grad_bg = grads.bg, grad_mask = grads.mask;
  if (grad_bg.numel() == 0) return {grad_fg, grad_bg, grad_mask};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_bg.scalar_type(), "mask_blend_backward_cuda", [&] {
    const scalar_t* f = kHasFg ? in.fg.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gf = kHasFg ? grad_fg.mutable_data_ptr<scalar_t>() : nullptr;
    if (in.layout == BlendLayout::kElementwise) {
      backward_elementwise_kernel<scalar_t, kHasFg>
          <<<grid_for(grad_bg.numel()), kThreads, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), f, in.bg.const_data_ptr<scalar_t>(),
              in.mask.const_data_ptr<scalar_t>(), gf, grad_bg.mutable_data_ptr<scalar_t>(),
              grad_mask.mutable_data_ptr<scalar_t>(), grad_bg.numel());
    } else {
      const PixelWalk walk{in.c, in.hw, in.layout == BlendLayout::kPlanar};
      const int64_t pixels = in.n * in.hw;
      backward_pixel_kernel<scalar_t, kHasFg><<<grid_for(pixels), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), f, in.bg.const_data_ptr<scalar_t>(),
          in.mask.const_data_ptr<scalar_t>(), gf, grad_bg.mutable_data_ptr<scalar_t>(),
          grad_mask.mutable_data_ptr<scalar_t>(), walk, pixels);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_fg, grad_bg, grad_mask};
}

at::Tensor mask_blend_cuda(const at::Tensor& fg, const at::Tensor& bg, const at::Tensor& mask) {
  check_mask_blend_inputs("mask_blend", fg, bg, mask, "bg");
  return blend_forward_cuda<true>(fg, bg, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_blend_backward_cuda(const at::Tensor& grad,
                                                                        const at::Tensor& fg,
                                                                        const at::Tensor& bg,
                                                                        const at::Tensor& mask) {
  check_mask_blend_inputs("_mask_blend_backward", fg, bg, mask, "bg");
  check_mask_blend_grad("_mask_blend_backward", grad, bg);
  return blend_backward_cuda<true>(grad, fg, bg, mask);
}

at::Tensor mask_background_cuda(const at::Tensor& x, const at::Tensor& mask) {
  check_mask_blend_inputs("mask_background", at::Tensor(), x, mask, "x");
  return blend_forward_cuda<false>(at::Tensor(), x, mask);
}

std::tuple<at::Tensor, at::Tensor> mask_background_backward_cuda(const at::Tensor& grad,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& mask) {
  check_mask_blend_inputs("_mask_background_backward", at::Tensor(), x, mask, "x");
  check_mask_blend_grad("_mask_background_backward", grad, x);
  auto grads = blend_backward_cuda<false>(grad, at::Tensor(), x, mask);
  return {std::get<1>(grads), std::get<2>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CUDA, m) {
  m.impl("mask_blend", &mask_blend_cuda);
  m.impl("_mask_blend_backward", &mask_blend_backward_cuda);
  m.impl("mask_background", &mask_background_cuda);
  m.impl("_mask_background_backward", &mask_background_backward_cuda);
}

}  // namespace edaan_fast
