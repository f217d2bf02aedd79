// torch bindings of the CUDA real-time renderer (realtime_cuda.cu): checks, raw pointers, the
// current stream.  Same functions and argument order as the CPU build's march_block / finish,
// with float16 weights and hash table.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "realtime_cuda.h"
#include "realtime_math.h"

namespace {

void check_cuda(const torch::Tensor& t, torch::ScalarType type, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.is_contiguous(), "realtime: ", name,
                " must be a contiguous CUDA tensor of type ", type);
}

void check_host(const torch::Tensor& t, torch::ScalarType type, int64_t n, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous() && t.numel() == n, "realtime: ",
                name, " must be a contiguous CPU tensor of ", n, " values of type ", type);
}

const __half* half_ptr(const torch::Tensor& t) { return reinterpret_cast<const __half*>(t.data_ptr<at::Half>()); }

void march_block_impl(torch::Tensor rgb, torch::Tensor depth_sum, torch::Tensor log_t, torch::Tensor sem,
                      torch::Tensor n_samples, torch::Tensor weights, torch::Tensor table, torch::Tensor offsets,
                      torch::Tensor scales, torch::Tensor occ_bits, torch::Tensor layout, torch::Tensor geom_f,
                      torch::Tensor geom_i, torch::Tensor camera, int64_t width, int64_t x0, int64_t y0, int64_t x1,
                      int64_t y1, const torch::Tensor& band) {
    check_cuda(rgb, torch::kFloat32, "rgb");
    check_cuda(depth_sum, torch::kFloat32, "depth_sum");
    check_cuda(log_t, torch::kFloat32, "log_t");
    check_cuda(n_samples, torch::kInt32, "n_samples");
    const bool with_sem = sem.numel() > 0;
    if (with_sem) check_cuda(sem, torch::kFloat32, "sem");
    check_cuda(weights, torch::kFloat16, "weights");
    check_cuda(table, torch::kFloat16, "table");
    check_cuda(offsets, torch::kInt32, "offsets");
    check_cuda(scales, torch::kFloat32, "scales");
    check_cuda(occ_bits, torch::kInt32, "occupancy bits");
    check_host(layout, torch::kInt32, realtime::kLayoutInts, "layout");
    check_host(geom_f, torch::kFloat32, realtime::kGeomFloats, "geom_f");
    check_host(geom_i, torch::kInt32, realtime::kGeomInts, "geom_i");
    check_host(camera, torch::kFloat32, realtime::kCameraFloats, "camera");
    const realtime::Layout L = realtime::layout_from(layout.data_ptr<int32_t>());
    TORCH_CHECK(weights.numel() >= L.total, "realtime: weights shorter than the layout");
    TORCH_CHECK(x0 >= 0 && y0 >= 0 && x1 <= width && x0 <= x1 && y0 <= y1 && y1 * width <= log_t.numel(),
                "realtime: pixel rect outside the image");
    const bool with_band = band.numel() > 0;
    if (with_band) {
        check_cuda(band, torch::kFloat32, "band");
        TORCH_CHECK(band.numel() == 2 * log_t.numel(), "realtime: band must hold (t_in, t_out) for every pixel");
    }
    const c10::cuda::CUDAGuard guard(rgb.device());
    const cudaError_t err = realtime::launch_march_block(
        rgb.data_ptr<float>(), depth_sum.data_ptr<float>(), log_t.data_ptr<float>(),
        with_sem ? sem.data_ptr<float>() : nullptr, n_samples.data_ptr<int32_t>(), half_ptr(weights),
        half_ptr(table), offsets.data_ptr<int32_t>(), scales.data_ptr<float>(),
        reinterpret_cast<const uint32_t*>(occ_bits.data_ptr<int32_t>()), layout.data_ptr<int32_t>(),
        geom_f.data_ptr<float>(), geom_i.data_ptr<int32_t>(), camera.data_ptr<float>(), (int)width, (int)x0, (int)y0,
        (int)x1, (int)y1, c10::cuda::getCurrentCUDAStream().stream(), with_band ? band.data_ptr<float>() : nullptr);
    TORCH_CHECK(err == cudaSuccess, "realtime: march kernel launch failed: ", cudaGetErrorString(err));
}

void march_block(torch::Tensor rgb, torch::Tensor depth_sum, torch::Tensor log_t, torch::Tensor sem,
                 torch::Tensor n_samples, torch::Tensor weights, torch::Tensor table, torch::Tensor offsets,
                 torch::Tensor scales, torch::Tensor occ_bits, torch::Tensor layout, torch::Tensor geom_f,
                 torch::Tensor geom_i, torch::Tensor camera, int64_t width, int64_t x0, int64_t y0, int64_t x1,
                 int64_t y1) {
    march_block_impl(rgb, depth_sum, log_t, sem, n_samples, weights, table, offsets, scales, occ_bits, layout,
                     geom_f, geom_i, camera, width, x0, y0, x1, y1, torch::Tensor());
}

// march_block with per-pixel intervals (t_in, t_out) from the block's envelope (narrow band).
void march_block_band(torch::Tensor rgb, torch::Tensor depth_sum, torch::Tensor log_t, torch::Tensor sem,
                      torch::Tensor n_samples, torch::Tensor weights, torch::Tensor table, torch::Tensor offsets,
                      torch::Tensor scales, torch::Tensor occ_bits, torch::Tensor layout, torch::Tensor geom_f,
                      torch::Tensor geom_i, torch::Tensor camera, int64_t width, int64_t x0, int64_t y0, int64_t x1,
                      int64_t y1, torch::Tensor band) {
    march_block_impl(rgb, depth_sum, log_t, sem, n_samples, weights, table, offsets, scales, occ_bits, layout,
                     geom_f, geom_i, camera, width, x0, y0, x1, y1, band);
}

torch::Tensor finish(torch::Tensor rgb, torch::Tensor depth_sum, torch::Tensor log_t, torch::Tensor sem,
                     torch::Tensor weights, torch::Tensor layout, torch::Tensor camera, int64_t width) {
    check_cuda(rgb, torch::kFloat32, "rgb");
    check_cuda(weights, torch::kFloat16, "weights");
    check_host(layout, torch::kInt32, realtime::kLayoutInts, "layout");
    check_host(camera, torch::kFloat32, realtime::kCameraFloats, "camera");
    const bool with_sem = sem.numel() > 0;
    auto depth = torch::empty_like(log_t);
    const c10::cuda::CUDAGuard guard(rgb.device());
    const cudaError_t err = realtime::launch_finish(
        rgb.data_ptr<float>(), depth_sum.data_ptr<float>(), log_t.data_ptr<float>(),
        with_sem ? sem.data_ptr<float>() : nullptr, depth.data_ptr<float>(), half_ptr(weights),
        layout.data_ptr<int32_t>(), camera.data_ptr<float>(), (int)width, (int)log_t.numel(),
        c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "realtime: finish kernel launch failed: ", cudaGetErrorString(err));
    return depth;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "citygen real-time renderer, CUDA build";
    m.def("march_block", &march_block, "march a pixel rect through one packed block (state in place)");
    m.def("march_block_band", &march_block_band, "march_block with per-pixel (t_in, t_out) intervals (narrow band)");
    m.def("finish", &finish, "background, z-depth and semantics of every pixel; returns depth");
}
