// CPU (OpenMP) build of the hash-grid encoding, with its torch bindings (and those of the
// optimiser steps in optim_cpu.cpp, compiled into the same extension).
//
// The per-point math is hashgrid_math.h, shared with the CUDA build.
//   forward: level by level (one level's table, up to a few MiB, is reused from cache by all
//     points; measured faster than all levels per point), points split among threads;
//   parameter gradient: levels split among threads, so each level's slice of the gradient has
//     exactly one writer -- no atomics, no per-thread copies, and a deterministic sum; it is
//     either a fresh table (each level zeroes its slice) or added into a caller's buffer;
//   input gradient: points split among threads, all levels per point.
// Within a level, points go in blocks whose table entries are prefetched before they are read.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "hashgrid_math.h"
#include "optim_cpu.h"

namespace {

using hashgrid::Corners;
using hashgrid::Level;

void check_inputs(const torch::Tensor& x, const torch::Tensor& offsets, const torch::Tensor& scales) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == 3,
                "hashgrid: x must be a float32 CPU tensor of shape (N, 3)");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt32 && offsets.dim() == 1 && offsets.is_contiguous(),
                "hashgrid: level offsets must be a contiguous int32 vector");
    TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.dim() == 1 && scales.is_contiguous() &&
                    scales.numel() + 1 == offsets.numel(),
                "hashgrid: level scales must be float32 with one value per level");
}

// Points go through in blocks: first the corners of the whole block are computed and their
// table entries prefetched, then the entries are read; the random loads of a block overlap.
constexpr int64_t kBlock = 32;
// Below this many points one thread is faster than waking the team (and than spinning on a
// busy machine).
constexpr int64_t kParallelMinPoints = 2048;

template <int F>
void prefetch_corners(const Corners& c, const float* table) {
    for (int k = 0; k < 8; ++k) __builtin_prefetch(table + (size_t)c.index[k] * F);
}

template <int F>
void forward_impl(const float* x, const float* params, const int32_t* offsets, const float* scales,
                  int64_t n, int n_levels, float* out) {
    const int64_t row = (int64_t)n_levels * F;
    const int64_t n_blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel if (n >= kParallelMinPoints)
    for (int l = 0; l < n_levels; ++l) {
        const Level lv = hashgrid::make_level(offsets, scales, l);
        const float* table = params + (size_t)lv.offset * F;
        Corners c[kBlock];
        // Each (point, level) output is written exactly once and levels do not depend on each
        // other, so threads go on to the next level without waiting (nowait).
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t begin = b * kBlock, count = std::min(kBlock, n - begin);
            for (int64_t j = 0; j < count; ++j) {
                hashgrid::cell_corners(lv, x + 3 * (begin + j), c[j]);
                prefetch_corners<F>(c[j], table);
            }
            for (int64_t j = 0; j < count; ++j)
                hashgrid::level_forward<F>(c[j], table, out + (begin + j) * row + l * F);
        }
    }
}

template <int F>
void backward_params_impl(const float* x, const float* grad_out, const int32_t* offsets, const float* scales,
                          int64_t n, int n_levels, float* grad_params, bool accumulate) {
    const int64_t row = (int64_t)n_levels * F;
    auto add = [](float* p, float v) { *p += v; };
#pragma omp parallel for schedule(dynamic, 1) if (n >= kParallelMinPoints)
    for (int l = 0; l < n_levels; ++l) {
        const Level lv = hashgrid::make_level(offsets, scales, l);
        float* grad_table = grad_params + (size_t)lv.offset * F;
        if (!accumulate) std::fill(grad_table, grad_table + (size_t)lv.size * F, 0.0f);  // zeroed by its owner
        Corners c[kBlock];
        for (int64_t begin = 0; begin < n; begin += kBlock) {
            const int64_t count = std::min(kBlock, n - begin);
            for (int64_t j = 0; j < count; ++j) {
                hashgrid::cell_corners(lv, x + 3 * (begin + j), c[j]);
                prefetch_corners<F>(c[j], grad_table);
            }
            for (int64_t j = 0; j < count; ++j)
                hashgrid::level_backward<F>(c[j], grad_out + (begin + j) * row + l * F, grad_table, add);
        }
    }
}

template <int F>
void backward_input_impl(const float* x, const float* params, const float* grad_out, const int32_t* offsets,
                         const float* scales, int64_t n, int n_levels, float* grad_x) {
    const int64_t row = (int64_t)n_levels * F;
    std::vector<Level> levels(n_levels);
    for (int l = 0; l < n_levels; ++l) levels[l] = hashgrid::make_level(offsets, scales, l);
#pragma omp parallel for schedule(static) if (n >= kParallelMinPoints)
    for (int64_t i = 0; i < n; ++i) {
        float dx[3] = {0.0f, 0.0f, 0.0f};
        for (int l = 0; l < n_levels; ++l) {
            Corners c;
            hashgrid::cell_corners(levels[l], x + 3 * i, c);
            hashgrid::level_backward_input<F>(levels[l], c, params + (size_t)levels[l].offset * F,
                                              grad_out + i * row + l * F, dx);
        }
        for (int d = 0; d < 3; ++d) grad_x[3 * i + d] = dx[d];
    }
}

// Calls fn.template operator()<F>() for the runtime feature count.
template <typename Fn>
void dispatch_features(int64_t n_features, Fn&& fn) {
    switch (n_features) {
        case 1: fn(std::integral_constant<int, 1>{}); break;
        case 2: fn(std::integral_constant<int, 2>{}); break;
        case 4: fn(std::integral_constant<int, 4>{}); break;
        case 8: fn(std::integral_constant<int, 8>{}); break;
        default: TORCH_CHECK(false, "hashgrid: n_features_per_level must be 1, 2, 4 or 8, got ", n_features);
    }
}

torch::Tensor forward(torch::Tensor x, torch::Tensor params, torch::Tensor offsets, torch::Tensor scales,
                      int64_t n_features) {
    check_inputs(x, offsets, scales);
    x = x.contiguous();
    params = params.contiguous();
    const int n_levels = (int)scales.numel();
    TORCH_CHECK(params.numel() == (int64_t)offsets[n_levels].item<int32_t>() * n_features,
                "hashgrid: params has ", params.numel(), " values, the level table needs ",
                offsets[n_levels].item<int32_t>() * n_features);
    auto out = torch::empty({x.size(0), n_levels * n_features}, x.options());
    dispatch_features(n_features, [&](auto f) {
        forward_impl<decltype(f)::value>(x.data_ptr<float>(), params.data_ptr<float>(), offsets.data_ptr<int32_t>(),
                                         scales.data_ptr<float>(), x.size(0), n_levels, out.data_ptr<float>());
    });
    return out;
}

void check_grad_out(const torch::Tensor& x, const torch::Tensor& grad_out, const torch::Tensor& offsets,
                    int64_t n_features, int64_t n_params) {
    const int64_t n_levels = offsets.numel() - 1;
    TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == n_levels * n_features,
                "hashgrid: grad_out has the wrong shape");
    TORCH_CHECK(n_params == (int64_t)offsets[n_levels].item<int32_t>() * n_features,
                "hashgrid: n_params ", n_params, " does not match the level table");
}

void run_backward_params(const torch::Tensor& x, const torch::Tensor& grad_out, const torch::Tensor& offsets,
                         const torch::Tensor& scales, int64_t n_features, float* grad, bool accumulate) {
    dispatch_features(n_features, [&](auto f) {
        backward_params_impl<decltype(f)::value>(x.data_ptr<float>(), grad_out.data_ptr<float>(),
                                                 offsets.data_ptr<int32_t>(), scales.data_ptr<float>(), x.size(0),
                                                 (int)scales.numel(), grad, accumulate);
    });
}

torch::Tensor backward_params(torch::Tensor x, torch::Tensor grad_out, torch::Tensor offsets, torch::Tensor scales,
                              int64_t n_features, int64_t n_params) {
    check_inputs(x, offsets, scales);
    x = x.contiguous();
    grad_out = grad_out.to(torch::kFloat32).contiguous();
    check_grad_out(x, grad_out, offsets, n_features, n_params);
    auto grad = torch::empty({n_params}, x.options());  // every level zeroes its own slice
    run_backward_params(x, grad_out, offsets, scales, n_features, grad.data_ptr<float>(), false);
    return grad;
}

// grad += d loss / d params, in place.  Lets a caller sum the gradients of several encode calls
// (the segments of a training step) in one table instead of zeroing and adding a fresh
// table-sized buffer per call, whose memory traffic grows with the table, not the batch.
void backward_params_accumulate(torch::Tensor x, torch::Tensor grad_out, torch::Tensor offsets,
                                torch::Tensor scales, int64_t n_features, torch::Tensor grad) {
    check_inputs(x, offsets, scales);
    TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() &&
                    grad.dim() == 1,
                "hashgrid: the gradient buffer must be a contiguous float32 CPU vector");
    x = x.contiguous();
    grad_out = grad_out.to(torch::kFloat32).contiguous();
    check_grad_out(x, grad_out, offsets, n_features, grad.numel());
    run_backward_params(x, grad_out, offsets, scales, n_features, grad.data_ptr<float>(), true);
}

torch::Tensor backward_input(torch::Tensor x, torch::Tensor params, torch::Tensor grad_out, torch::Tensor offsets,
                             torch::Tensor scales, int64_t n_features) {
    check_inputs(x, offsets, scales);
    x = x.contiguous();
    params = params.contiguous();
    grad_out = grad_out.to(torch::kFloat32).contiguous();
    const int n_levels = (int)scales.numel();
    auto grad_x = torch::empty_like(x);
    dispatch_features(n_features, [&](auto f) {
        backward_input_impl<decltype(f)::value>(x.data_ptr<float>(), params.data_ptr<float>(),
                                                grad_out.data_ptr<float>(), offsets.data_ptr<int32_t>(),
                                                scales.data_ptr<float>(), x.size(0), n_levels,
                                                grad_x.data_ptr<float>());
    });
    return grad_x;
}

// tcnn's level scales, computed in C++ float32: a cross-check of the Python layout code.
torch::Tensor level_scales(int64_t n_levels, double per_level_scale, int64_t base_resolution) {
    auto out = torch::empty({n_levels}, torch::kFloat32);
    const float log2_scale = std::log2((float)per_level_scale);
    for (int64_t l = 0; l < n_levels; ++l)
        out[l] = hashgrid::level_scale((uint32_t)l, log2_scale, (uint32_t)base_resolution);
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "citygen hash-grid encoding, CPU (OpenMP) build";
    m.def("forward", &forward, "encode (N,3) positions -> (N, L*F)");
    m.def("backward_params", &backward_params, "gradient w.r.t. the flat parameters");
    m.def("backward_params_accumulate", &backward_params_accumulate,
          "add the gradient w.r.t. the flat parameters into a given buffer, in place");
    m.def("backward_input", &backward_input, "gradient w.r.t. the (N,3) positions");
    m.def("level_scales", &level_scales, "tcnn's per-level scales (float32)");
    m.def("sparse_adam", &citygen_optim::sparse_adam, "row-sparse Adam step in place (entries with zero gradient untouched)");
}
