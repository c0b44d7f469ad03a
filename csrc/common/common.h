// Helpers shared by the CPU ops (csrc/cpu/*.cpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastssl {

template <typename acc_t>
constexpr acc_t kInfinity = std::numeric_limits<acc_t>::infinity();

// sqrt(smallest normal number): products of two numbers above it are normal numbers, and sums
// of terms ≤ 1 that reach it lost < n·sqrt(tiny) of n terms to underflow.
template <typename acc_t>
acc_t sqrt_tiny() {
  return std::sqrt(std::numeric_limits<acc_t>::min());
}

// max and min of x_k · scale.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void scaled_range(const scalar_t* __restrict x, acc_t scale, int64_t n, acc_t& high,
                                            acc_t& low) {
  acc_t top = -kInfinity<acc_t>, bottom = kInfinity<acc_t>;
#pragma omp simd reduction(max : top) reduction(min : bottom)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t value = static_cast<acc_t>(x[k]) * scale;
    top = value > top ? value : top;
    bottom = value < bottom ? value : bottom;
  }
  high = top;
  low = bottom;
}

// Ask for transparent huge pages for a large buffer that has not been written yet: filling
// 49 MB of 4 KiB pages takes ~12,000 page faults, a fifth of the whole Sinkhorn here. Advice
// only (no effect where THP is off or the region is already backed).
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace fastssl
