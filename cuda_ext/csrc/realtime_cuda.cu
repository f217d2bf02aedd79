// CUDA build of the real-time renderer (Hopper, sm_90): one thread per pixel, the per-ray math
// of realtime_math.h (shared with the CPU build), MLP weights staged in shared memory as __half
// (float accumulation), hash table as __half in global memory (read-only path), occupancy as a
// bitfield.  No torch headers here: raw pointers, sizes and a stream (realtime_cuda_bind.cpp
// binds them to torch).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "realtime_cuda.h"
#include "realtime_math.h"

namespace realtime {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxLevels = 32;

// Bytes of shared memory a block of the march kernel uses: level table, then the weights.
size_t march_shared_bytes(const Layout& L, int n_levels) {
    const size_t head = (size_t)(2 * n_levels + 1) * 4;
    const size_t head_aligned = (head + 15) / 16 * 16;
    return head_aligned + (size_t)L.total * sizeof(__half);
}

__global__ void __launch_bounds__(kThreads)
march_block_kernel(float* __restrict__ rgb, float* __restrict__ depth_sum, float* __restrict__ log_t,
                   float* __restrict__ sem, int32_t* __restrict__ n_samples, const __half* __restrict__ weights,
                   const __half* __restrict__ table, const int32_t* __restrict__ offsets,
                   const float* __restrict__ scales, const uint32_t* __restrict__ occ_bits, Layout L, BlockGeom g,
                   Camera cam, int width, int x0, int y0, int rect_w, int count, const float* __restrict__ band) {
    extern __shared__ __align__(16) unsigned char smem[];
    int32_t* s_offsets = reinterpret_cast<int32_t*>(smem);
    float* s_scales = reinterpret_cast<float*>(smem + (g.n_levels + 1) * 4);
    const size_t head = (size_t)(2 * g.n_levels + 1) * 4;
    __half* s_w = reinterpret_cast<__half*>(smem + (head + 15) / 16 * 16);

    // Stage the weights (every offset of the layout is a multiple of 8 halves: 16-byte copies).
    const int n_vec = L.total / 8;
    const uint4* src = reinterpret_cast<const uint4*>(weights);
    uint4* dst = reinterpret_cast<uint4*>(s_w);
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) dst[i] = __ldg(src + i);
    for (int i = n_vec * 8 + threadIdx.x; i < L.total; i += blockDim.x) s_w[i] = weights[i];
    for (int i = threadIdx.x; i <= g.n_levels; i += blockDim.x) s_offsets[i] = offsets[i];
    for (int i = threadIdx.x; i < g.n_levels; i += blockDim.x) s_scales[i] = scales[i];
    __syncthreads();

    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= count) return;
    const int col = x0 + r % rect_w, row = y0 + r / rect_w;
    const int64_t p = (int64_t)row * width + col;
    float o[3], d[3], z_scale;
    camera_ray(cam, col, row, o, d, z_scale);
    PixelState px{rgb + 3 * p, depth_sum + p, log_t + p, sem ? sem + p * L.classes : nullptr, n_samples + p};
    if (band != nullptr)
        march_ray(s_w, table, s_offsets, s_scales, occ_bits, L, g, o, d, px, band[2 * p], band[2 * p + 1]);
    else
        march_ray(s_w, table, s_offsets, s_scales, occ_bits, L, g, o, d, px);
}

__global__ void __launch_bounds__(kThreads)
finish_kernel(float* __restrict__ rgb, const float* __restrict__ depth_sum, const float* __restrict__ log_t,
              float* __restrict__ sem, float* __restrict__ depth_out, const __half* __restrict__ weights, Layout L,
              Camera cam, int width, int n_pixels) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_pixels) return;
    float o[3], d[3], z_scale;
    camera_ray(cam, p % width, p / width, o, d, z_scale);
    PixelState px{rgb + 3 * (int64_t)p, const_cast<float*>(depth_sum + p), const_cast<float*>(log_t + p),
                  sem ? sem + (int64_t)p * L.classes : nullptr, nullptr};
    finish_pixel(weights, L, d, z_scale, px, depth_out + p);
}

}  // namespace

cudaError_t launch_march_block(float* rgb, float* depth_sum, float* log_t, float* sem, int32_t* n_samples,
                               const __half* weights, const __half* table, const int32_t* offsets, const float* scales,
                               const uint32_t* occ_bits, const int32_t* layout_host, const float* geom_f_host,
                               const int32_t* geom_i_host, const float* camera_host, int width, int x0, int y0, int x1,
                               int y1, cudaStream_t stream, const float* band) {
    const Layout L = layout_from(layout_host);
    const BlockGeom g = geom_from(geom_f_host, geom_i_host);
    const Camera cam = camera_from(camera_host);
    if (g.n_levels > kMaxLevels || L.total % 8 != 0) return cudaErrorInvalidValue;
    const int rect_w = x1 - x0, count = rect_w * (y1 - y0);
    if (count <= 0) return cudaSuccess;
    const size_t shared = march_shared_bytes(L, g.n_levels);
    if (shared > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(march_block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     (int)shared);
        if (err != cudaSuccess) return err;
    }
    const int blocks = (count + kThreads - 1) / kThreads;
    march_block_kernel<<<blocks, kThreads, shared, stream>>>(rgb, depth_sum, log_t, sem, n_samples, weights, table,
                                                             offsets, scales, occ_bits, L, g, cam, width, x0, y0,
                                                             rect_w, count, band);
    return cudaGetLastError();
}

cudaError_t launch_finish(float* rgb, const float* depth_sum, const float* log_t, float* sem, float* depth_out,
                          const __half* weights, const int32_t* layout_host, const float* camera_host, int width,
                          int n_pixels, cudaStream_t stream) {
    const Layout L = layout_from(layout_host);
    const Camera cam = camera_from(camera_host);
    if (n_pixels <= 0) return cudaSuccess;
    const int blocks = (n_pixels + kThreads - 1) / kThreads;
    finish_kernel<<<blocks, kThreads, 0, stream>>>(rgb, depth_sum, log_t, sem, depth_out, weights, L, cam, width,
                                                   n_pixels);
    return cudaGetLastError();
}

}  // namespace realtime
