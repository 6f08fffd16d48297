// Every schema of the edaan_fast operator library, and the Python module stub.
//
// Backend files (csrc/cpu, csrc/cuda) hold only TORCH_LIBRARY_IMPL blocks; ops whose name
// starts with "_" exist to serve a backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <tuple>

#ifdef EDAAN_FAST_PYTHON_MODULE
#include <Python.h>
#endif

namespace edaan_fast {

#ifdef EDAAN_FAST_WITH_CUDA
int cuda_runtime_build_version();  // csrc/cuda/build_info.cu
#endif

// The GPU architectures the CUDA kernels were compiled for, as a JSON string ("8.0;9.0+PTX":
// a cubin per entry, "+PTX" also PTX), or null when the build did not say. setup.py and
// CMakeLists.txt pass it as EDAAN_FAST_CUDA_ARCH_LIST=8.0,9.0+PTX (commas: no quoting needed).
#define EDAAN_FAST_STR_(...) #__VA_ARGS__
#define EDAAN_FAST_STR(...) EDAAN_FAST_STR_(__VA_ARGS__)
inline std::string cuda_arch_list_json() {
#ifdef EDAAN_FAST_CUDA_ARCH_LIST
  std::string arch = EDAAN_FAST_STR(EDAAN_FAST_CUDA_ARCH_LIST);
  for (char& c : arch) {
    if (c == ',') c = ';';
  }
  return "\"" + arch + "\"";
#else
  return "null";
#endif
}

// What this library was compiled against, as JSON (read by edaan_fast/ops/_library.py).
std::string build_info() {
  std::ostringstream os;
  os << "{\"torch\": \"" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
     << TORCH_VERSION_PATCH << "\", ";
#ifdef EDAAN_FAST_WITH_CUDA
  const int v = cuda_runtime_build_version();
  os << "\"cuda\": \"" << v / 1000 << "." << (v % 1000) / 10 << "\", \"with_cuda\": true, ";
  os << "\"cuda_arch_list\": " << cuda_arch_list_json() << "}";
#else
  os << "\"cuda\": null, \"with_cuda\": false, \"cuda_arch_list\": null}";
#endif
  return os.str();
}

// triplet_loss / quartet_loss: thin composites over _metric_loss_forward, which carries the
// autograd (edaan_fast/ops/metric_losses.py) and saves the picked pairs for the backward.
using MetricLossForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, c10::string_view, c10::string_view);

at::Tensor call_metric_loss_forward(const at::Tensor& emb, const at::Tensor& labels, double margin,
                                    c10::string_view metric, c10::string_view loss) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("edaan_fast::_metric_loss_forward", "")
                             .typed<MetricLossForward>();
  return std::get<0>(op.call(emb, labels, margin, metric, loss));
}

at::Tensor triplet_loss(const at::Tensor& emb, const at::Tensor& labels, double margin,
                        c10::string_view metric, bool soft_margin) {
  return call_metric_loss_forward(emb, labels, margin, metric,
                                  soft_margin ? "soft_triplet" : "triplet");
}

at::Tensor quartet_loss(const at::Tensor& emb, const at::Tensor& labels, double margin,
                        c10::string_view metric) {
  return call_metric_loss_forward(emb, labels, margin, metric, "quartet");
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

  // The 7x7 output layers of the generator and the attention net: conv2d over the
  // reflection-padded input (pad (k - 1) / 2, k odd, stride 1) to 1..4 output channels, without
  // a padded copy (csrc/ops/reflect_pad_conv2d.h). The backward returns (grad_x, grad_weight,
  // grad_bias).
  m.def("reflect_pad_conv2d(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "_reflect_pad_conv2d_backward(Tensor grad, Tensor x, Tensor weight) "
      "-> (Tensor, Tensor, Tensor)");

  // EDAAN eq. (6)/(7): batch-hard mining and the triplet / quartet losses.
  // batch_hard_mining: per anchor the hardest positive p, hardest negative n and second
  // negative m (closest to n from a third identity), their distances (dist's dtype; 0 where the
  // index is -1) and valid (int8: 0 no term, 1 triplet term, 2 quartet term).
  m.def(
      "batch_hard_mining(Tensor dist, Tensor labels) -> (Tensor d_ap, Tensor d_an, Tensor d_mn, "
      "Tensor p, Tensor n, Tensor m, Tensor valid)");
  m.def(
      "triplet_loss(Tensor emb, Tensor labels, float margin=0.3, str metric=\"euclidean\", "
      "bool soft_margin=False) -> Tensor",
      &triplet_loss);
  m.def(
      "quartet_loss(Tensor emb, Tensor labels, float margin=0.3, str metric=\"euclidean\") "
      "-> Tensor",
      &quartet_loss);
  // loss in {"triplet", "soft_triplet", "quartet"}; returns the loss and, for the backward, the
  // picked pairs idx [B, 3] = (p, n, m), their distances [B, 3] and dL/dD coefficients [B, 3].
  m.def(
      "_metric_loss_forward(Tensor emb, Tensor labels, float margin, str metric, str loss) "
      "-> (Tensor loss, Tensor idx, Tensor pair_dist, Tensor coef)");
  m.def(
      "_metric_loss_backward(Tensor grad, Tensor emb, Tensor idx, Tensor pair_dist, "
      "Tensor coef, str metric) -> Tensor");

  // Sort-free ranking evaluation (evaluate_rank / rank_metrics): for one block of gallery
  // columns (a tile or a process's shard, first column = global index g_offset), the number
  // of valid negatives preceding each positive in the stable order on (distance, index).
  // Positives come sorted per query in CSR form (pos_offsets [Q+1]); counts add over blocks.
  // Phase (a): sorts each query's positives (CSR) by (distance, global index).
  m.def(
      "_rank_sort_positives(Tensor pos_offsets, Tensor pos_dist, Tensor pos_gidx) "
      "-> (Tensor, Tensor)");
  // Phase (b), once per block of columns; phase (c), CMC/AP/INP from the ranks, is in Python.
  m.def(
      "_rank_count_preceding(Tensor dist, Tensor q_pids, Tensor g_pids, Tensor pos_offsets, "
      "Tensor pos_dist, Tensor pos_gidx, int g_offset) -> Tensor");

  // a [Q, D] @ b [G, D]^T with float32 products in full float32 whatever TF32 / bfloat16
  // setting the process has for float32 GEMMs: the distance tiles of rank_metrics_from_features.
  m.def("_distance_gemm(Tensor a, Tensor b) -> Tensor");

  // k-reciprocal re-ranking (Zhong et al., CVPR 2017), math in csrc/ops/reranking.h.
  // knn_lists: one tile of rows of the N-column score matrix (distances, or dot products of
  // features for metric "euclidean"/"cosine") -> per row the k smallest entries of the
  // row-normalised squared distance M in the stable order on (value, index), their M values and
  // the row scale (max of the squared row; NaN/inf when the row holds one). kept [B, K] receives
  // M's last K columns (the query rows' gallery part, which eq. 12 mixes back in; K may be 0).
  m.def(
      "knn_lists(Tensor scores, Tensor row_sq, Tensor col_sq, int k, str metric, Tensor(a!) kept) "
      "-> (Tensor nn, Tensor nn_dist, Tensor scale)");
  // _knn_lists_sliced (CPU, for tests): knn_lists without kept columns computed the way the CUDA
  // kernel splits a row: threads_per_row column slices, each slice's k best, merged per warp of
  // 32 slices and then across the warps (the header's slice_topk and merge_topk).
  m.def(
      "_knn_lists_sliced(Tensor scores, Tensor row_sq, Tensor col_sq, int k, str metric, "
      "int threads_per_row) -> (Tensor nn, Tensor nn_dist, Tensor scale)");
  // knn_features: knn_lists fused with the GEMM that makes the scores, for rows
  // [row_start, row_end) of features [N, D] (metric "euclidean" with sq [N] the squared norms,
  // or "cosine" of unit rows) against all N rows: the scores are made and consumed a
  // cache-sized block at a time, nothing N x N (nor a row tile of it) is written. Same outputs
  // as knn_lists over those rows' scores; float32 products in full float32.
  m.def(
      "knn_features(Tensor features, Tensor sq, int row_start, int row_end, int k, str metric, "
      "Tensor(a!) kept) -> (Tensor nn, Tensor nn_dist, Tensor scale)");
  // R*(i) (eq. 6) of rows [row_start, row_end) from the neighbour table, as CSR: ptr [B + 1],
  // sorted column indices, and their M values where the table knows them (NaN where not).
  m.def(
      "k_reciprocal_sets(Tensor nn, Tensor nn_dist, int k1, int row_start, int row_end) "
      "-> (Tensor ptr, Tensor col, Tensor dist)");
  // Local query expansion (eq. 11) of rows [row_start, row_end): mean of V (CSR) over the first
  // k2 neighbours of each row; CSR out.
  m.def(
      "query_expansion(Tensor v_ptr, Tensor v_col, Tensor v_val, Tensor nn, int k2, int row_start, "
      "int row_end) -> (Tensor ptr, Tensor col, Tensor val)");
  // Jaccard distance (eq. 10) of query rows of V (CSR) to every gallery row of V (CSR), through
  // the inverted index of the gallery rows; dist [B, G] holds M[q, Q + g] and becomes eq. 12:
  // d_J (1 - lambda) + M lambda.
  m.def(
      "jaccard_rerank_(Tensor(a!) dist, Tensor q_ptr, Tensor q_col, Tensor q_val, Tensor g_ptr, "
      "Tensor g_col, Tensor g_val, int num_columns, float lambda_value) -> ()");
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
