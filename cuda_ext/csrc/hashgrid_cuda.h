// Launchers of the CUDA hash-grid kernels: raw device pointers, sizes and a stream, no torch.
// All pointers are device pointers; `stream` is a cudaStream_t passed as void*.
#pragma once

#include <cstdint>

namespace hashgrid {

// out (n, n_levels * n_features) = encoding of x (n, 3).
void forward_cuda(const float* x, const float* params, const int32_t* offsets, const float* scales,
                  int64_t n, int n_levels, int n_features, float* out, void* stream);

// grad_params += d loss / d params, by atomic adds (zeroed by the caller for a fresh gradient).
void backward_params_cuda(const float* x, const float* grad_out, const int32_t* offsets, const float* scales,
                          int64_t n, int n_levels, int n_features, float* grad_params, void* stream);

// grad_x (n, 3) = d loss / d x.
void backward_input_cuda(const float* x, const float* params, const float* grad_out, const int32_t* offsets,
                         const float* scales, int64_t n, int n_levels, int n_features, float* grad_x,
                         void* stream);

// The last CUDA error as text, or nullptr when there is none (clears it).
const char* last_error_cuda();

}  // namespace hashgrid
