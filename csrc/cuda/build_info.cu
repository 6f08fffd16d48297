// The CUDA runtime version the CUDA kernels were compiled against (for _build_info).
#include <cuda_runtime_api.h>

namespace edaan_fast {
int cuda_runtime_build_version() { return CUDART_VERSION; }
}  // namespace edaan_fast
