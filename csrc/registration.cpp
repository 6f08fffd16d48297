// Every schema of the edaan_fast operator library, and the Python module stub.
//
// Backend files (csrc/cpu, csrc/cuda) hold only TORCH_LIBRARY_IMPL blocks; ops whose name
// starts with "_" exist to serve a backward.
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#ifdef EDAAN_FAST_PYTHON_MODULE
#include <Python.h>
#endif

namespace edaan_fast {

#ifdef EDAAN_FAST_WITH_CUDA
int cuda_runtime_build_version();  // csrc/cuda/build_info.cu
#endif

// What this library was compiled against, as JSON (read by edaan_fast/ops/_library.py).
std::string build_info() {
  std::ostringstream os;
  os << "{\"torch\": \"" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
     << TORCH_VERSION_PATCH << "\", ";
#ifdef EDAAN_FAST_WITH_CUDA
  const int v = cuda_runtime_build_version();
  os << "\"cuda\": \"" << v / 1000 << "." << (v % 1000) / 10 << "\", \"with_cuda\": true}";
#else
  os << "\"cuda\": null, \"with_cuda\": false}";
#endif
  return os.str();
}

TORCH_LIBRARY(edaan_fast, m) {
  m.def("_build_info() -> str", &build_info);

  // EDAAN eq. (1)/(2): out = mask * fg + (1 - mask) * bg, mask [N,1,H,W] or [N,C,H,W].
  m.def("mask_blend(Tensor fg, Tensor bg, Tensor mask) -> Tensor");
  m.def(
      "_mask_blend_backward(Tensor grad, Tensor fg, Tensor bg, Tensor mask) "
      "-> (Tensor, Tensor, Tensor)");
  // The discriminator's background-only input: (1 - mask) * x.
  m.def("mask_background(Tensor x, Tensor mask) -> Tensor");
  m.def("_mask_background_backward(Tensor grad, Tensor x, Tensor mask) -> (Tensor, Tensor)");

  // Sort-free ranking evaluation (evaluate_rank / rank_metrics): for one block of gallery
  // columns (a tile or a process's shard, first column = global index g_offset), the number
  // of valid negatives preceding each positive in the stable order on (distance, index).
  // Positives come sorted per query in CSR form (pos_offsets [Q+1]); counts add over blocks.
  m.def(
      "_rank_count_preceding(Tensor dist, Tensor q_pids, Tensor g_pids, Tensor pos_offsets, "
      "Tensor pos_dist, Tensor pos_gidx, int g_offset) -> Tensor");
}

}  // namespace edaan_fast

#ifdef EDAAN_FAST_PYTHON_MODULE
// `import edaan_fast._C` loads this library (and so runs the registrations above); the module
// itself is empty: the ops live in torch.ops.edaan_fast.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
