// CUDA implementation of fastssl::sinkhorn_native (the op is defined in sinkhorn_cpu.cpp):
// checks, allocation and the stream, around the torch-free launcher of sinkhorn.cu. Built only
// when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sinkhorn.cuh"

namespace fastssl {
namespace {

at::Tensor sinkhorn_cuda(const at::Tensor& scores, int64_t iterations, double epsilon, const at::Tensor& log_r,
                         const at::Tensor& log_c, double tolerance) {
  TORCH_CHECK(scores.dim() == 2, "sinkhorn_native: scores must be (B, K), got ", scores.sizes());
  TORCH_CHECK(iterations >= 1, "sinkhorn_native: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(epsilon > 0, "sinkhorn_native: epsilon must be > 0, got ", epsilon);
  TORCH_CHECK(log_r.dim() == 1 && log_r.size(0) == scores.size(1) && log_c.dim() == 1 &&
                  log_c.size(0) == scores.size(0),
              "sinkhorn_native: log_row_marginals (K,) and log_col_marginals (B,) must match scores ",
              scores.sizes(), ", got ", log_r.sizes(), " and ", log_c.sizes());
  const c10::cuda::CUDAGuard guard(scores.device());
  // fp16/bf16 scores are upcast: the kernel's arithmetic and workspace are float32.
  const auto dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor input = scores.to(dtype).contiguous();
  const at::Tensor log_row = log_r.to(dtype).contiguous(), log_col = log_c.to(dtype).contiguous();
  at::Tensor codes = at::empty_like(input);
  const int64_t batch = input.size(0), prototypes = input.size(1);
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::sinkhorn_workspace_elements(batch, prototypes))},
                                   input.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "sinkhorn_native_cuda", [&] {
    const cudaError_t status = cuda::sinkhorn<scalar_t>(
        input.data_ptr<scalar_t>(), batch, prototypes, iterations, static_cast<scalar_t>(1.0 / epsilon),
        log_row.data_ptr<scalar_t>(), log_col.data_ptr<scalar_t>(), static_cast<scalar_t>(tolerance),
        workspace.data_ptr<scalar_t>(), codes.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(status == cudaSuccess, "sinkhorn_native: CUDA launch failed: ", cudaGetErrorString(status));
  });
  return codes.to(scores.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) { m.impl("sinkhorn_native", &sinkhorn_cuda); }

}  // namespace fastssl
