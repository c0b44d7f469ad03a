// fastssl::barlow_twins_gram_forward / fastssl::barlow_twins_gram_backward on CPU: Barlow
// Twins by the Gram algorithm of fastssl/redundancy/torch_backend.py, with everything but the GEMMs fused
// into passes over column blocks that stay in cache.
//
// With a, b the batch-normalised (N, D) views (biased variance, eps 1e-5), c_k = Σ_n a_nk b_nk / N
// the diagonal of C = aᵀb / N, and the N×N Grams Ga = a aᵀ, Gb = b bᵀ:
//   L      = Σ_k (1 − c_k)² + λ (⟨Ga, Gb⟩_F / N² − Σ_k c_k²)
//   ∂L/∂a  = (2/N) ((c − 1) − λc) ⊙ b + (2λ/N²) Gb a                     (and a ↔ b)
//   ∂L/∂za = rstd ⊙ (g − mean_n g − a ⊙ mean_n(g ⊙ a))                   (batch norm's backward)
// The columns are taken kBlockColumns at a time. Forward, per block: one read of za, zb (column sums, and a
// packed fp32/fp64 copy), the corrected two-pass variance on the copy, the normalisation in place
// with the diagonal, then Ga += a aᵀ and Gb += b bᵀ (at::mm/addmm_, only the row blocks on and
// above the diagonal, as redundancy.gram does). Backward, per block: one read of za, zb
// recomputes a, b and starts g = coef ⊙ b (⊙ a), g += (2λ/N²) Gb a (addmm_), the column means of
// g and g ⊙ a, and one write of dz. Blocks are split over threads (each with its own buffers and,
// forward, its own Grams, summed at the end); the GEMMs of a block run on its thread.
// Each view is normalised as ((z − m) − δ) · rstd, m its rounded column mean and δ = mean(z − m),
// as the torch backend's _batch_normalize: z − m is exact for a feature far from zero (Sterbenz),
// so a's columns sum to zero to the rounding of small numbers, which batch norm's backward formula
// assumes; (z − m) · rstd alone leaves a column mean of m's rounding (an ulp of 300 is 3% of a
// feature at 300 ± 1e-3) and put 7e-4 relative error on that gradient.
// Saved for the backward (the torch backend's layout): stats (5, D) = [δ_a, rstd_a, δ_b,
// rstd_b, c] and products (2, N, N) = [Ga, Gb]; the backward recomputes m as the forward did. Arithmetic in float32 (fp16/bf16/fp32 inputs) or
// float64; gradients in the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastssl {
namespace {

using at::Tensor;

constexpr double kBatchNormEps = 1e-5;  // lightly's F.batch_norm default (redundancy.BATCH_NORM_EPS)
// Columns per block: a block of both views and its buffers (4 N W values backward) stays in the
// L2 cache at N = 256; 128-512 measured within noise of each other at N = 256, D = 8192.
constexpr int64_t kBlockColumns = 256;
// Rows per GEMM of a Gram matrix (redundancy.GRAM_BLOCK).
constexpr int64_t kGramBlock = 256;
// The rows of a block lie D values apart, each in another page, where the hardware prefetcher
// does not follow: the passes that read or write them in memory prefetch this many rows ahead.
constexpr int64_t kPrefetchRows = 8;

// Columns are swept in strips of kStrip values (128 bytes of accumulators per array: 2 AVX-512 or
// 4 AVX2 registers, which gcc keeps in registers when the strip width is a compile-time
// constant); the last strip of a block has a run-time width.
template <typename acc_t>
constexpr int64_t kStrip = 128 / sizeof(acc_t);

template <typename acc_t, typename Body>
inline void for_strips(int64_t w, Body body) {
  constexpr int64_t S = kStrip<acc_t>;
  int64_t s0 = 0;
  for (; s0 + S <= w; s0 += S) body(std::integral_constant<int64_t, S>{}, s0);
  if (s0 < w) body(w - s0, s0);
}

template <int kWrite, typename T>
inline void prefetch_row(const T* base, int64_t ld, int64_t r, int64_t n, int64_t w) {
  if (r + kPrefetchRows >= n) return;
  const char* p = reinterpret_cast<const char*>(base + (r + kPrefetchRows) * ld);
  for (int64_t i = 0; i < w * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(p + i, kWrite, 3);
}

// mean_k = Σ_r z[r, k] / n, and the packed copy p[r, k] = z[r, k] (stride ldp); z is read row by row.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void column_means(const scalar_t* __restrict z, int64_t ldz, int64_t n, int64_t w,
                                            acc_t* __restrict mean, acc_t* __restrict p, int64_t ldp) {
  for (int64_t k = 0; k < w; ++k) mean[k] = 0;
  for (int64_t r = 0; r < n; ++r) {
    prefetch_row<0>(z, ldz, r, n, w);
    const scalar_t* row = z + r * ldz;
    acc_t* out = p + r * ldp;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      const acc_t value = static_cast<acc_t>(row[k]);
      out[k] = value;
      mean[k] += value;
    }
  }
  for (int64_t k = 0; k < w; ++k) mean[k] /= n;
}

// shift_k = Σ(x − m) / n, what the rounded mean m left, and rstd_k = 1 / sqrt(var_k + eps) of the
// packed block x (stride ld), with the biased variance by the corrected two-pass algorithm
// (Σ(x − m)² − (Σ(x − m))² / n) / n.
template <typename acc_t>
__attribute__((noinline)) void column_rstd(const acc_t* __restrict x, int64_t ld, int64_t n, int64_t w,
                                           const acc_t* __restrict mean, acc_t* __restrict shift,
                                           acc_t* __restrict rstd) {
  for_strips<acc_t>(w, [&](auto width, int64_t s0) {
    const int64_t W = width;
    constexpr int64_t S = kStrip<acc_t>;
    acc_t m[S], s1[S], s2[S];
    for (int64_t k = 0; k < W; ++k) m[k] = mean[s0 + k], s1[k] = 0, s2[k] = 0;
    for (int64_t r = 0; r < n; ++r) {
      const acc_t* row = x + r * ld + s0;
#pragma omp simd
      for (int64_t k = 0; k < W; ++k) {
        const acc_t d = row[k] - m[k];
        s1[k] += d;
        s2[k] += d * d;
      }
    }
    for (int64_t k = 0; k < W; ++k) {
      shift[s0 + k] = s1[k] / n;
      rstd[s0 + k] = acc_t(1) / std::sqrt((s2[k] - s1[k] * s1[k] / n) / n + acc_t(kBatchNormEps));
    }
  });
}

// In place on the packed blocks (stride ld): a = ((a − ma) − sa) ra, b = ((b − mb) − sb) rb;
// diag_k = Σ_r a b / n.
template <typename acc_t>
__attribute__((noinline)) void normalise_pair(acc_t* __restrict a, acc_t* __restrict b, int64_t ld, int64_t n, int64_t w,
                                              const acc_t* __restrict ma, const acc_t* __restrict sa,
                                              const acc_t* __restrict ra, const acc_t* __restrict mb,
                                              const acc_t* __restrict sb, const acc_t* __restrict rb,
                                              acc_t* __restrict diag) {
  for_strips<acc_t>(w, [&](auto width, int64_t s0) {
    const int64_t W = width;
    constexpr int64_t S = kStrip<acc_t>;
    acc_t mean_a[S], shift_a[S], rstd_a[S], mean_b[S], shift_b[S], rstd_b[S], dot[S];
    for (int64_t k = 0; k < W; ++k) {
      mean_a[k] = ma[s0 + k], shift_a[k] = sa[s0 + k], rstd_a[k] = ra[s0 + k];
      mean_b[k] = mb[s0 + k], shift_b[k] = sb[s0 + k], rstd_b[k] = rb[s0 + k], dot[k] = 0;
    }
    for (int64_t r = 0; r < n; ++r) {
      acc_t *row_a = a + r * ld + s0, *row_b = b + r * ld + s0;
#pragma omp simd
      for (int64_t k = 0; k < W; ++k) {
        const acc_t value_a = ((row_a[k] - mean_a[k]) - shift_a[k]) * rstd_a[k];
        const acc_t value_b = ((row_b[k] - mean_b[k]) - shift_b[k]) * rstd_b[k];
        row_a[k] = value_a;
        row_b[k] = value_b;
        dot[k] += value_a * value_b;
      }
    }
    for (int64_t k = 0; k < W; ++k) diag[s0 + k] = dot[k] / n;
  });
}

// Backward's first pass (za, zb read row by row): a, b recomputed into the buffers (stride ldo)
// and the gradients started with their diagonal terms, ga = coef ⊙ b, gb = coef ⊙ a.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void recompute_and_start(const scalar_t* __restrict za, const scalar_t* __restrict zb,
                                                   int64_t ldz, int64_t n, int64_t w, const acc_t* __restrict ma,
                                                   const acc_t* __restrict sa, const acc_t* __restrict ra,
                                                   const acc_t* __restrict mb, const acc_t* __restrict sb,
                                                   const acc_t* __restrict rb, const acc_t* __restrict coef,
                                                   acc_t* __restrict a, acc_t* __restrict b, acc_t* __restrict ga,
                                                   acc_t* __restrict gb, int64_t ldo) {
  for (int64_t r = 0; r < n; ++r) {
    prefetch_row<0>(za, ldz, r, n, w);
    prefetch_row<0>(zb, ldz, r, n, w);
    const scalar_t *row_a = za + r * ldz, *row_b = zb + r * ldz;
    const int64_t o = r * ldo;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      const acc_t value_a = ((static_cast<acc_t>(row_a[k]) - ma[k]) - sa[k]) * ra[k];
      const acc_t value_b = ((static_cast<acc_t>(row_b[k]) - mb[k]) - sb[k]) * rb[k];
      a[o + k] = value_a;
      b[o + k] = value_b;
      ga[o + k] = coef[k] * value_b;
      gb[o + k] = coef[k] * value_a;
    }
  }
}

// Batch norm's backward of the block: mean_g = Σ_r g / n and mean_ga = Σ_r g a / n by strips
// (in cache), then dz = rstd (g − mean_g − a mean_ga) written row by row.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void batch_norm_backward(const acc_t* __restrict g, const acc_t* __restrict a, int64_t ld,
                                                   int64_t n, int64_t w, const acc_t* __restrict rstd,
                                                   acc_t* __restrict mean_g, acc_t* __restrict mean_ga,
                                                   scalar_t* __restrict dz, int64_t ldz) {
  for_strips<acc_t>(w, [&](auto width, int64_t s0) {
    const int64_t W = width;
    constexpr int64_t S = kStrip<acc_t>;
    acc_t s1[S], s2[S];
    for (int64_t k = 0; k < W; ++k) s1[k] = 0, s2[k] = 0;
    for (int64_t r = 0; r < n; ++r) {
      const acc_t *row_g = g + r * ld + s0, *row_a = a + r * ld + s0;
#pragma omp simd
      for (int64_t k = 0; k < W; ++k) {
        s1[k] += row_g[k];
        s2[k] += row_g[k] * row_a[k];
      }
    }
    for (int64_t k = 0; k < W; ++k) mean_g[s0 + k] = s1[k] / n, mean_ga[s0 + k] = s2[k] / n;
  });
  for (int64_t r = 0; r < n; ++r) {
    prefetch_row<1>(dz, ldz, r, n, w);
    scalar_t* out = dz + r * ldz;
    const acc_t *row_g = g + r * ld, *row_a = a + r * ld;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k)
      out[k] = static_cast<scalar_t>(rstd[k] * (row_g[k] - mean_g[k] - row_a[k] * mean_ga[k]));
  }
}

// gram (M, M) (+)= x xᵀ for x (M, w), only the row blocks on and above the diagonal.
void gram_accumulate(const Tensor& gram, const Tensor& x, bool first) {
  const int64_t rows = x.size(0);
  for (int64_t start = 0; start < rows; start += kGramBlock) {
    const int64_t stop = std::min(start + kGramBlock, rows);
    Tensor out = gram.slice(0, start, stop).slice(1, start);
    const Tensor lhs = x.slice(0, start, stop), rhs = x.slice(0, start).t();
    if (first) at::mm_out(out, lhs, rhs);
    else out.addmm_(lhs, rhs);
  }
}

// The blocks below the diagonal, copied from those above.
void gram_mirror(const Tensor& gram) {
  const int64_t rows = gram.size(0);
  for (int64_t start = 0; start < rows; start += kGramBlock) {
    const int64_t stop = std::min(start + kGramBlock, rows);
    gram.slice(0, stop).slice(1, start, stop).copy_(gram.slice(0, start, stop).slice(1, stop).t());
  }
}

// (rows, w) view of the front of a flat buffer.
Tensor packed(const Tensor& buffer, int64_t rows, int64_t w) { return buffer.narrow(0, 0, rows * w).view({rows, w}); }

int64_t block_count(int64_t d) { return (d + kBlockColumns - 1) / kBlockColumns; }

template <typename scalar_t, typename acc_t>
std::tuple<Tensor, Tensor, Tensor> barlow_forward(const Tensor& za, const Tensor& zb, double lambda) {
  const int64_t n = za.size(0), d = za.size(1), blocks = block_count(d);
  const auto options = za.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor stats = at::empty({5, d}, options), products = at::empty({2, n, n}, options);
  acc_t* st = stats.data_ptr<acc_t>();
  acc_t *shift_a = st, *rstd_a = st + d, *shift_b = st + 2 * d, *rstd_b = st + 3 * d, *diag = st + 4 * d;
  const scalar_t *pa = za.data_ptr<scalar_t>(), *pb = zb.data_ptr<scalar_t>();
  // The blocks in `parts` contiguous runs, one per thread, each summing its own Grams (the first
  // run into `products`), added up after the parallel loop.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  Tensor more_grams = at::empty({parts - 1, 2, n, n}, options);
  at::parallel_for(0, parts, 1, [&](int64_t first_part, int64_t end_part) {
    Tensor buffers = at::empty({2, n * std::min(kBlockColumns, d)}, options);
    std::vector<acc_t> rounded(2 * kBlockColumns);  // the block's rounded column means of a, then b
    acc_t *mean_a = rounded.data(), *mean_b = mean_a + kBlockColumns;
    for (int64_t part = first_part; part < end_part; ++part) {
      const Tensor grams = part == 0 ? products : more_grams[part - 1];
      const int64_t first_block = blocks * part / parts, end_block = blocks * (part + 1) / parts;
      for (int64_t block = first_block; block < end_block; ++block) {
        const int64_t k = block * kBlockColumns, w = std::min(kBlockColumns, d - k);
        Tensor a = packed(buffers[0], n, w), b = packed(buffers[1], n, w);
        acc_t *a_ptr = a.data_ptr<acc_t>(), *b_ptr = b.data_ptr<acc_t>();
        column_means(pa + k, d, n, w, mean_a, a_ptr, w);
        column_rstd(a_ptr, w, n, w, mean_a, shift_a + k, rstd_a + k);
        column_means(pb + k, d, n, w, mean_b, b_ptr, w);
        column_rstd(b_ptr, w, n, w, mean_b, shift_b + k, rstd_b + k);
        normalise_pair(a_ptr, b_ptr, w, n, w, mean_a, shift_a + k, rstd_a + k, mean_b, shift_b + k, rstd_b + k,
                       diag + k);
        gram_accumulate(grams[0], a, block == first_block);
        gram_accumulate(grams[1], b, block == first_block);
      }
    }
  });
  if (blocks == 0) products.zero_();
  if (parts > 1) products.add_(more_grams.sum(0));
  gram_mirror(products[0]);
  gram_mirror(products[1]);
  double diagonal_term = 0, diagonal_squares = 0;
  for (int64_t k = 0; k < d; ++k) {
    diagonal_term += (1.0 - diag[k]) * (1.0 - diag[k]);
    diagonal_squares += static_cast<double>(diag[k]) * diag[k];
  }
  const double squared_norm = at::dot(products[0].flatten(), products[1].flatten()).item<double>() / (double(n) * n);
  Tensor loss = at::scalar_tensor(diagonal_term + lambda * (squared_norm - diagonal_squares), options);
  return {loss, stats, products};
}

template <typename scalar_t, typename acc_t>
std::tuple<Tensor, Tensor> barlow_backward(const Tensor& grad, const Tensor& stats, const Tensor& products,
                                           const Tensor& za, const Tensor& zb, double lambda) {
  const int64_t n = za.size(0), d = za.size(1);
  const auto options = stats.options();
  const double g = grad.item<double>();
  const acc_t* st = stats.data_ptr<acc_t>();
  const acc_t *shift_a = st, *rstd_a = st + d, *shift_b = st + 2 * d, *rstd_b = st + 3 * d, *diag = st + 4 * d;
  Tensor work = at::empty({5, d}, options);
  // coef, then per view the column means of its gradient g and of g ⊙ (its normalised view).
  acc_t *coef = work.data_ptr<acc_t>(), *mean_ga = coef + d, *mean_gaa = coef + 2 * d, *mean_gb = coef + 3 * d,
        *mean_gbb = coef + 4 * d;
  for (int64_t k = 0; k < d; ++k) coef[k] = static_cast<acc_t>(2 * ((diag[k] - 1) - lambda * diag[k]) / n * g);
  const Tensor scaled = products * (2 * lambda / (double(n) * n) * g);
  const Tensor scaled_a = scaled[0], scaled_b = scaled[1];
  Tensor dza = at::empty_like(za), dzb = at::empty_like(zb);
  const scalar_t *pa = za.data_ptr<scalar_t>(), *pb = zb.data_ptr<scalar_t>();
  scalar_t *da = dza.data_ptr<scalar_t>(), *db = dzb.data_ptr<scalar_t>();
  at::parallel_for(0, block_count(d), 1, [&](int64_t first_block, int64_t end_block) {
    Tensor buffers = at::empty({4, n * std::min(kBlockColumns, d)}, options);
    std::vector<acc_t> rounded(2 * kBlockColumns);  // the forward's rounded column means, recomputed
    acc_t *mean_a = rounded.data(), *mean_b = mean_a + kBlockColumns;
    for (int64_t block = first_block; block < end_block; ++block) {
      const int64_t k = block * kBlockColumns, w = std::min(kBlockColumns, d - k);
      Tensor a = packed(buffers[0], n, w), b = packed(buffers[1], n, w);
      Tensor ga = packed(buffers[2], n, w), gb = packed(buffers[3], n, w);
      acc_t *a_ptr = a.data_ptr<acc_t>(), *b_ptr = b.data_ptr<acc_t>();
      acc_t *ga_ptr = ga.data_ptr<acc_t>(), *gb_ptr = gb.data_ptr<acc_t>();
      // the forward's rounded means, bit for bit (same code, same block); the packed copies they
      // leave in a and b are overwritten by the recomputed views
      column_means(pa + k, d, n, w, mean_a, a_ptr, w);
      column_means(pb + k, d, n, w, mean_b, b_ptr, w);
      recompute_and_start(pa + k, pb + k, d, n, w, mean_a, shift_a + k, rstd_a + k, mean_b, shift_b + k, rstd_b + k,
                          coef + k, a_ptr, b_ptr, ga_ptr, gb_ptr, w);
      ga.addmm_(scaled_b, a);
      gb.addmm_(scaled_a, b);
      batch_norm_backward(ga_ptr, a_ptr, w, n, w, rstd_a + k, mean_ga + k, mean_gaa + k, da + k, d);
      batch_norm_backward(gb_ptr, b_ptr, w, n, w, rstd_b + k, mean_gb + k, mean_gbb + k, db + k, d);
    }
  });
  return {dza, dzb};
}

void check_views(const char* op, const Tensor& za, const Tensor& zb) {
  TORCH_CHECK(za.dim() == 2 && za.sizes() == zb.sizes(), op, ": z_a and z_b must be (N, D) of one shape, got ",
              za.sizes(), " and ", zb.sizes());
  TORCH_CHECK(za.scalar_type() == zb.scalar_type(), op, ": z_a and z_b must have one dtype, got ", za.scalar_type(),
              " and ", zb.scalar_type());
  TORCH_CHECK(za.size(0) >= 1, op, ": the batch is empty");
}

std::tuple<Tensor, Tensor, Tensor> barlow_twins_gram_forward_cpu(const Tensor& z_a, const Tensor& z_b,
                                                                 double lambda_param) {
  check_views("barlow_twins_gram_forward", z_a, z_b);
  const Tensor za = z_a.contiguous(), zb = z_b.contiguous();
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "barlow_twins_gram_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = barlow_forward<scalar_t, acc_t>(za, zb, lambda_param);
  });
  return out;
}

std::tuple<Tensor, Tensor> barlow_twins_gram_backward_cpu(const Tensor& grad, const Tensor& stats,
                                                          const Tensor& products, const Tensor& z_a, const Tensor& z_b,
                                                          double lambda_param) {
  check_views("barlow_twins_gram_backward", z_a, z_b);
  const int64_t n = z_a.size(0), d = z_a.size(1);
  const auto acc_dtype = z_a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.scalar_type() == acc_dtype && products.scalar_type() == acc_dtype,
              "barlow_twins_gram_backward: stats and products must be ", acc_dtype, ", got ", stats.scalar_type(),
              " and ", products.scalar_type());
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({5, d}) && products.sizes() == at::IntArrayRef({2, n, n}),
              "barlow_twins_gram_backward: stats (5, D) and products (2, N, N) must match z_a ", z_a.sizes(),
              ", got ", stats.sizes(), " and ", products.sizes());
  TORCH_CHECK(grad.numel() == 1, "barlow_twins_gram_backward: grad must hold one value, got ", grad.sizes());
  const Tensor za = z_a.contiguous(), zb = z_b.contiguous();
  const Tensor saved_stats = stats.contiguous(), saved_products = products.contiguous();
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za.scalar_type(), "barlow_twins_gram_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = barlow_backward<scalar_t, acc_t>(grad, saved_stats, saved_products, za, zb, lambda_param);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.set_python_module("fastssl.redundancy.native_backend");
  m.def("barlow_twins_gram_forward(Tensor z_a, Tensor z_b, float lambda_param) -> (Tensor, Tensor, Tensor)");
  m.def("barlow_twins_gram_backward(Tensor grad, Tensor stats, Tensor products, Tensor z_a, Tensor z_b, "
        "float lambda_param) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastssl, CPU, m) {
  m.impl("barlow_twins_gram_forward", &barlow_twins_gram_forward_cpu);
  m.impl("barlow_twins_gram_backward", &barlow_twins_gram_backward_cpu);
}

}  // namespace fastssl
