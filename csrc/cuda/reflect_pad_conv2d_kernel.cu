// CUDA entry points of reflect_pad_conv2d (checks: csrc/ops/reflect_pad_conv2d.h).
//
// On the GPU the op is reflection_pad2d + conv2d through ATen (cuDNN): for these shapes cuDNN
// is fast and the padded copy is small next to its traffic, so no kernel of our own is worth
// its upkeep. The backward is convolution_backward on the padded input, folded back through
// reflection_pad2d_backward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../ops/reflect_pad_conv2d.h"

namespace edaan_fast {
namespace {

at::Tensor reflect_pad_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias) {
  check_reflect_pad_conv2d_inputs("reflect_pad_conv2d", x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t p = (weight.size(2) - 1) / 2;
  const at::Tensor padded = at::reflection_pad2d(x, {p, p, p, p});
  return at::conv2d(padded, weight, bias).contiguous(suggest_memory_format(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_pad_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  check_reflect_pad_conv2d_inputs("_reflect_pad_conv2d_backward", x, weight, c10::nullopt);
  check_reflect_pad_conv2d_grad("_reflect_pad_conv2d_backward", grad, x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = suggest_memory_format(x);
  if (x.numel() == 0) {
    return {at::zeros(x.sizes(), x.options().memory_format(fmt)),
            at::zeros(weight.sizes(), weight.options()), grad.sum({0, 2, 3})};
  }
  const int64_t p = (weight.size(2) - 1) / 2;
  const at::Tensor padded = at::reflection_pad2d(x, {p, p, p, p});
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  auto [g_padded, g_w, g_b] = at::convolution_backward(
      grad.contiguous(fmt), padded, weight, at::IntArrayRef(bias_sizes), {1, 1}, {0, 0}, {1, 1},
      false, {0, 0}, 1, {true, true, true});
  at::Tensor g_x = at::reflection_pad2d_backward(g_padded, x, {p, p, p, p});
  return {g_x.contiguous(fmt), g_w.contiguous(), g_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, CUDA, m) {
  m.impl("reflect_pad_conv2d", &reflect_pad_conv2d_cuda);
  m.impl("_reflect_pad_conv2d_backward", &reflect_pad_conv2d_backward_cuda);
}

}  // namespace edaan_fast
