// Sinkhorn-Knopp in one persistent, cooperative launch: the iterations are separated by
// grid-wide barriers (cooperative_groups::this_grid().sync()) instead of kernel launches, which
// Triton cannot express. With x = scores / ε (B, K), potentials a (K) and v (B):
//   prototype pass  L_k = LSE_b (x_bk + v_b)   (v = 0 first),  a_k = log r_k − L_k
//   sample pass     v_b = log c_b − LSE_k (x_bk + a_k)
//   codes           Q_bk = softmax_k (x_bk + a_k) with the last a
// The prototype pass gives each block a tile of 32 adjacent prototypes, one per lane (a warp
// reads 32 adjacent columns of a row: coalesced), and a range of samples that its 8 warps split,
// each keeping an online max and sum; the warps' are merged in shared memory. With fewer tiles
// than blocks (K = 3000: 94 tiles) the samples are also split over up to kMaxSampleSplits blocks,
// whose partial (max, sum) are merged after one more grid barrier. The sample and codes passes
// give each block one sample at a time (grid-stride), with block reductions over K. L is
// double-buffered by iteration parity because an early stop (tolerance) keeps the previous a;
// so is the tolerance's error maximum, which is reset one pass before it is used again.
// Workspace: L (2K), v (B), error maxima (2), partial maxima and sums (2 · kMaxSampleSplits · K).
// Arithmetic in T (float, or double). Nothing is saved: Sinkhorn has no gradient.
#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "sinkhorn.cuh"

namespace cg = cooperative_groups;

namespace fastssl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
// The prototype pass splits the samples over at most this many blocks, each taking at least
// kMinSamplesPerSplit of them (32 rows per warp), so that splitting pays for its merge.
constexpr int64_t kMaxSampleSplits = 16;
constexpr int64_t kMinSamplesPerSplit = 256;

// -inf without std::numeric_limits, whose members are host functions to nvcc.
template <typename T>
__device__ T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

// Non-negative floating-point numbers order like their bit patterns as signed integers.
__device__ void atomic_max_non_negative(float* address, float value) {
  atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}
__device__ void atomic_max_non_negative(double* address, double value) {
  atomicMax(reinterpret_cast<long long*>(address), __double_as_longlong(value));
}

template <typename T>
__device__ T warp_max(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = fmax(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

template <typename T>
__device__ T warp_sum(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Block-wide max or sum of one value per thread; every thread gets the result.
template <bool kMax, typename T>
__device__ T block_reduce(T value, T* shared) {
  value = kMax ? warp_max(value) : warp_sum(value);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  const T identity = kMax ? negative_infinity<T>() : T(0);
  value = threadIdx.x < kThreads / kWarp ? shared[threadIdx.x] : identity;
  value = kMax ? warp_max(value) : warp_sum(value);
  if (threadIdx.x == 0) shared[0] = value;
  __syncthreads();
  const T result = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return result;
}

struct Sizes {
  int64_t batch, prototypes;
};

// Fold x into a running max and sum of exp(· − max).
template <typename T>
__device__ void lse_add(T& running_max, T& running_sum, T x) {
  if (x > running_max) {
    running_sum = running_sum * exp(running_max - x) + T(1);
    running_max = x;
  } else {
    running_sum += exp(x - running_max);
  }
}

// Merge another running (max, sum) into one; a max of -inf (no samples seen) adds nothing.
template <typename T>
__device__ void lse_merge(T& running_max, T& running_sum, T other_max, T other_sum) {
  if (other_max == negative_infinity<T>()) return;
  if (other_max > running_max) {
    running_sum = running_sum * exp(running_max - other_max) + other_sum;
    running_max = other_max;
  } else {
    running_sum += other_sum * exp(other_max - running_max);
  }
}

// std::min is a host function to nvcc.
__device__ int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

__host__ __device__ int64_t prototype_tiles(int64_t prototypes) { return (prototypes + kWarp - 1) / kWarp; }

// How many blocks share a tile's samples: the blocks left over by the tiles, within the limits.
__device__ int64_t sample_splits(Sizes n, int64_t tiles) {
  const int64_t spare = static_cast<int64_t>(gridDim.x) / tiles;
  const int64_t worthwhile = (n.batch + kMinSamplesPerSplit - 1) / kMinSamplesPerSplit;
  const int64_t splits = smaller(smaller(spare, worthwhile), kMaxSampleSplits);
  return splits > 1 ? splits : 1;
}

// L_k = running_max + log(running_sum) and, with check_error, the tolerance's error of k
// (row total / r_k − 1 = exp(L_k − L_k of the previous pass) − 1) into the error maximum.
template <typename T>
__device__ void store_prototype_lse(int64_t k, T running_max, T running_sum, T* lse, const T* previous_lse,
                                    bool check_error, T* error) {
  lse[k] = running_max + log(running_sum);
  if (check_error) atomic_max_non_negative(error, fabs(exp(lse[k] - previous_lse[k]) - T(1)));
}

// The prototype pass L_k = LSE_b (x_bk + v_b) (v = 0 where sample_potential is null) into lse,
// tiled as the comment at the top says; partial holds the split blocks' (max, sum).
template <typename T>
__device__ void prototype_pass(const T* scores, Sizes n, T inv_epsilon, const T* sample_potential, T* partial,
                               T* lse, const T* previous_lse, bool check_error, T* error) {
  __shared__ T warp_max_of[kWarps][kWarp];
  __shared__ T warp_sum_of[kWarps][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t tiles = prototype_tiles(n.prototypes), splits = sample_splits(n, tiles);
  const int64_t per_split = (n.batch + splits - 1) / splits;
  T* partial_max = partial;
  T* partial_sum = partial + kMaxSampleSplits * n.prototypes;
  for (int64_t item = blockIdx.x; item < tiles * splits; item += gridDim.x) {
    const int64_t tile = item % tiles, split = item / tiles, k = tile * kWarp + lane;
    const int64_t end = smaller(n.batch, (split + 1) * per_split);
    T running_max = negative_infinity<T>(), running_sum = 0;
    if (k < n.prototypes) {
      for (int64_t b = split * per_split + warp; b < end; b += kWarps)
        lse_add(running_max, running_sum,
                scores[b * n.prototypes + k] * inv_epsilon + (sample_potential ? sample_potential[b] : T(0)));
    }
    warp_max_of[warp][lane] = running_max;
    warp_sum_of[warp][lane] = running_sum;
    __syncthreads();
    if (warp == 0 && k < n.prototypes) {
      for (int other = 1; other < kWarps; ++other)
        lse_merge(running_max, running_sum, warp_max_of[other][lane], warp_sum_of[other][lane]);
      if (splits == 1) {
        store_prototype_lse(k, running_max, running_sum, lse, previous_lse, check_error, error);
      } else {
        partial_max[split * n.prototypes + k] = running_max;
        partial_sum[split * n.prototypes + k] = running_sum;
      }
    }
    __syncthreads();  // the shared tiles are reused by the block's next item
  }
  if (splits == 1) return;  // grid-uniform: every block returns here, or every block syncs
  cg::this_grid().sync();
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t k = thread; k < n.prototypes; k += static_cast<int64_t>(gridDim.x) * kThreads) {
    T running_max = negative_infinity<T>(), running_sum = 0;
    for (int64_t split = 0; split < splits; ++split)
      lse_merge(running_max, running_sum, partial_max[split * n.prototypes + k], partial_sum[split * n.prototypes + k]);
    store_prototype_lse(k, running_max, running_sum, lse, previous_lse, check_error, error);
  }
}

// max_k (x_bk + a_k) and Σ_k exp(x_bk + a_k − max) of sample b, a_k = log r_k − L_k.
template <typename T>
__device__ void sample_lse_terms(const T* scores, Sizes n, int64_t b, T inv_epsilon, const T* log_r, const T* lse,
                                 T* shared, T& row_max, T& row_sum) {
  const T* row = scores + b * n.prototypes;
  T local_max = negative_infinity<T>();
  for (int64_t k = threadIdx.x; k < n.prototypes; k += kThreads)
    local_max = fmax(local_max, row[k] * inv_epsilon + log_r[k] - lse[k]);
  row_max = block_reduce<true>(local_max, shared);
  T local_sum = 0;
  for (int64_t k = threadIdx.x; k < n.prototypes; k += kThreads)
    local_sum += exp(row[k] * inv_epsilon + log_r[k] - lse[k] - row_max);
  row_sum = block_reduce<false>(local_sum, shared);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sinkhorn_kernel(const T* __restrict__ scores, Sizes n,
                                                            int64_t iterations, T inv_epsilon,
                                                            const T* __restrict__ log_r,
                                                            const T* __restrict__ log_c, T tolerance,
                                                            T* __restrict__ workspace, T* __restrict__ codes) {
  cg::grid_group grid = cg::this_grid();
  __shared__ T shared[kThreads / kWarp];
  T* lse_buffers = workspace;                      // (2, K)
  T* sample_potential = workspace + 2 * n.prototypes;  // (B)
  T* errors = sample_potential + n.batch;          // (2)
  T* partial = errors + 2;                         // (2, kMaxSampleSplits, K)
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;

  if (thread < 2) errors[thread] = 0;
  // The last prototype pass whose L gives the codes: stays at the final one unless stopped early.
  int64_t last = 0;
  for (int64_t iteration = 0; iteration < iterations; ++iteration) {
    const T* previous_lse = lse_buffers + ((iteration + 1) % 2) * n.prototypes;
    T* lse = lse_buffers + (iteration % 2) * n.prototypes;
    prototype_pass(scores, n, inv_epsilon, iteration > 0 ? sample_potential : nullptr, partial, lse, previous_lse,
                   tolerance > 0 && iteration > 0, &errors[iteration % 2]);
    grid.sync();
    if (tolerance > 0 && iteration > 0 && errors[iteration % 2] < tolerance) {
      last = iteration - 1;  // the codes use the potential a of the previous prototype pass
      break;
    }
    last = iteration;
    if (iteration == iterations - 1) break;
    if (thread == 0) errors[(iteration + 1) % 2] = 0;
    for (int64_t b = blockIdx.x; b < n.batch; b += gridDim.x) {
      T row_max, row_sum;
      sample_lse_terms(scores, n, b, inv_epsilon, log_r, lse, shared, row_max, row_sum);
      if (threadIdx.x == 0) sample_potential[b] = log_c[b] - row_max - log(row_sum);
    }
    grid.sync();
  }

  const T* lse = lse_buffers + (last % 2) * n.prototypes;
  for (int64_t b = blockIdx.x; b < n.batch; b += gridDim.x) {
    T row_max, row_sum;
    sample_lse_terms(scores, n, b, inv_epsilon, log_r, lse, shared, row_max, row_sum);
    const T* row = scores + b * n.prototypes;
    T* out = codes + b * n.prototypes;
    for (int64_t k = threadIdx.x; k < n.prototypes; k += kThreads)
      out[k] = exp(row[k] * inv_epsilon + log_r[k] - lse[k] - row_max) / row_sum;
  }
}

}  // namespace

size_t sinkhorn_workspace_elements(int64_t batch, int64_t prototypes) {
  return static_cast<size_t>(2 * prototypes + batch + 2 + 2 * kMaxSampleSplits * prototypes);
}

template <typename T>
cudaError_t sinkhorn(const T* scores, int64_t batch, int64_t prototypes, int64_t iterations, T inv_epsilon,
                     const T* log_row_marginals, const T* log_col_marginals, T tolerance, T* workspace,
                     T* codes, cudaStream_t stream) {
  if (batch == 0 || prototypes == 0) return cudaSuccess;
  int device = 0, processors = 0, blocks_per_processor = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess)
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_processor, sinkhorn_kernel<T>, kThreads, 0);
  if (status != cudaSuccess) return status;
  // Every block must be resident for the grid barrier; more blocks than work would only wait.
  const int64_t useful = std::max<int64_t>(batch, prototype_tiles(prototypes) * kMaxSampleSplits);
  const int blocks = static_cast<int>(std::min<int64_t>(useful, static_cast<int64_t>(processors) * blocks_per_processor));
  Sizes sizes{batch, prototypes};
  void* arguments[] = {&scores, &sizes, &iterations, &inv_epsilon, &log_row_marginals,
                       &log_col_marginals, &tolerance, &workspace, &codes};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(sinkhorn_kernel<T>), dim3(blocks), dim3(kThreads),
                                     arguments, 0, stream);
}

template cudaError_t sinkhorn<float>(const float*, int64_t, int64_t, int64_t, float, const float*, const float*, float,
                                     float*, float*, cudaStream_t);
template cudaError_t sinkhorn<double>(const double*, int64_t, int64_t, int64_t, double, const double*, const double*,
                                      double, double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace fastssl
