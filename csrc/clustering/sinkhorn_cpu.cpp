// fastssl::sinkhorn_native on CPU: the whole log-domain Sinkhorn-Knopp iteration in one op,
// one read of a (B, K) matrix per iteration.
//
// With x = scores / ε (B, K) and potentials a (K) per prototype, v (B) per sample, the plan is
// log Q_bk = x_bk + a_k + v_b (see fastssl/clustering/torch_backend.py). The iteration of the reference is
//   row step     a_k = log r_k − L_k,   L_k = LSE_b (x_bk + v_b)   (v = 0 before the first)
//   column step  v_b = log c_b − M_b,   M_b = LSE_k (x_bk + a_k)
// and the codes are softmax_k (x_bk + a_k) with the last a. A column step and the next row
// step share one sweep over the rows: row b gives M_b, then v_b, then its terms of every L_k.
// The rows are cut into fixed chunks (RowChunks); each chunk sums its rows into its own K
// accumulators, as Σ_b t_bk · exp(g_b − β) with terms t_bk ≤ 1 and a shift β = max g_b that is
// raised (and the sums rescaled) when a row exceeds it; the chunks' sums are combined in chunk
// order between sweeps, so the codes are bitwise the same at any thread count and schedule.
//
// Threads (issue 18): on a shared machine the OS deschedules a thread for whole time slices
// (measured: 3-12 ms at each parallel region's start, once 130 ms in a 16 ms call). With a
// parallel region per sweep and a static half of the rows per thread, the other thread waited
// at every region start and barrier. Here all sweeps run in one region (run_sweeps): the chunks
// of a sweep are claimed as the threads come, and a thread that is not running holds up only
// the chunk it is in.
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
#include <atomic>
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

// The fixed split of B rows of K scores into chunks: at least kMinChunkElements scores per
// chunk (a chunk's work, ~30-100 µs, dwarfs claiming it) and at most kMaxChunks chunks (their
// K partial sums stay < 2% of a (B, K) sweep's memory traffic). Independent of the thread count,
// so the result is too.
struct RowChunks {
  static constexpr int64_t kMinChunkElements = int64_t(1) << 16;
  static constexpr int64_t kMaxChunks = 64;
  int64_t batch, rows, count;  // all rows, rows per chunk (the last may have fewer), chunks

  RowChunks(int64_t batch_, int64_t prototypes) : batch(batch_) {
    const int64_t min_rows = (kMinChunkElements + prototypes - 1) / std::max<int64_t>(prototypes, 1);
    rows = std::max<int64_t>(1, std::min(batch, std::max(min_rows, (batch + kMaxChunks - 1) / kMaxChunks)));
    count = (batch + rows - 1) / rows;
  }
  int64_t end(int64_t chunk) const { return std::min(batch, (chunk + 1) * rows); }
};

// What follows a sweep: another one, the last one (the codes), or nothing.
enum class Next { kSweep, kFinalSweep, kStop };

// Every sweep of a call in ONE parallel region, without barriers. Tickets 0, 1, 2, … are
// drawn by the threads as they come; ticket t is chunk t mod C of sweep t / C (C chunks). A
// thread whose ticket belongs to a sweep not yet published waits for it (C++20 atomic wait:
// a short spin, then a futex sleep, whatever OMP_WAIT_POLICY says). Whichever thread finishes
// a sweep's last chunk runs after() (the O(K) step between sweeps: combine the chunks' sums in
// chunk order, next potentials) and publishes the next sweep. So a descheduled thread holds up
// only the chunk it is in, never a share of the rows, and a late-starting thread is not waited
// for; the only wait on a thread that is not running is the region's end.
// chunk(index, first row, end row, thread); after() -> Next (run only after a sweep not final).
template <typename Chunk, typename After>
void run_sweeps(const RowChunks& chunks, int threads, bool first_is_final, Chunk chunk, After after) {
  std::atomic<int64_t> next_ticket{0}, finished{0};
  // 2 × (the published sweep) + 1 if it is the last
  std::atomic<int> gate{first_is_final ? 1 : 0};
  auto work = [&](int thread) {
    for (;;) {
      const int64_t ticket = next_ticket.fetch_add(1, std::memory_order_relaxed);
      const int64_t sweep = ticket / chunks.count, index = ticket % chunks.count;
      int state = gate.load(std::memory_order_acquire);
      while ((state >> 1) < sweep) {
        if (state & 1) return;  // the published sweep is the last: nothing left to claim
        gate.wait(state, std::memory_order_acquire);
        state = gate.load(std::memory_order_acquire);
      }
      chunk(index, index * chunks.rows, chunks.end(index), thread);
      // acq_rel: the thread that ends the sweep sees every chunk's sums
      if (finished.fetch_add(1, std::memory_order_acq_rel) + 1 != (sweep + 1) * chunks.count) continue;
      if (state & 1) return;  // the last sweep is done (only this thread could publish another)
      const Next next = after();
      gate.store(next == Next::kStop ? 2 * static_cast<int>(sweep) + 1
                                     : 2 * static_cast<int>(sweep + 1) + (next == Next::kFinalSweep),
                 std::memory_order_release);
      gate.notify_all();
      if (next == Next::kStop) return;
    }
  };
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    work(omp_get_thread_num());
  } else {
    work(0);
  }
}

// The iteration of fastssl.clustering.torch_backend.sinkhorn_with, one step per row step's L.
template <typename acc_t>
struct Iteration {
  int64_t iterations;
  const acc_t* log_row;
  double tolerance;
  std::vector<acc_t> a;  // the prototype potentials (K)
  int64_t done = 0;

  // After a row step gave L (`lse`): true when the codes come next (with `a`).
  bool codes_next(const acc_t* lse) {
    const int64_t K = static_cast<int64_t>(a.size());
    if (done > 0 && tolerance > 0) {
      acc_t worst = 0;
      for (int64_t k = 0; k < K; ++k) worst = std::max(worst, std::abs(std::exp(a[k] + lse[k] - log_row[k]) - 1));
      if (worst < tolerance) return true;
    }
    for (int64_t k = 0; k < K; ++k) a[k] = log_row[k] - lse[k];
    return ++done == iterations;
  }
};

// Per-chunk state of the sweeps over the rows of (B, K) scores.
template <typename scalar_t, typename acc_t>
struct RowSweeps {
  RowSweeps(const scalar_t* scores, int64_t batch, int64_t prototypes, acc_t inv_epsilon)
      : scores_(scores), prototypes_(prototypes), inv_epsilon_(inv_epsilon), chunks_(batch, prototypes),
        threads_(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks_.count)))),
        row_buffers_(static_cast<size_t>(threads_) * prototypes),
        chunk_sums_(static_cast<size_t>(chunks_.count) * prototypes),
        chunk_shifts_(chunks_.count),
        weights_(prototypes) {}

  template <typename Chunk, typename After>
  void run(bool first_is_final, Chunk chunk, After after) {
    run_sweeps(chunks_, threads_, first_is_final, chunk, after);
  }

  // The chunk's K sums Σ_b t_bk exp(g_b − β_chunk) over its rows, where row(b, buffer)
  // returns (t_b, g_b): K terms ≤ 1 (which may live in the thread's `buffer`) and a log weight.
  template <typename Row>
  void weighted_sums(int64_t chunk, int64_t begin, int64_t end, int thread, Row row) {
    const int64_t K = prototypes_;
    acc_t* buffer = row_buffer(thread);
    acc_t* sums = chunk_sums(chunk);
    std::fill(sums, sums + K, acc_t(0));
    acc_t beta = -kInfinity<acc_t>;
    for (int64_t b = begin; b < end; ++b) {
      const auto [terms, g] = row(b, buffer);
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
    chunk_shifts_[chunk] = beta;
  }

  // out (K) = Σ over chunks, in chunk order, of their weighted_sums at one shift β = max β_chunk;
  // returns β.
  acc_t combine_weighted_sums(acc_t* out) const {
    const int64_t K = prototypes_;
    const acc_t beta = *std::max_element(chunk_shifts_.begin(), chunk_shifts_.end());
    std::fill(out, out + K, acc_t(0));
    for (int64_t chunk = 0; chunk < chunks_.count; ++chunk) {
      const acc_t weight = fast_exp(chunk_shifts_[chunk] - beta);
      if (weight == acc_t(0)) continue;  // a chunk whose rows all weigh nothing (shift -inf)
      const acc_t* sums = chunk_sums(chunk);
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out[k] += weight * sums[k];
    }
    return beta;
  }

  // out (K) = combine over chunks, in chunk order, of their K partials.
  template <typename Combine>
  void combine_partials(acc_t* out, acc_t identity, Combine combine) const {
    const int64_t K = prototypes_;
    std::fill(out, out + K, identity);
    for (int64_t chunk = 0; chunk < chunks_.count; ++chunk) {
      const acc_t* partial = chunk_sums(chunk);
      for (int64_t k = 0; k < K; ++k) out[k] = combine(out[k], partial[k]);
    }
  }

  // weights_ = exp(a − α), α = max a (returned): the kernel path's potentials, largest 1.
  acc_t set_weights(const acc_t* a) {
    const acc_t alpha = *std::max_element(a, a + prototypes_);
#pragma omp simd
    for (int64_t k = 0; k < prototypes_; ++k) weights_[k] = fast_exp(a[k] - alpha);
    return alpha;
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

  acc_t* chunk_sums(int64_t chunk) { return chunk_sums_.data() + static_cast<size_t>(chunk) * prototypes_; }
  const acc_t* chunk_sums(int64_t chunk) const {
    return chunk_sums_.data() + static_cast<size_t>(chunk) * prototypes_;
  }
  acc_t* row_buffer(int thread) { return row_buffers_.data() + static_cast<size_t>(thread) * prototypes_; }

  const scalar_t* scores_;
  const int64_t prototypes_;
  const acc_t inv_epsilon_;
  const RowChunks chunks_;
  const int threads_;  // at most one per chunk: one alone runs without a parallel region
  std::vector<acc_t> row_buffers_, chunk_sums_;
  std::vector<acc_t> chunk_shifts_, weights_;
};

// The kernel path; false (codes not written) when some row's scores span too wide a range.
// Sweeps: build E and the first L; one per further row step (L from E and the weights); codes.
template <typename scalar_t, typename acc_t>
bool kernel_sinkhorn(const at::Tensor& scores, int64_t iterations, double epsilon, const at::Tensor& log_r,
                     const at::Tensor& log_c, double tolerance, at::Tensor& codes) {
  const int64_t K = scores.size(1);
  const scalar_t* input = scores.data_ptr<scalar_t>();
  const acc_t inv_epsilon = static_cast<acc_t>(1.0 / epsilon);
  RowSweeps<scalar_t, acc_t> sweeps(input, scores.size(0), K, inv_epsilon);
  // fp32 codes hold the kernel E until they are overwritten by the codes; other dtypes need a buffer.
  at::Tensor kernel = std::is_same_v<scalar_t, acc_t> ? codes : at::empty(scores.sizes(), log_r.options());
  acc_t* kernel_data = kernel.data_ptr<acc_t>();
  advise_huge_pages(kernel_data, kernel.nbytes());
  scalar_t* codes_data = codes.data_ptr<scalar_t>();
  const acc_t* log_col = log_c.data_ptr<acc_t>();
  const acc_t* w = sweeps.weights_.data();
  Iteration<acc_t> iteration{iterations, log_r.data_ptr<acc_t>(), tolerance, std::vector<acc_t>(K)};
  std::vector<acc_t> lse(K);
  enum class Sweep { kBuild, kLse, kCodes } sweep = Sweep::kBuild;
  acc_t alpha = 0;  // max a of the weights
  bool narrow = true;
  std::vector<acc_t> chunk_spans(sweeps.chunks_.count);  // the build sweep's widest row span per chunk
  sweeps.run(false,
      [&](int64_t chunk, int64_t begin, int64_t end, int thread) {
        if (sweep == Sweep::kBuild) {
          acc_t span = 0;
          sweeps.weighted_sums(chunk, begin, end, thread, [&](int64_t b, acc_t*) {
            acc_t high, low;
            scaled_range(input + b * K, inv_epsilon, K, high, low);
            span = std::max(span, high - low);
            acc_t* e = kernel_data + b * K;
            shifted_exp(input + b * K, inv_epsilon, high, K, e);
            return std::make_pair(static_cast<const acc_t*>(e), high);
          });
          chunk_spans[chunk] = span;
        } else if (sweep == Sweep::kLse) {
          sweeps.weighted_sums(chunk, begin, end, thread, [&](int64_t b, acc_t*) {
            const acc_t* e = kernel_data + b * K;
            return std::make_pair(e, log_col[b] - std::log(dot(e, w, K)) - alpha);
          });
        } else {  // E_bk w_k / Σ_k E_bk w_k into the codes (which may be E itself)
          for (int64_t b = begin; b < end; ++b) {
            const acc_t* e = kernel_data + b * K;
            scaled_product(e, w, acc_t(1) / dot(e, w, K), K, codes_data + b * K);
          }
        }
      },
      [&]() {
        if (sweep == Sweep::kBuild) {
          const acc_t max_span = -std::log(sqrt_tiny<acc_t>());  // reference.max_exp_span
          const acc_t span = *std::max_element(chunk_spans.begin(), chunk_spans.end());
          if (!(span <= max_span)) {
            narrow = false;
            return Next::kStop;
          }
        }
        const acc_t beta = sweeps.combine_weighted_sums(lse.data());
        for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + beta;
        const bool codes_next = iteration.codes_next(lse.data());
        alpha = sweeps.set_weights(iteration.a.data());
        sweep = codes_next ? Sweep::kCodes : Sweep::kLse;
        return codes_next ? Next::kFinalSweep : Next::kSweep;
      });
  return narrow;
}

// The log-domain path, in float64 for every input: with scores/ε of magnitude X, potentials
// of magnitude X cancel in x + a + v, and float32 would leave an error of X·2⁻²⁴ in the codes.
// Sweeps: one per row step (L after the column step with a, v stored), where a sum fell below
// sqrt(tiny) an exact column max and an exact column sum with the stored v, then the codes.
template <typename scalar_t>
void log_domain_sinkhorn(const at::Tensor& scores, int64_t iterations, double epsilon, const at::Tensor& log_r,
                         const at::Tensor& log_c, double tolerance, at::Tensor& codes) {
  const int64_t B = scores.size(0), K = scores.size(1);
  const scalar_t* input = scores.data_ptr<scalar_t>();
  const double inv_epsilon = 1.0 / epsilon;
  RowSweeps<scalar_t, double> sweeps(input, B, K, inv_epsilon);
  const at::Tensor log_row = log_r.to(at::kDouble), log_col_tensor = log_c.to(at::kDouble);
  const double* log_col = log_col_tensor.data_ptr<double>();
  scalar_t* codes_data = codes.data_ptr<scalar_t>();
  Iteration<double> iteration{iterations, log_row.data_ptr<double>(), tolerance, std::vector<double>(K, 0.0)};
  std::vector<double> lse(K), column_max(K), sample_potential(B);
  enum class Sweep { kLse, kColumnMax, kColumnSum, kCodes } sweep = Sweep::kLse;
  bool first = true;  // the first row step: v = 0 (a is zeros)
  const double* a = iteration.a.data();
  sweeps.run(false,
      [&](int64_t chunk, int64_t begin, int64_t end, int thread) {
        if (sweep == Sweep::kLse) {
          sweeps.weighted_sums(chunk, begin, end, thread, [&](int64_t b, double* e) {
            double row_max;
            const double row_sum = sweeps.exp_row(b, a, e, row_max);
            const double v = first ? 0.0 : log_col[b] - (row_max + std::log(row_sum));
            sample_potential[b] = v;
            return std::make_pair(static_cast<const double*>(e), row_max + v);
          });
        } else if (sweep == Sweep::kCodes) {  // softmax_k (x_bk + a_k)
          double* e = sweeps.row_buffer(thread);
          for (int64_t b = begin; b < end; ++b) {
            double row_max;
            const double inverse_sum = 1.0 / sweeps.exp_row(b, a, e, row_max);
            scalar_t* out = codes_data + b * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) out[k] = static_cast<scalar_t>(e[k] * inverse_sum);
          }
        } else {  // L_k = LSE_b (x_bk + v_b) exactly: the column max, then the sum below it
          double* partial = sweeps.chunk_sums(chunk);
          const bool max_sweep = sweep == Sweep::kColumnMax;
          std::fill(partial, partial + K, max_sweep ? -kInfinity<double> : 0.0);
          const double* shift = column_max.data();
          for (int64_t b = begin; b < end; ++b) {
            const scalar_t* row = input + b * K;
            const double v = sample_potential[b];
            if (max_sweep) {
#pragma omp simd
              for (int64_t k = 0; k < K; ++k) partial[k] = std::max(partial[k], static_cast<double>(row[k]) * inv_epsilon + v);
            } else {
#pragma omp simd
              for (int64_t k = 0; k < K; ++k) partial[k] += fast_exp(static_cast<double>(row[k]) * inv_epsilon + v - shift[k]);
            }
          }
        }
      },
      [&]() {
        if (sweep == Sweep::kColumnMax) {
          sweeps.combine_partials(column_max.data(), -kInfinity<double>, [](double x, double y) { return std::max(x, y); });
          for (auto& m : column_max) m = std::isfinite(m) ? m : 0.0;  // an all -inf column stays -inf
          sweep = Sweep::kColumnSum;
          return Next::kSweep;
        }
        if (sweep == Sweep::kColumnSum) {
          sweeps.combine_partials(lse.data(), 0.0, [](double x, double y) { return x + y; });
          for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + column_max[k];
        } else {
          const double beta = sweeps.combine_weighted_sums(lse.data());
          if (*std::min_element(lse.begin(), lse.end()) < sqrt_tiny<double>()) {  // some sum may have lost to underflow
            sweep = Sweep::kColumnMax;
            return Next::kSweep;
          }
          for (int64_t k = 0; k < K; ++k) lse[k] = std::log(lse[k]) + beta - a[k];
        }
        first = false;
        const bool codes_next = iteration.codes_next(lse.data());
        sweep = codes_next ? Sweep::kCodes : Sweep::kLse;
        return codes_next ? Next::kFinalSweep : Next::kSweep;
      });
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
