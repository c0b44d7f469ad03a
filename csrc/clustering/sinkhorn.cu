// Sinkhorn-Knopp in one persistent, cooperative launch: the iterations are separated by
// grid-wide barriers (cooperative_groups::this_grid().sync()) instead of kernel launches, which
// Triton cannot express. With x = scores / ε (B, K), potentials a (K) and v (B):
//   prototype pass  L_k = LSE_b (x_bk + v_b)   (v = 0 first),  a_k = log r_k − L_k
//   sample pass     v_b = log c_b − LSE_k (x_bk + a_k)
//   codes           Q_bk = softmax_k (x_bk + a_k) with the last a
// The prototype pass gives each thread one prototype and walks the B samples with an online
// max and sum (adjacent threads read adjacent columns: coalesced); the sample and codes passes
// give each block one sample at a time (grid-stride), with block reductions over K. L is
// double-buffered by iteration parity because an early stop (tolerance) keeps the previous a;
// so is the tolerance's error maximum, which is reset one pass before it is used again.
// Workspace: L (2K), v (B), error maxima (2). Arithmetic in T (float, or double). Nothing is
// saved: Sinkhorn has no gradient.
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
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kThreads;

  if (thread < 2) errors[thread] = 0;
  // The last prototype pass whose L gives the codes: stays at the final one unless stopped early.
  int64_t last = 0;
  for (int64_t iteration = 0; iteration < iterations; ++iteration) {
    const T* previous_lse = lse_buffers + ((iteration + 1) % 2) * n.prototypes;
    T* lse = lse_buffers + (iteration % 2) * n.prototypes;
    for (int64_t k = thread; k < n.prototypes; k += threads) {
      T running_max = negative_infinity<T>(), running_sum = 0;
      for (int64_t b = 0; b < n.batch; ++b) {
        const T x = scores[b * n.prototypes + k] * inv_epsilon + (iteration > 0 ? sample_potential[b] : T(0));
        if (x > running_max) {
          running_sum = running_sum * exp(running_max - x) + T(1);
          running_max = x;
        } else {
          running_sum += exp(x - running_max);
        }
      }
      lse[k] = running_max + log(running_sum);
      if (tolerance > 0 && iteration > 0) {
        const T error = fabs(exp(lse[k] - previous_lse[k]) - T(1));  // row total / r_k − 1
        atomic_max_non_negative(&errors[iteration % 2], error);
      }
    }
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
  return static_cast<size_t>(2 * prototypes + batch + 2);
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
  const int64_t useful = std::max<int64_t>(batch, (prototypes + kThreads - 1) / kThreads);
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
