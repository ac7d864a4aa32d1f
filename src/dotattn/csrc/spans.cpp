// Row spans of a boolean mask tensor: whether each row's allowed keys are one run, and where.
// Python (dotattn/masks/tensor.py, Dense) asks it for every boolean mask given as a tensor, so
// that a causal or windowed mask built by hand, or a static cache's mask, reaches the kernels as
// two integers per row: one pass over the tensor, each row in three memchr scans (to its first
// True, from there to its first False, and the rest, which must hold no True).

#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>

#include "kernels.h"

namespace dotattn {

std::optional<std::tuple<at::Tensor, at::Tensor>> interval_rows(const at::Tensor& allowed) {
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() >= 1 && allowed.device().is_cpu(),
              "interval_rows takes a CPU bool tensor (..., C), got ", allowed.scalar_type(), " ", allowed.sizes());
  const at::Tensor a = allowed.contiguous();
  const int64_t C = a.size(-1);
  const int64_t rows = C ? a.numel() / C : 0;
  auto row_shape = a.sizes().vec();
  row_shape.pop_back();
  at::Tensor lo = at::zeros(row_shape, a.options().dtype(at::kLong));
  at::Tensor hi = at::zeros(row_shape, a.options().dtype(at::kLong));
  // torch stores a bool as one byte, 0 or 1
  const auto* data = reinterpret_cast<const uint8_t*>(a.data_ptr<bool>());
  int64_t* lo_p = lo.data_ptr<int64_t>();
  int64_t* hi_p = hi.data_ptr<int64_t>();
  std::atomic<bool> intervals{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1 && intervals.load(std::memory_order_relaxed); ++r) {
      const uint8_t* row = data + r * C;
      const auto* first = static_cast<const uint8_t*>(std::memchr(row, 1, C));
      if (first == nullptr) continue;  // sees nothing: lo = hi = 0
      const auto* stop = static_cast<const uint8_t*>(std::memchr(first, 0, row + C - first));
      if (stop == nullptr) stop = row + C;
      if (stop < row + C && std::memchr(stop, 1, row + C - stop) != nullptr) {
        intervals.store(false, std::memory_order_relaxed);
        return;
      }
      lo_p[r] = first - row;
      hi_p[r] = stop - row;
    }
  });
  if (!intervals.load()) return std::nullopt;
  return std::make_tuple(lo, hi);
}

}  // namespace dotattn
