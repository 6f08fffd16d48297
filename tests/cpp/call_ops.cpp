// Calls the fused ops of libedaan_fast_ops.so from C++ through the dispatcher, as a libtorch
// program would, and checks the results against values worked out by hand. Exits 0 when every
// check holds, 1 otherwise (and prints what differs).
//
// Built with the library: cmake -S . -B build-cmake -G Ninja -DEDAAN_FAST_BUILD_TESTS=ON,
// then build-cmake/tests/cpp/edaan_fast_call_ops (tests/test_cmake_library.py runs it).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string_view>
#include <vector>

namespace {

int failures = 0;

void expect_values(const char* what, const at::Tensor& got, const std::vector<double>& want,
                   double tol) {
  const at::Tensor flat = got.detach().to(at::kDouble).contiguous().reshape({-1});
  if (flat.numel() != static_cast<int64_t>(want.size())) {
    std::printf("FAIL %s: %lld values, want %zu\n", what, static_cast<long long>(flat.numel()),
                want.size());
    ++failures;
    return;
  }
  const double* v = flat.const_data_ptr<double>();
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::abs(v[i] - want[i]) <= tol)) {
      std::printf("FAIL %s[%zu] = %.9g, want %.9g\n", what, i, v[i], want[i]);
      ++failures;
      return;
    }
  }
  std::printf("ok   %s\n", what);
}

at::Tensor floats(const std::vector<float>& v, at::IntArrayRef shape) {
  return at::tensor(v, at::kFloat).reshape(shape).contiguous();
}

void check_mask_blend() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("edaan_fast::mask_blend", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  // [N=1, C=2, H=1, W=2]; the mask [1, 1, 1, 2] is broadcast over the two channels.
  at::Tensor fg = floats({1, 2, 3, 4}, {1, 2, 1, 2}).requires_grad_(true);
  at::Tensor bg = floats({10, 20, 30, 40}, {1, 2, 1, 2}).requires_grad_(true);
  at::Tensor mask = floats({0.25f, 1.0f}, {1, 1, 1, 2}).requires_grad_(true);
  at::Tensor out = op.call(fg, bg, mask);
  // out = mask * fg + (1 - mask) * bg:
  //   channel 0: 0.25 * 1 + 0.75 * 10 = 7.75,   1 * 2 + 0 * 20 = 2
  //   channel 1: 0.25 * 3 + 0.75 * 30 = 23.25,  1 * 4 + 0 * 40 = 4
  expect_values("mask_blend forward", out, {7.75, 2, 23.25, 4}, 0);
  // d(sum out)/d mask = sum over channels of (fg - bg):
  //   w0: (1 - 10) + (3 - 30) = -36,  w1: (2 - 20) + (4 - 40) = -54
  // d/d fg = mask (per channel), d/d bg = 1 - mask.
  out.sum().backward();
  expect_values("mask_blend grad mask", mask.grad(), {-36, -54}, 0);
  expect_values("mask_blend grad fg", fg.grad(), {0.25, 1, 0.25, 1}, 0);
  expect_values("mask_blend grad bg", bg.grad(), {0.75, 0, 0.75, 0}, 0);
}

void check_quartet_loss() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("edaan_fast::quartet_loss", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                  c10::string_view)>();
  // Five points on a line (second coordinate 0): x = 0, 4 (id 0), 1, 3 (id 1), 6 (id 2).
  // Distances: d01 = 4, d02 = 1, d03 = 3, d04 = 6, d12 = 3, d13 = 1, d14 = 2, d23 = 2,
  // d24 = 5, d34 = 3. Margin 0.5; term = max(d_ap - d_an + d_ap - d_mn + 0.5, 0):
  //   anchor 0: p = 1 (4), n = 2 (1), m = 4 (d24 = 5): 4 - 1 + 4 - 5 + 0.5 = 2.5
  //   anchor 1: p = 0 (4), n = 3 (1), m = 4 (d34 = 3): 4 - 1 + 4 - 3 + 0.5 = 4.5
  //   anchor 2: p = 3 (2), n = 0 (1), m = 4 (d04 = 6): 2 - 1 + 2 - 6 + 0.5 < 0 -> 0
  //   anchor 3: p = 2 (2), n = 1 (1), m = 4 (d14 = 2): 2 - 1 + 2 - 2 + 0.5 = 1.5
  //   anchor 4: no positive, no term.
  // loss = (2.5 + 4.5 + 0 + 1.5) / 4 = 2.125
  at::Tensor emb = floats({0, 0, 4, 0, 1, 0, 3, 0, 6, 0}, {5, 2}).requires_grad_(true);
  at::Tensor labels = at::tensor(std::vector<int64_t>{0, 0, 1, 1, 2}, at::kLong);
  at::Tensor loss = op.call(emb, labels, 0.5, "euclidean");
  expect_values("quartet_loss euclidean", loss, {2.125}, 1e-6);
  // Gradient along the line: an active term adds 2 d(d_ap) - d(d_an) - d(d_mn), and
  // d|xa - xb| / dxa = sign(xa - xb) = -d|xa - xb| / dxb. Per point (first coordinate):
  //   anchor 0 (p = 1, n = 2, pair (m, n) = (4, 2)): x0: -2 + 1 = -1, x1: +2, x2: -1 + 1 = 0,
  //            x4: -1
  //   anchor 1 (p = 0, n = 3, pair (4, 3)): x1: +2 - 1 = +1, x0: -2, x3: +1 + 1 = +2, x4: -1
  //   anchor 3 (p = 2, n = 1, pair (4, 1)): x3: +2 + 1 = +3, x2: -2, x1: -1 + 1 = 0, x4: -1
  //   (anchor 2's term is clamped at 0: no gradient)
  // sums: x0 -3, x1 3, x2 -2, x3 5, x4 -3; over 4 anchors: -0.75, 0.75, -0.5, 1.25, -0.75
  // (second coordinate: 0).
  loss.backward();
  expect_values("quartet_loss euclidean grad", emb.grad(),
                {-0.75, 0, 0.75, 0, -0.5, 0, 1.25, 0, -0.75, 0}, 1e-6);
}

}  // namespace

int main() {
  try {
    check_mask_blend();
    check_quartet_loss();
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
