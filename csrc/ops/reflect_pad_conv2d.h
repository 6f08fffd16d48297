// reflect_pad_conv2d: a k x k convolution (k odd, stride 1) over the reflection-padded input,
// for few output channels -- the 7x7 output layers of the generator (image channels, then
// tanh) and of the attention net (1 channel, then sigmoid).
//
//   y[n, o, h, w] = b[o] + sum_{c, i, j} W[o, c, i, j] * x[n, c, r(h + i - p, H), r(w + j - p, W)]
//
// with p = (k - 1) / 2 and r the reflection of an index into [0, size) without repeating the
// edge (ReflectionPad2d / F.pad(mode="reflect")): r(-1) = 1, r(size) = size - 2. It equals
// conv2d(reflection_pad2d(x, p), W, b); the padded tensor is never made on the CPU.
// x: [N, C, H, W]; weight: [C_out, C, k, k] with 1 <= C_out <= 4; bias: [C_out] or none.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "common.h"

namespace edaan_fast {

// The CPU kernel keeps C_out x (pixels in flight) vector accumulators in registers.
constexpr int64_t kReflectConvMaxOutChannels = 4;

namespace reflect_conv_math {

// The reflected index of t in [-(size - 1), 2 * size - 2] into [0, size): edges not repeated.
C10_HOST_DEVICE inline int64_t reflect_index(int64_t t, int64_t size) {
  if (t < 0) return -t;
  if (t >= size) return 2 * (size - 1) - t;
  return t;
}

}  // namespace reflect_conv_math

// The one input check of the forward and the backward; `op` names the op in messages.
inline void check_reflect_pad_conv2d_inputs(const char* op, const at::Tensor& x,
                                            const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D [N, C, H, W] tensor, got ", x.dim(), "-D ",
              shape_str(x.sizes()));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              op, ": x must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              op, ": weight must be [C_out, C, k, k] with C = ", x.size(1),
              " (the channels of x) and k odd, got ", shape_str(weight.sizes()));
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(0) <= kReflectConvMaxOutChannels, op,
              ": weight must have 1 to ", kReflectConvMaxOutChannels,
              " output channels (a narrow output layer; use conv2d for more), got ",
              weight.size(0), " in ", shape_str(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight must have the dtype of x (", dt,
              "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on the device of x (",
              x.device(), "), got ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be [C_out] = [", weight.size(0), "], got ",
                shape_str(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == dt, op, ": bias must have the dtype of x (", dt,
                "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on the device of x (",
                x.device(), "), got ", bias->device());
  }
  const int64_t p = (weight.size(2) - 1) / 2;
  TORCH_CHECK(p < x.size(2) && p < x.size(3), op, ": reflection padding ", p, " (kernel ",
              weight.size(2), ") must be smaller than H and W of x, got x ",
              shape_str(x.sizes()));
}

// The backward's incoming gradient must match the forward output [N, C_out, H, W].
inline void check_reflect_pad_conv2d_grad(const char* op, const at::Tensor& grad,
                                          const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) &&
                  grad.size(2) == x.size(2) && grad.size(3) == x.size(3),
              op, ": grad must be [N, C_out, H, W] = [", x.size(0), ", ", weight.size(0), ", ",
              x.size(2), ", ", x.size(3), "], got ", shape_str(grad.sizes()));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have the dtype of x (",
              x.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), op, ": grad must be on ", x.device(), ", got ",
              grad.device());
}

}  // namespace edaan_fast
