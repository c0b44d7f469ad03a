// exp() that the compiler can vectorise: no library call, no branch, so a loop of
// `fast_exp` under `#pragma omp simd` becomes AVX2/AVX-512 code (glibc's expf is a call that
// gcc only vectorises under -ffast-math, which would also break the -inf handling below).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastssl {

// a · b + c, in one rounding where the CPU has FMA. The extension is built with
// -ffp-contract=off (fastssl/runtime/native.py), so the compiler fuses nothing on its own: x · σ − L
// rounds the product first, as torch does (where one logit dominates its row, that is exactly 0).
__attribute__((always_inline)) inline float mul_add(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// float: Cephes' expf. x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for an exact
// product), exp(r) by a degree-7 polynomial, 2^n built in the exponent bits. Relative error
// below 2 ulp on [-87.3, 88]; arguments below -87.33 (where expf leaves the normal numbers)
// give 0, arguments above 88 are clamped (every caller passes x ≤ 0), NaN stays NaN.
// always_inline: gcc's inliner may otherwise leave a call in the loop, which does not vectorise.
__attribute__((always_inline)) inline float fast_exp(float x) {
  // Comparisons, not std::fmin/fmax (library calls); they vectorise as selects under
  // -fno-trapping-math (fastssl/runtime/native.py).
  const float clamped = x > 88.0f ? 88.0f : (x < -87.3365447f ? -87.3365447f : x);
  const float n = std::floor(mul_add(clamped, 1.44269504088896341f, 0.5f));
  float r = clamped - n * 0.693359375f;
  r = mul_add(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  p = mul_add(p * r, r, r) + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(two_to_n));
  const float value = x < -87.3365447f ? 0.0f : p * two_to_n;
  return x != x ? x : value;
}

// double: the library exp (float64 is the accuracy path, not the fast one).
inline double fast_exp(double x) { return std::exp(x); }

}  // namespace fastssl
