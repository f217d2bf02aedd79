// Host launchers of the CUDA real-time renderer (realtime_cuda.cu), free of torch: raw device
// pointers, sizes and a stream.  Bound to torch in realtime_cuda_bind.cpp.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace realtime {

// March pixel rect [x0, x1) x [y0, y1) of a width-wide image through one block; the pixel
// state (rgb, depth_sum, log_t, sem or nullptr, n_samples) is updated in place.
// layout/geom/camera are host arrays (they are passed by value to the kernel).  `band` (device,
// 2 floats per pixel of the image: t_in, t_out) restricts each ray to its narrow band; nullptr =
// the whole box.
cudaError_t launch_march_block(float* rgb, float* depth_sum, float* log_t, float* sem, int32_t* n_samples,
                               const __half* weights, const __half* table, const int32_t* offsets, const float* scales,
                               const uint32_t* occ_bits, const int32_t* layout_host, const float* geom_f_host,
                               const int32_t* geom_i_host, const float* camera_host, int width, int x0, int y0, int x1,
                               int y1, cudaStream_t stream, const float* band = nullptr);

// Background, z-depth (written to depth_out) and background semantics of every pixel.
cudaError_t launch_finish(float* rgb, const float* depth_sum, const float* log_t, float* sem, float* depth_out,
                          const __half* weights, const int32_t* layout_host, const float* camera_host, int width,
                          int n_pixels, cudaStream_t stream);

}  // namespace realtime
