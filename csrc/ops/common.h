// Shared helpers for every edaan_fast op: input-check utilities and the layout decision
// both backends (and the Python fake kernels) must agree on.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace edaan_fast
