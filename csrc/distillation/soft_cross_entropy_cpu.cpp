// fastssl::soft_cross_entropy_pairs_native (+ _backward) on CPU: the soft-target cross-entropy
// of every (target crop t, student crop s) pair (SwAV, DINO), the torch backend's formulas
// (fastssl/distillation/torch_backend.py) with their elementwise passes fused, one pass per student row.
//
// With targets q (T, B, K), logits x (S, B, K), σ = scale, L_sb = LSE_k(σ x_sbk), Q_tb = Σ_k q_tbk:
//   loss[t, s] = (1/B) Σ_b (Q_tb L_sb − σ Σ_k q_tbk x_sbk)
//   ∂ℓ/∂x_sbk  = exp(σ x_sbk − L_sb) · W_sb − (σ/B) Σ_t G_ts q_tbk,   W_sb = (σ/B) Σ_t G_ts Q_tb
//   ∂ℓ/∂q_tbk  = −(1/B) (σ Σ_s G_ts x_sbk − Σ_s G_ts L_sb)
// with G = ∂ℓ/∂loss (T, S). Each sample's target rows are flushed once (entries of magnitude
// ≤ sqrt(tiny) × their row's peak become 0, as clustering._flush_level: DINO's sharpened
// teacher is mostly subnormal numbers, ~20× slower to multiply), and Q sums the flushed rows.
//
// Tiling: groups of samples b, each holding ~1 MiB of logits (SwAV: 10 samples × 8 crops × 3000),
// or one sample and chunks of student crops of ~1 MiB (DINO: 4 crops × 65,536). A thread
// flushes a group's target rows into its buffer, then per chunk of crops: L per student row
// (a max pass and one fast_exp pass), and Σ_k q x of the chunk as one addmm_ while it is in L2.
// Backward: each student row's gradient in one pass, exp(σx − L + log|W|) · sign(W) minus the
// flushed target rows times (σ/B) G; the targets' gradient is one GEMM over all of x.
// Saved for the backward: the inputs and L (S, B). Arithmetic in float32 (fp16, bf16 and fp32
// inputs, converted once) or float64 (when either input is float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "fast_exp.h"

namespace fastssl {
namespace {

// Bytes of logits per block: a block and its flushed targets stay in L2 between their passes.
constexpr int64_t kBlockBytes = int64_t(1) << 20;

// Σ_k exp(x_k · scale − shift).
template <typename acc_t>
__attribute__((noinline)) acc_t shifted_exp_sum(const acc_t* __restrict x, acc_t scale, acc_t shift, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += fast_exp(x[k] * scale - shift);
  return sum;
}

// out_k = q_k where |q_k| > level, else 0 (NaN is kept); returns Σ_k out_k. Comparisons only:
// no arithmetic touches the subnormal numbers that are dropped.
template <typename acc_t>
__attribute__((noinline)) acc_t flush_row(const acc_t* __restrict q, acc_t level, int64_t n, acc_t* __restrict out) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t kept = (q[k] >= -level && q[k] <= level) ? acc_t(0) : q[k];
    out[k] = kept;
    sum += kept;
  }
  return sum;
}

// out_k = sign · exp(x_k · scale − lse + log_weight) − c0 q0_k − c1 q1_k. x_k · scale − lse
// first: where one term dominates the row, it is exactly 0 for that term (lse = its x · scale),
// however large the logits; log_weight added to lse first would round with lse's magnitude.
template <typename acc_t>
__attribute__((noinline)) void gradient_row(const acc_t* __restrict x, acc_t scale, acc_t lse, acc_t log_weight,
                                            acc_t sign, const acc_t* __restrict q0, acc_t c0,
                                            const acc_t* __restrict q1, acc_t c1, int64_t n, acc_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k)
    out[k] = sign * fast_exp(x[k] * scale - lse + log_weight) - c0 * q0[k] - c1 * q1[k];
}

// out_k −= c q_k.
template <typename acc_t>
__attribute__((noinline)) void subtract_scaled(const acc_t* __restrict q, acc_t c, int64_t n, acc_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] -= c * q[k];
}

template <typename acc_t>
class PairLossCpu {
 public:
  // q (T, B, K) and x (S, B, K): contiguous, in acc_t.
  PairLossCpu(const at::Tensor& q, const at::Tensor& x, double scale)
      : q_(q.data_ptr<acc_t>()), x_(x.data_ptr<acc_t>()), targets_(q.size(0)), batch_(q.size(1)),
        classes_(q.size(2)), students_(x.size(0)), scale_(static_cast<acc_t>(scale)) {
    const int64_t row_bytes = std::max<int64_t>(1, classes_ * static_cast<int64_t>(sizeof(acc_t)));
    const int64_t sample_bytes = std::max<int64_t>(1, students_) * row_bytes;
    if (sample_bytes <= kBlockBytes) {
      group_ = std::max<int64_t>(1, std::min(batch_, kBlockBytes / sample_bytes));
      chunk_ = students_;
    } else {
      group_ = 1;
      chunk_ = std::max<int64_t>(1, kBlockBytes / row_bytes);
    }
  }

  // L (S, B) into `lse`, Q (T, B) into `sums` and Σ_b Σ_k q_tbk x_sbk (T, S) into `dots`.
  void forward(const at::Tensor& x, acc_t* lse, acc_t* sums, at::Tensor& dots) const {
    const int64_t K = classes_, B = batch_;
    const at::Tensor partial_dots = at::zeros({at::get_num_threads(), targets_, students_}, x.options());
    const at::Tensor rows = x.view({students_, B * K});
    at::parallel_for(0, groups(), 1, [&](int64_t begin, int64_t end) {
      at::Tensor flushed = at::empty({targets_, group_ * K}, x.options());
      at::Tensor thread_dots = partial_dots[at::get_thread_num()];
      for (int64_t group = begin; group < end; ++group) {
        const int64_t b0 = group * group_, count = std::min(group_, B - b0);
        flush_group(b0, count, flushed.data_ptr<acc_t>(),
                    [&](int64_t t, int64_t j, acc_t sum) { sums[t * B + b0 + j] = sum; });
        const at::Tensor group_targets = flushed.narrow(1, 0, count * K);
        for (int64_t s0 = 0; s0 < students_; s0 += chunk_) {
          const int64_t chunk = std::min(chunk_, students_ - s0);
          for (int64_t s = s0; s < s0 + chunk; ++s) {
            for (int64_t b = b0; b < b0 + count; ++b) {
              const acc_t* row = x_ + (s * B + b) * K;
              acc_t high, low;
              scaled_range(row, scale_, K, high, low);
              lse[s * B + b] = std::log(shifted_exp_sum(row, scale_, high, K)) + high;
            }
          }
          const at::Tensor block = rows.narrow(0, s0, chunk).narrow(1, b0 * K, count * K);
          thread_dots.narrow(1, s0, chunk).addmm_(group_targets, block.t());
        }
      }
    });
    dots.copy_(partial_dots.sum(0));
  }

  // ∂ℓ/∂x (S, B, K) into `grad`, from G (T, S) and L (S, B).
  void logits_grad(const acc_t* grad_loss, const acc_t* lse, acc_t* grad) const {
    const int64_t K = classes_, B = batch_, S = students_, T = targets_;
    const acc_t weight = scale_ / static_cast<acc_t>(B);
    at::parallel_for(0, groups(), 1, [&](int64_t begin, int64_t end) {
      // At least one (zero) target row: T = 0 gives zero gradients without a special case.
      const int64_t rows = std::max<int64_t>(T, 1);
      std::vector<acc_t> flushed(static_cast<size_t>(rows * group_ * K)), sums(rows * group_), c(rows);
      for (int64_t group = begin; group < end; ++group) {
        const int64_t b0 = group * group_, count = std::min(group_, B - b0);
        flush_group(b0, count, flushed.data(), [&](int64_t t, int64_t j, acc_t sum) { sums[t * group_ + j] = sum; });
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t t = 0; t < T; ++t) c[t] = weight * grad_loss[t * S + s];
          for (int64_t j = 0; j < count; ++j) {
            acc_t w = 0;  // W_sb
            for (int64_t t = 0; t < T; ++t) w += c[t] * sums[t * group_ + j];
            const acc_t* q0 = flushed.data() + j * K;
            const acc_t* q1 = T > 1 ? q0 + group_ * K : q0;
            acc_t* out = grad + (s * B + b0 + j) * K;
            // exp(σx − L) · W as exp(σx − L + log|W|) · sign(W): W = 0 gives exp(−inf) = 0.
            gradient_row(x_ + (s * B + b0 + j) * K, scale_, lse[s * B + b0 + j], std::log(std::abs(w)),
                         w < 0 ? acc_t(-1) : acc_t(1), q0, c[0], q1, T > 1 ? c[1] : acc_t(0), K, out);
            for (int64_t t = 2; t < T; ++t) subtract_scaled(q0 + t * group_ * K, c[t], K, out);
          }
        }
      }
    });
  }

 private:
  int64_t groups() const { return (batch_ + group_ - 1) / group_; }

  // Target rows (t, b0 + j), j < count, flushed into buffer rows t · group_ + j; row_sum(t, j, Q_tb).
  template <typename RowSum>
  void flush_group(int64_t b0, int64_t count, acc_t* buffer, RowSum row_sum) const {
    const int64_t K = classes_;
    for (int64_t t = 0; t < targets_; ++t) {
      for (int64_t j = 0; j < count; ++j) {
        const acc_t* row = q_ + (t * batch_ + b0 + j) * K;
        acc_t high, low;
        scaled_range(row, acc_t(1), K, high, low);
        // An infinite peak keeps the infinite entries only (the loss is then not finite, as the reference's).
        const acc_t level = std::min(std::max(high, -low) * sqrt_tiny<acc_t>(), std::numeric_limits<acc_t>::max());
        row_sum(t, j, flush_row(row, level, K, buffer + (t * group_ + j) * K));
      }
    }
  }

  const acc_t* q_;
  const acc_t* x_;
  int64_t targets_, batch_, classes_, students_;
  acc_t scale_;
  int64_t group_, chunk_;  // samples per group, student crops per chunk
};

at::ScalarType compute_dtype(const at::Tensor& targets, const at::Tensor& logits) {
  return targets.scalar_type() == at::kDouble || logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const char* name, const at::Tensor& targets, const at::Tensor& logits, double scale) {
  TORCH_CHECK(targets.dim() == 3 && logits.dim() == 3, name, ": targets (T, B, K) and logits (S, B, K) must be 3-d, got ",
              targets.sizes(), " and ", logits.sizes());
  TORCH_CHECK(targets.size(1) == logits.size(1) && targets.size(2) == logits.size(2), name,
              ": targets and logits must share (B, K), got ", targets.sizes(), " and ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(targets.scalar_type()) && at::isFloatingType(logits.scalar_type()), name,
              ": targets and logits must be floating point, got ", targets.scalar_type(), " and ", logits.scalar_type());
  TORCH_CHECK(scale > 0, name, ": scale must be > 0, got ", scale);
}

std::tuple<at::Tensor, at::Tensor> soft_cross_entropy_pairs_cpu(const at::Tensor& targets, const at::Tensor& logits,
                                                                double scale) {
  check_inputs("soft_cross_entropy_pairs_native", targets, logits, scale);
  const auto dtype = compute_dtype(targets, logits);
  const at::Tensor q = targets.to(dtype).contiguous(), x = logits.to(dtype).contiguous();
  const int64_t T = q.size(0), B = q.size(1), S = x.size(0);
  at::Tensor lse = at::empty({S, B}, x.options()), sums = at::empty({T, B}, x.options());
  at::Tensor dots = at::empty({T, S}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "soft_cross_entropy_pairs_native", [&] {
    PairLossCpu<scalar_t>(q, x, scale).forward(x, lse.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>(), dots);
  });
  at::Tensor loss = at::mm(sums, lse.t()).sub_(dots, scale).div_(static_cast<double>(B));
  return {loss, lse};
}

std::vector<at::Tensor> soft_cross_entropy_pairs_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& targets,
                                                              const at::Tensor& logits, const at::Tensor& lse,
                                                              double scale, c10::List<bool> needs_grad) {
  check_inputs("soft_cross_entropy_pairs_native_backward", targets, logits, scale);
  const auto dtype = compute_dtype(targets, logits);
  const int64_t T = targets.size(0), B = targets.size(1), K = targets.size(2), S = logits.size(0);
  TORCH_CHECK(lse.scalar_type() == dtype && lse.dim() == 2 && lse.size(0) == S && lse.size(1) == B &&
                  grad_loss.dim() == 2 && grad_loss.size(0) == T && grad_loss.size(1) == S && needs_grad.size() == 2,
              "soft_cross_entropy_pairs_native_backward: expected grad_loss (T, S), lse (S, B) in ", dtype,
              " and two needs_grad flags, got ", grad_loss.sizes(), ", ", lse.sizes(), " ", lse.scalar_type(), " and ",
              needs_grad.size());
  const at::Tensor x = logits.to(dtype).contiguous(), G = grad_loss.to(dtype).contiguous(), L = lse.contiguous();
  at::Tensor grad_targets = targets.new_empty({0}), grad_logits = logits.new_empty({0});
  if (needs_grad[0]) {
    // −(1/B) (σ G x − (G L) broadcast over k), one GEMM over all of x.
    const at::Tensor lse_weight = at::mm(G, L).unsqueeze(2);
    grad_targets = at::mm(G, x.view({S, B * K})).view({T, B, K}).mul_(-scale).add_(lse_weight);
    grad_targets.div_(static_cast<double>(B));
    grad_targets = grad_targets.to(targets.scalar_type());
  }
  if (needs_grad[1]) {
    const at::Tensor q = targets.to(dtype).contiguous();
    at::Tensor grad = at::empty(x.sizes(), x.options());
    advise_huge_pages(grad.data_ptr(), grad.nbytes());
    AT_DISPATCH_FLOATING_TYPES(dtype, "soft_cross_entropy_pairs_native_backward", [&] {
      PairLossCpu<scalar_t>(q, x, scale).logits_grad(G.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(),
                                                     grad.data_ptr<scalar_t>());
    });
    grad_logits = grad.to(logits.scalar_type());
  }
  return {grad_targets, grad_logits};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.set_python_module("fastssl.distillation.op");  // register_pair_loss_op, called by native_backend
  m.def("soft_cross_entropy_pairs_native(Tensor targets, Tensor logits, float scale) -> (Tensor, Tensor)");
  m.def("soft_cross_entropy_pairs_native_backward(Tensor grad_loss, Tensor targets, Tensor logits, Tensor lse, "
        "float scale, bool[] needs_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("soft_cross_entropy_pairs_native", &soft_cross_entropy_pairs_cpu);
  m.impl("soft_cross_entropy_pairs_native_backward", &soft_cross_entropy_pairs_backward_cpu);
}

}  // namespace fastssl
