// CUDA build of the hash-grid encoding.  No torch headers: raw pointers, sizes and a stream, so
// `nvcc -c -arch=sm_90 -std=c++17 hashgrid_cuda.cu -o /dev/null` checks it on any machine.
// The per-point math is hashgrid_math.h, shared with the CPU build.
//
// Launch shape (as tiny-cuda-nn): blockIdx.y is the level, so all threads of a block read the
// same level's table and it stays in L2 while the block's points visit it.
#include <cuda_runtime.h>

#include <type_traits>

#include "hashgrid_cuda.h"
#include "hashgrid_math.h"

namespace hashgrid {
namespace {

constexpr int kThreads = 256;

template <int F>
__global__ void forward_kernel(const float* __restrict__ x, const float* __restrict__ params,
                               const int32_t* __restrict__ offsets, const float* __restrict__ scales, int64_t n,
                               int n_levels, float* __restrict__ out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint32_t l = blockIdx.y;
    const Level lv = make_level(offsets, scales, l);
    Corners c;
    const float xyz[3] = {x[3 * i], x[3 * i + 1], x[3 * i + 2]};
    cell_corners(lv, xyz, c);
    level_forward<F>(c, params + (size_t)lv.offset * F, out + i * n_levels * F + l * F);
}

struct AtomicAdd {
    __device__ void operator()(float* p, float v) const { atomicAdd(p, v); }
};

template <int F>
__global__ void backward_params_kernel(const float* __restrict__ x, const float* __restrict__ grad_out,
                                       const int32_t* __restrict__ offsets, const float* __restrict__ scales,
                                       int64_t n, int n_levels, float* __restrict__ grad_params) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint32_t l = blockIdx.y;
    const Level lv = make_level(offsets, scales, l);
    Corners c;
    const float xyz[3] = {x[3 * i], x[3 * i + 1], x[3 * i + 2]};
    cell_corners(lv, xyz, c);
    level_backward<F>(c, grad_out + i * n_levels * F + l * F, grad_params + (size_t)lv.offset * F, AtomicAdd{});
}

template <int F>
__global__ void backward_input_kernel(const float* __restrict__ x, const float* __restrict__ params,
                                      const float* __restrict__ grad_out, const int32_t* __restrict__ offsets,
                                      const float* __restrict__ scales, int64_t n, int n_levels,
                                      float* __restrict__ grad_x) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float xyz[3] = {x[3 * i], x[3 * i + 1], x[3 * i + 2]};
    float dx[3] = {0.0f, 0.0f, 0.0f};
    for (int l = 0; l < n_levels; ++l) {
        const Level lv = make_level(offsets, scales, l);
        Corners c;
        cell_corners(lv, xyz, c);
        level_backward_input<F>(lv, c, params + (size_t)lv.offset * F, grad_out + i * n_levels * F + l * F, dx);
    }
    for (int d = 0; d < 3; ++d) grad_x[3 * i + d] = dx[d];
}

// Calls launch(std::integral_constant<int, F>) for the runtime feature count (1, 2, 4 or 8).
template <typename Launch>
void dispatch_features(int n_features, Launch&& launch) {
    switch (n_features) {
        case 1: launch(std::integral_constant<int, 1>{}); break;
        case 2: launch(std::integral_constant<int, 2>{}); break;
        case 4: launch(std::integral_constant<int, 4>{}); break;
        case 8: launch(std::integral_constant<int, 8>{}); break;
        default: break;  // validated by the binding
    }
}

dim3 grid_for(int64_t n, int n_levels) {
    return dim3((unsigned)((n + kThreads - 1) / kThreads), (unsigned)n_levels, 1);
}

}  // namespace

void forward_cuda(const float* x, const float* params, const int32_t* offsets, const float* scales, int64_t n,
                  int n_levels, int n_features, float* out, void* stream) {
    if (n == 0) return;
    auto s = static_cast<cudaStream_t>(stream);
    dispatch_features(n_features, [&](auto f) {
        constexpr int F = decltype(f)::value;
        forward_kernel<F><<<grid_for(n, n_levels), kThreads, 0, s>>>(x, params, offsets, scales, n, n_levels, out);
    });
}

void backward_params_cuda(const float* x, const float* grad_out, const int32_t* offsets, const float* scales,
                          int64_t n, int n_levels, int n_features, float* grad_params, void* stream) {
    if (n == 0) return;
    auto s = static_cast<cudaStream_t>(stream);
    dispatch_features(n_features, [&](auto f) {
        constexpr int F = decltype(f)::value;
        backward_params_kernel<F><<<grid_for(n, n_levels), kThreads, 0, s>>>(x, grad_out, offsets, scales, n,
                                                                            n_levels, grad_params);
    });
}

void backward_input_cuda(const float* x, const float* params, const float* grad_out, const int32_t* offsets,
                         const float* scales, int64_t n, int n_levels, int n_features, float* grad_x,
                         void* stream) {
    if (n == 0) return;
    auto s = static_cast<cudaStream_t>(stream);
    const unsigned blocks = (unsigned)((n + kThreads - 1) / kThreads);
    dispatch_features(n_features, [&](auto f) {
        constexpr int F = decltype(f)::value;
        backward_input_kernel<F><<<blocks, kThreads, 0, s>>>(x, params, grad_out, offsets, scales, n, n_levels,
                                                             grad_x);
    });
}

const char* last_error_cuda() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace hashgrid
