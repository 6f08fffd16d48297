// Autograd of the differentiable ops, in C++ (dispatch key Autograd), and their autocast rule.
//
// Each forward runs the op below the autograd key and saves what its one-pass backward op
// needs; the backward calls that op. Written here rather than with Python's
// torch.library.register_autograd because the Python path costs ~0.1 ms of interpreter work per
// forward+backward, more than the kernels themselves for a 64 x 128 metric-loss batch. The
// backward ops are ordinary custom ops with fake kernels, so torch.compile traces through this
// code as it does through any other autograd kernel.

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace edaan_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// --- mask_blend / mask_background ---------------------------------------------------------

using BlendSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BlendBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BackgroundSig = at::Tensor(const at::Tensor&, const at::Tensor&);
using BackgroundBackwardSig =
    std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);

class MaskBlendFunction : public torch::autograd::Function<MaskBlendFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& fg, const at::Tensor& bg,
                            const at::Tensor& mask) {
    static const auto op = find_op<BlendSig>("edaan_fast::mask_blend");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({fg, bg, mask});
    return op.call(fg, bg, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<BlendBackwardSig>("edaan_fast::_mask_blend_backward");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [g_fg, g_bg, g_mask] = op.call(grads[0], saved[0], saved[1], saved[2]);
    return {g_fg, g_bg, g_mask};
  }
};

class MaskBackgroundFunction : public torch::autograd::Function<MaskBackgroundFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask) {
    static const auto op = find_op<BackgroundSig>("edaan_fast::mask_background");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, mask});
    return op.call(x, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<BackgroundBackwardSig>("edaan_fast::_mask_background_backward");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [g_x, g_mask] = op.call(grads[0], saved[0], saved[1]);
    return {g_x, g_mask};
  }
};

at::Tensor mask_blend_autograd(const at::Tensor& fg, const at::Tensor& bg,
                               const at::Tensor& mask) {
  return MaskBlendFunction::apply(fg, bg, mask);
}

at::Tensor mask_background_autograd(const at::Tensor& x, const at::Tensor& mask) {
  return MaskBackgroundFunction::apply(x, mask);
}

// --- reflect_pad_conv2d ------------------------------------------------------------------

using ReflectConvSig =
    at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
using ReflectConvBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&);

class ReflectPadConv2dFunction : public torch::autograd::Function<ReflectPadConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    static const auto op = find_op<ReflectConvSig>("edaan_fast::reflect_pad_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return op.call(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<ReflectConvBackwardSig>("edaan_fast::_reflect_pad_conv2d_backward");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [g_x, g_w, g_b] = op.call(grads[0], saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? g_x : at::Tensor(),
            ctx->needs_input_grad(1) ? g_w : at::Tensor(),
            ctx->saved_data["has_bias"].toBool() ? g_b : at::Tensor()};
  }
};

at::Tensor reflect_pad_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias) {
  return ReflectPadConv2dFunction::apply(x, weight, bias);
}

// --- _metric_loss_forward (triplet_loss / quartet_loss) ------------------------------------

using MetricForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, c10::string_view, c10::string_view);
using MetricBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, c10::string_view);

class MetricLossFunction : public torch::autograd::Function<MetricLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& emb,
                               const at::Tensor& labels, double margin, c10::string_view metric,
                               c10::string_view loss) {
    static const auto op = find_op<MetricForwardSig>("edaan_fast::_metric_loss_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, idx, pair_dist, coef] = op.call(emb, labels, margin, metric, loss);
    ctx->mark_non_differentiable({idx, pair_dist, coef});
    ctx->save_for_backward({emb, idx, pair_dist, coef});
    ctx->saved_data["metric"] = std::string(metric);
    return {value, idx, pair_dist, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<MetricBackwardSig>("edaan_fast::_metric_loss_backward");
    at::Tensor grad_emb;
    if (grads[0].defined() && ctx->needs_input_grad(0)) {
      const auto saved = ctx->get_saved_variables();
      const std::string metric = ctx->saved_data["metric"].toStringRef();
      grad_emb = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], metric);
    }
    return {grad_emb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> metric_loss_forward_autograd(
    const at::Tensor& emb, const at::Tensor& labels, double margin, c10::string_view metric,
    c10::string_view loss) {
  auto out = MetricLossFunction::apply(emb, labels, margin, metric, loss);
  return {out[0], out[1], out[2], out[3]};
}

// --- autocast --------------------------------------------------------------------------
//
// The metric losses take float16/bfloat16 embeddings as they come and compute in float32
// internally (the loss is a float32 reduction either way). Under torch.autocast the kernels'
// own at::mm would otherwise be autocast to the low precision and hand a bfloat16 Gram matrix
// to a float32 pass, so these kernels run with the autocast keys excluded: the op sees its
// inputs unchanged and no ATen call inside it is re-cast.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> metric_loss_forward_autocast(
    const at::Tensor& emb, const at::Tensor& labels, double margin, c10::string_view metric,
    c10::string_view loss) {
  static const auto op = find_op<MetricForwardSig>("edaan_fast::_metric_loss_forward");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return op.call(emb, labels, margin, metric, loss);
}

at::Tensor metric_loss_backward_autocast(const at::Tensor& grad, const at::Tensor& emb,
                                         const at::Tensor& idx, const at::Tensor& pair_dist,
                                         const at::Tensor& coef, c10::string_view metric) {
  static const auto op = find_op<MetricBackwardSig>("edaan_fast::_metric_loss_backward");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return op.call(grad, emb, idx, pair_dist, coef, metric);
}

// reflect_pad_conv2d follows conv2d's autocast rule (a lower-precision op): under autocast,
// float32 x, weight and bias are cast to the autocast dtype (bfloat16 on the CPU), the kernel
// accumulates in float32 and returns the autocast dtype; float64 stays float64.
template <c10::DeviceType kDevice>
at::Tensor reflect_pad_conv2d_autocast(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias) {
  static const auto op = find_op<ReflectConvSig>("edaan_fast::reflect_pad_conv2d");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dtype, x, kDevice),
                 at::autocast::cached_cast(dtype, weight, kDevice),
                 at::autocast::cached_cast(dtype, bias, kDevice));
}

}  // namespace

TORCH_LIBRARY_IMPL(edaan_fast, AutocastCPU, m) {
  m.impl("reflect_pad_conv2d", &reflect_pad_conv2d_autocast<c10::DeviceType::CPU>);
  m.impl("_metric_loss_forward", &metric_loss_forward_autocast);
  m.impl("_metric_loss_backward", &metric_loss_backward_autocast);
}

TORCH_LIBRARY_IMPL(edaan_fast, AutocastCUDA, m) {
  m.impl("reflect_pad_conv2d", &reflect_pad_conv2d_autocast<c10::DeviceType::CUDA>);
  m.impl("_metric_loss_forward", &metric_loss_forward_autocast);
  m.impl("_metric_loss_backward", &metric_loss_backward_autocast);
}

TORCH_LIBRARY_IMPL(edaan_fast, Autograd, m) {
  m.impl("mask_blend", &mask_blend_autograd);
  m.impl("mask_background", &mask_background_autograd);
  m.impl("_metric_loss_forward", &metric_loss_forward_autograd);
  m.impl("reflect_pad_conv2d", &reflect_pad_conv2d_autograd);
}

}  // namespace edaan_fast
