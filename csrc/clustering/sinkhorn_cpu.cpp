// fastssl::sinkhorn_native on CPU: the whole log-domain Sinkhorn-Knopp iteration in one op,
// one read of a (B, K) matrix per iteration.
//
// With x = scores / ε (B, K) and potentials a (K) per prototype, v (B) per sample, the plan is
// log Q_bk = x_bk + a_k + v_b (see fastssl/clustering/torch_backend.py). The iteration of the reference is
//   row step     a_k = log r_k − L_k,   L_k = LSE_b (x_bk + v_b)   (v = 0 before the first)
//   column step  v_b = log c_b − M_b,   M_b = LSE_k (x_bk + a_k)
// and the codes are softmax_k (x_bk + a_k) with the last a. A column step and the next row
// step share one sweep over the rows: row b gives M_b, then v_b, then its terms of every L_k.
// Each thread sums its rows into its own K accumulators, as Σ_b t_bk · exp(g_b − β) with
// terms t_bk ≤ 1 and a shift β = max g_b that is raised (and the sums rescaled) when a row
// exceeds it; the threads' sums are combined at the end.
//
// Kernel path (every sample's scores span at most S = −½ log(tiny) / 1 in x, as cosine
// scores at ε = 0.05 do): the first sweep stores E_bk = exp(x_bk − m_b), m_b = max_k x_bk,
// in the output buffer (fp32) and later sweeps need no exp per element:
//   M_b = log Σ_k E_bk w_k + α + m_b,   w_k = exp(a_k − α), α = max a
//   L_k = log Σ_b E_bk exp(log c_b − log Σ_k E_bk w_k − α)       (t = E, g_b as written)
// E ≥ e^−S = sqrt(tiny) and the largest w is 1, so products lost to underflow (< tiny each)
// change a sum by < K·sqrt(tiny) relative. The codes E_bk w_k / Σ_k E_bk w_k overwrite E.
// Log-domain path (wider rows, float64 arithmetic): every sweep takes exp(x_bk + a_k − max_k(x_bk + a_k)) ≤ 1 per
// element (t) with g_b = max + v_b; a sum below sqrt(tiny) (some prototype no sample reaches)
// could have lost a visible fraction to underflow, so that pass is redone exactly with a max
// sweep and a sum sweep. Nothing is saved: Sinkhorn has no gradient.
// Arithmetic in float32 (kernel path of fp16/bf16/fp32 scores) or float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fast_exp.h"

namespace fastssl {
namespace {

// Σ_k x_k y_k, in a function of its own so that the loop sees only its own pointers (inlined
// into the row lambdas, gcc vectorised it with gathers, 5× slower).
template <typename acc_t>
__attribute__((noinline)) acc_t dot(const acc_t* __restrict x, const acc_t* __restrict y, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += x[k] * y[k];
  return sum;
}

// out_k = exp(x_k · scale − shift).
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void shifted_exp(const scalar_t* __restrict x, acc_t scale, acc_t shift, int64_t n,
                                           acc_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = fast_exp(static_cast<acc_t>(x[k]) * scale - shift);
}

// out_k = x_k · y_k · factor (out may be x itself: each element is read before it is written).
template <typename acc_t, typename out_t>
__attribute__((noinline)) void scaled_product(const acc_t* x, const acc_t* __restrict y, acc_t factor, int64_t n,
                                              out_t* out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<out_t>(x[k] * y[k] * factor);
}

template <typename scalar_t, typename acc_t>
class SinkhornCpu {
 public:
  SinkhornCpu(const scalar_t* scores, int64_t batch, int64_t prototypes, acc_t inv_epsilon)
      : scores_(scores), batch_(batch), prototypes_(prototypes), inv_epsilon_(inv_epsilon),
        threads_(std::max(1, at::get_num_threads())),
        row_buffers_(static_cast<size_t>(threads_) * prototypes),
        thread_sums_(static_cast<size_t>(threads_) * prototypes),
        thread_values_(threads_),
        sample_potential_(batch) {}

  // --- kernel path --------------------------------------------------------------------------
  // Writes E (B, K) into `kernel` and the first L into `lse`; false (and nothing usable) when
  // some row of x spans more than the kernel path allows.
  bool build_kernel(acc_t* kernel, acc_t* lse) {
    const int64_t K = prototypes_;
    const acc_t inv_epsilon = inv_epsilon_;
    std::fill(thread_values_.begin(), thread_values_.end(), acc_t(0));
    const acc_t beta = weighted_column_sums(lse, [&](int64_t b, acc_t*, int thread) {
      acc_t high, low;
      scaled_range(scores_ + b * K, inv_epsilon, K, high, low);
      thread_values_[thread] = std::max(thread_values_[thread], high - low);
      acc_t* e = kernel + b * K;
      shifted_exp(scores_ + b * K, inv_epsilon, high, K, e);
      return std::make_pair(static_cast<const acc_t*>(e), high);
    });
    const acc_t max_span = -std::log(sqrt_tiny<acc_t>());  // reference.max_exp_span
    const acc_t span = *std::max_element(thread_values_.begin(), thread_values_.end());
    if (!(span <= max_span)) return false;
    for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + beta;
    return true;
  }

  void kernel_prototype_lse(const acc_t* kernel, const acc_t* a, const acc_t* log_c, acc_t* lse) {
    const int64_t K = prototypes_;
    const acc_t alpha = *std::max_element(a, a + K);
    std::vector<acc_t> weights = potential_weights(a, alpha);
    const acc_t* w = weights.data();
    const acc_t beta = weighted_column_sums(lse, [=](int64_t b, acc_t*, int) {
      const acc_t* e = kernel + b * K;
      return std::make_pair(e, log_c[b] - std::log(dot(e, w, K)) - alpha);
    });
    for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + beta;
  }

  // E_bk w_k / Σ_k E_bk w_k into `codes` (may be `kernel` itself).
  void kernel_codes(const acc_t* kernel, const acc_t* a, scalar_t* codes) {
    const int64_t K = prototypes_;
    std::vector<acc_t> weights = potential_weights(a, *std::max_element(a, a + K));
    const acc_t* w = weights.data();
    at::parallel_for(0, batch_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t* e = kernel + b * K;
        scaled_product(e, w, acc_t(1) / dot(e, w, K), K, codes + b * K);
      }
    });
  }

  // --- log-domain path ----------------------------------------------------------------------
  // L (K) after a column step with prototype potential `a` (K); without `log_c`, the first row
  // step (v = 0, `a` zeros).
  void prototype_lse(const acc_t* a, const acc_t* log_c, acc_t* lse) {
    const int64_t K = prototypes_;
    const acc_t beta = weighted_column_sums(lse, [&](int64_t b, acc_t* e, int) {
      acc_t row_max;
      const acc_t row_sum = exp_row(b, a, e, row_max);
      const acc_t v = log_c ? log_c[b] - (row_max + std::log(row_sum)) : acc_t(0);
      sample_potential_[b] = v;
      return std::make_pair(static_cast<const acc_t*>(e), row_max + v);
    });
    if (*std::min_element(lse, lse + K) < sqrt_tiny<acc_t>()) {  // some sum may have lost to underflow
      exact_prototype_lse(lse);
      return;
    }
    for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + beta - a[k];
  }

  // softmax_k (x_bk + a_k) of every row into `codes` (B, K).
  void write_codes(const acc_t* a, scalar_t* codes) {
    const int64_t K = prototypes_;
#pragma omp parallel num_threads(threads_)
    {
      acc_t* e = row_buffers_.data() + static_cast<size_t>(omp_get_thread_num()) * K;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch_; ++b) {
        acc_t row_max;
        const acc_t inverse_sum = acc_t(1) / exp_row(b, a, e, row_max);
        scalar_t* out = codes + b * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) out[k] = static_cast<scalar_t>(e[k] * inverse_sum);
      }
    }
  }

 private:
  std::vector<acc_t> potential_weights(const acc_t* a, acc_t alpha) const {
    std::vector<acc_t> weights(prototypes_);
#pragma omp simd
    for (int64_t k = 0; k < prototypes_; ++k) weights[k] = fast_exp(a[k] - alpha);
    return weights;
  }

  // sums_out (K) = Σ_b t_bk exp(g_b − β) over all rows, where row(b, buffer, thread) returns
  // (t_b, g_b): K terms ≤ 1 (which may live in the thread's `buffer`) and a log weight.
  // Returns β = max_b g_b.
  template <typename Row>
  acc_t weighted_column_sums(acc_t* sums_out, Row row) {
    const int64_t K = prototypes_;
    std::vector<acc_t> shifts(threads_, -kInfinity<acc_t>);
#pragma omp parallel num_threads(threads_)
    {
      const int thread = omp_get_thread_num();
      acc_t* buffer = row_buffers_.data() + static_cast<size_t>(thread) * K;
      acc_t* sums = thread_sums_.data() + static_cast<size_t>(thread) * K;
      std::fill(sums, sums + K, acc_t(0));
      acc_t beta = -kInfinity<acc_t>;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch_; ++b) {
        const auto [terms, g] = row(b, buffer, thread);
        if (g > beta) {
          const acc_t rescale = fast_exp(beta - g);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) sums[k] *= rescale;
          beta = g;
        }
        const acc_t weight = fast_exp(g - beta);
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) sums[k] += weight * terms[k];
      }
      shifts[thread] = beta;
    }
    const acc_t beta = *std::max_element(shifts.begin(), shifts.end());
    std::fill(sums_out, sums_out + K, acc_t(0));
    for (int thread = 0; thread < threads_; ++thread) {
      const acc_t weight = fast_exp(shifts[thread] - beta);
      if (weight == acc_t(0)) continue;  // a thread without rows (shift -inf)
      const acc_t* sums = thread_sums_.data() + static_cast<size_t>(thread) * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) sums_out[k] += weight * sums[k];
    }
    return beta;
  }

  // e_k = exp(x_bk + a_k − m) for row b, m = max_k (x_bk + a_k) (returned in `row_max`): Σ_k e_k.
  acc_t exp_row(int64_t b, const acc_t* a, acc_t* e, acc_t& row_max) const {
    const scalar_t* row = scores_ + b * prototypes_;
    const acc_t inv_epsilon = inv_epsilon_;
    acc_t m = -kInfinity<acc_t>;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < prototypes_; ++k) {
      const acc_t logit = static_cast<acc_t>(row[k]) * inv_epsilon + a[k];
      m = logit > m ? logit : m;
    }
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < prototypes_; ++k) {
      e[k] = fast_exp(static_cast<acc_t>(row[k]) * inv_epsilon + a[k] - m);
      sum += e[k];
    }
    row_max = m;
    return sum;
  }

  // L_k = LSE_b (x_bk + v_b) with the stored v, by a max sweep and a sum sweep (exact for any range).
  void exact_prototype_lse(acc_t* lse) {
    const int64_t K = prototypes_;
    const acc_t inv_epsilon = inv_epsilon_;
    std::vector<acc_t> column_max(K);
    reduce_columns(column_max.data(), -std::numeric_limits<acc_t>::infinity(),
                   [](acc_t x, acc_t y) { return std::max(x, y); },
                   [&](acc_t* partial, int64_t b) {
                     const scalar_t* row = scores_ + b * K;
                     const acc_t v = sample_potential_[b];
#pragma omp simd
                     for (int64_t k = 0; k < K; ++k)
                       partial[k] = std::max(partial[k], static_cast<acc_t>(row[k]) * inv_epsilon + v);
                   });
    for (auto& m : column_max) m = std::isfinite(m) ? m : acc_t(0);  // an all -inf column stays -inf
    const acc_t* shift = column_max.data();
    reduce_columns(lse, acc_t(0), [](acc_t x, acc_t y) { return x + y; }, [&](acc_t* partial, int64_t b) {
      const scalar_t* row = scores_ + b * K;
      const acc_t v = sample_potential_[b];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) partial[k] += fast_exp(static_cast<acc_t>(row[k]) * inv_epsilon + v - shift[k]);
    });
    for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + shift[k];
  }

  // out (K) = combine over rows of accumulate(partial, b), each thread into its own K partials.
  template <typename Combine, typename Accumulate>
  void reduce_columns(acc_t* out, acc_t identity, Combine combine, Accumulate accumulate) {
    const int64_t K = prototypes_;
#pragma omp parallel num_threads(threads_)
    {
      acc_t* partial = thread_sums_.data() + static_cast<size_t>(omp_get_thread_num()) * K;
      std::fill(partial, partial + K, identity);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch_; ++b) accumulate(partial, b);
    }
    std::fill(out, out + K, identity);
    for (int thread = 0; thread < threads_; ++thread) {
      const acc_t* partial = thread_sums_.data() + static_cast<size_t>(thread) * K;
      for (int64_t k = 0; k < K; ++k) out[k] = combine(out[k], partial[k]);
    }
  }

  const scalar_t* scores_;
  int64_t batch_, prototypes_;
  acc_t inv_epsilon_;
  int threads_;
  std::vector<acc_t> row_buffers_, thread_sums_, thread_values_, sample_potential_;
};

// The iteration of fastssl.clustering.torch_backend.sinkhorn_with on `lse` (K), which holds the first row
// step's L: next_lse(a, lse) runs a column step and the next row step. Returns the last a.
template <typename acc_t, typename NextLse>
std::vector<acc_t> iterate(std::vector<acc_t> lse, int64_t iterations, const acc_t* log_row, double tolerance,
                           NextLse next_lse) {
  const int64_t K = static_cast<int64_t>(lse.size());
  std::vector<acc_t> a(K);
  for (int64_t iteration = 0; iteration < iterations; ++iteration) {
    for (int64_t k = 0; k < K; ++k) a[k] = log_row[k] - lse[k];
    if (iteration == iterations - 1) break;
    next_lse(a.data(), lse.data());
    if (tolerance > 0) {
      acc_t worst = 0;
      for (int64_t k = 0; k < K; ++k) worst = std::max(worst, std::abs(std::exp(a[k] + lse[k] - log_row[k]) - 1));
      if (worst < tolerance) break;
    }
  }
  return a;
}

// The kernel path; false (codes not written) when some row's scores span too wide a range.
template <typename scalar_t, typename acc_t>
bool kernel_sinkhorn(const at::Tensor& scores, int64_t iterations, double epsilon, const at::Tensor& log_r,
                     const at::Tensor& log_c, double tolerance, at::Tensor& codes) {
  const int64_t K = scores.size(1);
  SinkhornCpu<scalar_t, acc_t> sinkhorn(scores.data_ptr<scalar_t>(), scores.size(0), K,
                                        static_cast<acc_t>(1.0 / epsilon));
  // fp32 codes hold the kernel E until they are overwritten by the codes; other dtypes need a buffer.
  at::Tensor kernel = std::is_same_v<scalar_t, acc_t> ? codes : at::empty(scores.sizes(), log_r.options());
  acc_t* kernel_data = kernel.data_ptr<acc_t>();
  advise_huge_pages(kernel_data, kernel.nbytes());
  std::vector<acc_t> lse(K);
  if (!sinkhorn.build_kernel(kernel_data, lse.data())) return false;
  const acc_t* log_col = log_c.data_ptr<acc_t>();
  const std::vector<acc_t> a = iterate(lse, iterations, log_r.data_ptr<acc_t>(), tolerance, [&](const acc_t* a_, acc_t* lse_) {
    sinkhorn.kernel_prototype_lse(kernel_data, a_, log_col, lse_);
  });
  sinkhorn.kernel_codes(kernel_data, a.data(), codes.data_ptr<scalar_t>());
  return true;
}

// The log-domain path, in float64 for every input: with scores/ε of magnitude X, potentials
// of magnitude X cancel in x + a + v, and float32 would leave an error of X·2⁻²⁴ in the codes.
template <typename scalar_t>
void log_domain_sinkhorn(const at::Tensor& scores, int64_t iterations, double epsilon, const at::Tensor& log_r,
                         const at::Tensor& log_c, double tolerance, at::Tensor& codes) {
  const int64_t K = scores.size(1);
  SinkhornCpu<scalar_t, double> sinkhorn(scores.data_ptr<scalar_t>(), scores.size(0), K, 1.0 / epsilon);
  const at::Tensor log_row = log_r.to(at::kDouble), log_col = log_c.to(at::kDouble);
  std::vector<double> zeros(K, 0.0), lse(K);
  sinkhorn.prototype_lse(zeros.data(), nullptr, lse.data());
  const std::vector<double> a = iterate(lse, iterations, log_row.data_ptr<double>(), tolerance, [&](const double* a_, double* lse_) {
    sinkhorn.prototype_lse(a_, log_col.data_ptr<double>(), lse_);
  });
  sinkhorn.write_codes(a.data(), codes.data_ptr<scalar_t>());
}

at::Tensor sinkhorn_cpu(const at::Tensor& scores, int64_t iterations, double epsilon, const at::Tensor& log_r,
                        const at::Tensor& log_c, double tolerance) {
  TORCH_CHECK(scores.dim() == 2, "sinkhorn_native: scores must be (B, K), got ", scores.sizes());
  TORCH_CHECK(iterations >= 1, "sinkhorn_native: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(epsilon > 0, "sinkhorn_native: epsilon must be > 0, got ", epsilon);
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(log_r.scalar_type() == acc_dtype && log_c.scalar_type() == acc_dtype,
              "sinkhorn_native: log marginals must be ", acc_dtype, ", got ", log_r.scalar_type(), " and ",
              log_c.scalar_type());
  TORCH_CHECK(log_r.dim() == 1 && log_r.size(0) == scores.size(1) && log_c.dim() == 1 &&
                  log_c.size(0) == scores.size(0),
              "sinkhorn_native: log_row_marginals (K,) and log_col_marginals (B,) must match scores ",
              scores.sizes(), ", got ", log_r.sizes(), " and ", log_c.sizes());
  const at::Tensor input = scores.contiguous();
  at::Tensor codes = at::empty_like(input);
  if (input.numel() == 0) return codes;
  advise_huge_pages(codes.data_ptr(), codes.nbytes());
  const at::Tensor log_row = log_r.contiguous(), log_col = log_c.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sinkhorn_native", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (!kernel_sinkhorn<scalar_t, acc_t>(input, iterations, epsilon, log_row, log_col, tolerance, codes))
      log_domain_sinkhorn<scalar_t>(input, iterations, epsilon, log_row, log_col, tolerance, codes);
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.set_python_module("fastssl.clustering.native_backend");
  m.def("sinkhorn_native(Tensor scores, int iterations, float epsilon, Tensor log_row_marginals, "
        "Tensor log_col_marginals, float tolerance) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("sinkhorn_native", &sinkhorn_cpu); }

}  // namespace fastssl
