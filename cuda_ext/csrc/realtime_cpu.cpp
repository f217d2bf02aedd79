// CPU (OpenMP) build of the real-time renderer, with its torch bindings: one ray per loop
// iteration, the per-ray math of realtime_math.h (shared with realtime_cuda.cu), float storage.
//
// The buffers are those of citygen/render/realtime.py (`pack_field`); the pixel state tensors are
// updated in place so that blocks can be marched one after another, front to back.
#include <torch/extension.h>

#include <cstdint>

#include "realtime_math.h"

namespace {

using realtime::BlockGeom;
using realtime::Camera;
using realtime::Layout;
using realtime::PixelState;

void check_f32(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "realtime: ", name, " must be a contiguous float32 CPU tensor");
}

void check_i32(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "realtime: ", name, " must be a contiguous int32 CPU tensor");
}

Layout checked_layout(const torch::Tensor& layout, const torch::Tensor& weights) {
    check_i32(layout, "layout");
    check_f32(weights, "weights");
    TORCH_CHECK(layout.numel() == realtime::kLayoutInts, "realtime: layout must have ", realtime::kLayoutInts,
                " entries");
    const Layout L = realtime::layout_from(layout.data_ptr<int32_t>());
    TORCH_CHECK(weights.numel() >= L.total, "realtime: weights have ", weights.numel(), " values, layout needs ",
                L.total);
    TORCH_CHECK(L.enc <= realtime::kMaxWidth && L.hidden <= realtime::kMaxWidth && L.geo <= realtime::kMaxWidth &&
                    L.sem_hidden <= realtime::kMaxWidth && L.classes <= realtime::kMaxClasses &&
                    L.sh_dim <= realtime::kMaxSH,
                "realtime: layer widths exceed the kernel's bounds");
    return L;
}

// The coarse bitfield plus, with fine factors, one brick of fx*fy*fz bits per coarse cell.
void check_occupancy_bits(const BlockGeom& g, const torch::Tensor& occ_bits) {
    const int64_t brick = (int64_t)g.occ_fine[0] * g.occ_fine[1] * g.occ_fine[2];
    TORCH_CHECK(g.occ_res >= 1 && g.occ_fine[0] >= 1 && g.occ_fine[1] >= 1 && g.occ_fine[2] >= 1 && brick <= 512,
                "realtime: occupancy resolution and fine factors must be >= 1, at most 512 fine cells per coarse cell");
    const int64_t cells = (int64_t)g.occ_res * g.occ_res * g.occ_res;
    const int64_t fine_words = brick > 1 ? (cells * brick + 31) / 32 : 0;
    TORCH_CHECK(occ_bits.numel() >= realtime::coarse_words(g) + fine_words, "realtime: occupancy bitfield too small");
}

BlockGeom checked_geom(const torch::Tensor& geom_f, const torch::Tensor& geom_i, const torch::Tensor& offsets,
                       const torch::Tensor& scales, const torch::Tensor& table, const torch::Tensor& occ_bits,
                       const Layout& L) {
    check_f32(geom_f, "geom_f");
    check_i32(geom_i, "geom_i");
    TORCH_CHECK(geom_f.numel() == realtime::kGeomFloats && geom_i.numel() == realtime::kGeomInts,
                "realtime: geom arrays have the wrong length");
    const BlockGeom g = realtime::geom_from(geom_f.data_ptr<float>(), geom_i.data_ptr<int32_t>());
    check_i32(offsets, "offsets");
    check_f32(scales, "scales");
    check_f32(table, "table");
    check_i32(occ_bits, "occupancy bits");
    TORCH_CHECK(g.n_features == 2 && g.n_levels * 2 == L.enc, "realtime: 2 features per level, n_levels*2 == enc");
    TORCH_CHECK(scales.numel() == g.n_levels && offsets.numel() == g.n_levels + 1, "realtime: level table size");
    TORCH_CHECK(table.numel() >= (int64_t)offsets.data_ptr<int32_t>()[g.n_levels] * 2, "realtime: table too small");
    check_occupancy_bits(g, occ_bits);
    return g;
}

// March the pixels of rect [x0, x1) x [y0, y1) of a width-wide image through one block; with a
// non-empty `band` (n_pixels, 2) float32, each pixel's ray marches only [band[p, 0], band[p, 1]].
void march_block_impl(torch::Tensor rgb, torch::Tensor depth_sum, torch::Tensor log_t, torch::Tensor sem,
                 torch::Tensor n_samples, torch::Tensor weights, torch::Tensor table, torch::Tensor offsets,
                 torch::Tensor scales, torch::Tensor occ_bits, torch::Tensor layout, torch::Tensor geom_f,
                 torch::Tensor geom_i, torch::Tensor camera, int64_t width, int64_t x0, int64_t y0, int64_t x1,
                 int64_t y1, const torch::Tensor& band) {
    const Layout L = checked_layout(layout, weights);
    const BlockGeom g = checked_geom(geom_f, geom_i, offsets, scales, table, occ_bits, L);
    check_f32(rgb, "rgb");
    check_f32(depth_sum, "depth_sum");
    check_f32(log_t, "log_t");
    check_i32(n_samples, "n_samples");
    check_f32(camera, "camera");
    TORCH_CHECK(camera.numel() == realtime::kCameraFloats, "realtime: camera must have 16 floats");
    const bool with_sem = sem.numel() > 0;
    if (with_sem) check_f32(sem, "sem");
    const int64_t n_pixels = log_t.numel();
    TORCH_CHECK(x0 >= 0 && y0 >= 0 && x1 <= width && x0 <= x1 && y0 <= y1 && y1 * width <= n_pixels,
                "realtime: pixel rect outside the image");
    const Camera cam = realtime::camera_from(camera.data_ptr<float>());
    const float* w = weights.data_ptr<float>();
    const float* tab = table.data_ptr<float>();
    const int32_t* offs = offsets.data_ptr<int32_t>();
    const float* sc = scales.data_ptr<float>();
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(occ_bits.data_ptr<int32_t>());
    float* p_rgb = rgb.data_ptr<float>();
    float* p_depth = depth_sum.data_ptr<float>();
    float* p_logt = log_t.data_ptr<float>();
    float* p_sem = with_sem ? sem.data_ptr<float>() : nullptr;
    int32_t* p_n = n_samples.data_ptr<int32_t>();
    const bool with_band = band.numel() > 0;
    if (with_band) {
        check_f32(band, "band");
        TORCH_CHECK(band.numel() == 2 * n_pixels, "realtime: band must hold (t_in, t_out) for every pixel");
    }
    const float* p_band = with_band ? band.data_ptr<float>() : nullptr;
    const int64_t rect_w = x1 - x0, count = rect_w * (y1 - y0);
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t r = 0; r < count; ++r) {
        const int64_t col = x0 + r % rect_w, row = y0 + r / rect_w, p = row * width + col;
        float o[3], d[3], z_scale;
        realtime::camera_ray(cam, (int)col, (int)row, o, d, z_scale);
        PixelState px{p_rgb + 3 * p, p_depth + p, p_logt + p, p_sem ? p_sem + p * L.classes : nullptr, p_n + p};
        if (p_band != nullptr)
            realtime::march_ray(w, tab, offs, sc, bits, L, g, o, d, px, p_band[2 * p], p_band[2 * p + 1]);
        else
            realtime::march_ray(w, tab, offs, sc, bits, L, g, o, d, px);
    }
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

// Finish every pixel with the background layers of `weights`; returns the z-depth image (flat).
torch::Tensor finish(torch::Tensor rgb, torch::Tensor depth_sum, torch::Tensor log_t, torch::Tensor sem,
                     torch::Tensor weights, torch::Tensor layout, torch::Tensor camera, int64_t width) {
    const Layout L = checked_layout(layout, weights);
    check_f32(camera, "camera");
    const Camera cam = realtime::camera_from(camera.data_ptr<float>());
    const int64_t n_pixels = log_t.numel();
    TORCH_CHECK(n_pixels % width == 0, "realtime: pixel count is not a multiple of the width");
    auto depth = torch::empty({n_pixels}, log_t.options());
    const bool with_sem = sem.numel() > 0;
    const float* w = weights.data_ptr<float>();
    float* p_rgb = rgb.data_ptr<float>();
    float* p_depth = depth_sum.data_ptr<float>();
    float* p_logt = log_t.data_ptr<float>();
    float* p_sem = with_sem ? sem.data_ptr<float>() : nullptr;
    float* out = depth.data_ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_pixels; ++p) {
        float o[3], d[3], z_scale;
        realtime::camera_ray(cam, (int)(p % width), (int)(p / width), o, d, z_scale);
        PixelState px{p_rgb + 3 * p, p_depth + p, p_logt + p, p_sem ? p_sem + p * L.classes : nullptr, nullptr};
        realtime::finish_pixel(w, L, d, z_scale, px, out + p);
    }
    return depth;
}

// Field outputs at points (N, 3) with unit directions (N, 3): sigma (N), rgb (N, 3), logits (N, C).
// For tests of the packed layout against the torch modules.
std::vector<torch::Tensor> eval_points(torch::Tensor x, torch::Tensor dirs, torch::Tensor weights, torch::Tensor table,
                                       torch::Tensor offsets, torch::Tensor scales, torch::Tensor occ_bits,
                                       torch::Tensor layout, torch::Tensor geom_f, torch::Tensor geom_i) {
    const Layout L = checked_layout(layout, weights);
    const BlockGeom g = checked_geom(geom_f, geom_i, offsets, scales, table, occ_bits, L);
    check_f32(x, "x");
    check_f32(dirs, "dirs");
    const int64_t n = x.size(0);
    auto sigma = torch::empty({n}, x.options());
    auto rgb = torch::empty({n, 3}, x.options());
    auto sem = torch::empty({n, (int64_t)L.classes}, x.options());
    const float* w = weights.data_ptr<float>();
    const float* px = x.data_ptr<float>();
    const float* pd = dirs.data_ptr<float>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        float u[3], enc[realtime::kMaxWidth], geo[realtime::kMaxWidth], cond[realtime::kMaxWidth];
        for (int a = 0; a < 3; ++a)
            u[a] = fminf(fmaxf((px[3 * i + a] - g.aabb_lo[a]) / g.norm_extent[a], 0.0f), 1.0f);
        realtime::encode_point(table.data_ptr<float>(), offsets.data_ptr<int32_t>(), scales.data_ptr<float>(),
                               g.n_levels, g.n_active_levels, u, enc);
        const float s = realtime::density(w, L, g.inv_unit_length, enc, geo);
        realtime::view_conditioning(w, L, pd + 3 * i, cond);
        realtime::color(w, L, geo, cond, rgb.data_ptr<float>() + 3 * i);
        realtime::semantics(w, L, geo, sem.data_ptr<float>() + i * L.classes);
        sigma.data_ptr<float>()[i] = s;
    }
    return {sigma, rgb, sem};
}

// Whether points (N, 3) fall in occupied cells of the bitfield (False outside the grid's box).
torch::Tensor occupancy_query(torch::Tensor x, torch::Tensor occ_bits, torch::Tensor geom_f, torch::Tensor geom_i) {
    check_f32(x, "x");
    check_i32(occ_bits, "occupancy bits");
    check_f32(geom_f, "geom_f");
    TORCH_CHECK(geom_f.numel() == realtime::kGeomFloats && geom_i.numel() == realtime::kGeomInts,
                "geom_f/geom_i: expected ", realtime::kGeomFloats, "/", realtime::kGeomInts, " values");
    check_i32(geom_i, "geom_i");
    const BlockGeom g = realtime::geom_from(geom_f.data_ptr<float>(), geom_i.data_ptr<int32_t>());
    check_occupancy_bits(g, occ_bits);
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(occ_bits.data_ptr<int32_t>());
    auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kBool));
    bool* po = out.data_ptr<bool>();
    const float* px = x.data_ptr<float>();
    for (int64_t i = 0; i < x.size(0); ++i) {
        int ijk[3], res[3];
        po[i] = realtime::occupancy_lookup(g, bits, px + 3 * i, ijk, res) == 0;
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "citygen real-time renderer, CPU (OpenMP) build";
    m.def("march_block", &march_block, "march a pixel rect through one packed block (state in place)");
    m.def("march_block_band", &march_block_band, "march_block with per-pixel (t_in, t_out) intervals (narrow band)");
    m.def("finish", &finish, "background, z-depth and semantics of every pixel; returns depth");
    m.def("eval_points", &eval_points, "packed field outputs at points (tests)");
    m.def("occupancy_query", &occupancy_query, "bitfield lookup at points (tests)");
}
