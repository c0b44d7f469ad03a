// The CUDA Sinkhorn-Knopp of fastssl, without torch: raw device pointers and a stream, so that
// this header and sinkhorn.cu compile with nvcc alone (binding.cpp wraps them as a torch op).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastssl {
namespace cuda {

// Elements of T that `sinkhorn` needs as workspace for (batch, prototypes) scores.
size_t sinkhorn_workspace_elements(int64_t batch, int64_t prototypes);

// Codes (batch, prototypes) of the log-domain Sinkhorn-Knopp iteration of
// fastssl.reference.sinkhorn on row-major scores (batch, prototypes), in one cooperative
// launch. log_row_marginals (prototypes) and log_col_marginals (batch) are normalised logs;
// iterations >= 1; tolerance > 0 stops early (see reference.sinkhorn). T is float or double.
template <typename T>
cudaError_t sinkhorn(const T* scores, int64_t batch, int64_t prototypes, int64_t iterations, T inv_epsilon,
                     const T* log_row_marginals, const T* log_col_marginals, T tolerance, T* workspace,
                     T* codes, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastssl
