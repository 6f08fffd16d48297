// Shared helpers for every edaan_fast op: input-check utilities, the layout decision both
// backends (and the Python fake kernels) must agree on, and the full-float32 GEMM of the
// distance computations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <sstream>
#include <string>

namespace edaan_fast {

// "[2, 3, 4]" for error messages.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

// The memory format an op keeps for a 4-D activation: channels_last only when the tensor is
// channels_last-contiguous and not also plainly contiguous (C == 1 or H == W == 1 are both).
// Python mirror: edaan_fast/ops/_layout.py::suggest_memory_format.
inline at::MemoryFormat suggest_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() &&
      t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Whether float32 GEMMs on the CPU may run in reduced precision: oneDNN's bfloat16 or TF32
// matmul, which torch.set_float32_matmul_precision("medium"/"high") switches on where the CPU
// has the instructions (AVX512-BF16, AMX).
inline bool cpu_fp32_matmul_reduced() {
  const at::Float32Precision p = at::globalContext().float32Precision(
      at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return p == at::Float32Precision::BF16 || p == at::Float32Precision::TF32;
}

// a @ b^T with the products of float32 inputs in full float32, whatever the process allows
// for float32 GEMMs elsewhere. The distances |x|^2 + |y|^2 - 2 x.y are a difference of large
// terms: TF32 (10-bit mantissa) or bfloat16 products change which pair is hardest and how a
// gallery ranks, and the positives' distances (computed elementwise) would be ranked against
// reduced-precision negatives. On CUDA at::NoTF32Guard keeps cuBLAS in float32 (a
// thread-local switch); on a CPU whose oneDNN is allowed a reduced precision, the product is
// taken in float64 and rounded (there is no thread-local switch for oneDNN). Autocast is
// excluded for the call: a custom op has no autocast kernel of its own, so without the guard
// the at::mm inside would run under the caller's torch.autocast (bfloat16/float16 products).
inline at::Tensor full_fp32_mm_nt(const at::Tensor& a, const at::Tensor& b) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (a.scalar_type() != at::kFloat) return at::mm(a, b.t());
  if (a.is_cpu() && cpu_fp32_matmul_reduced()) {
    return at::mm(a.to(at::kDouble), b.to(at::kDouble).t()).to(at::kFloat);
  }
  const at::NoTF32Guard full_fp32;
  return at::mm(a, b.t());
}

}  // namespace edaan_fast
