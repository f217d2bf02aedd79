// Optimiser steps of the CPU build (OpenMP); see optim_cpu.h.
#include "optim_cpu.h"

#include <cmath>
#include <cstdint>

namespace citygen_optim {

// Row-sparse ("lazy") Adam step, in place, as tiny-cuda-nn updates hash-table entries: an
// entry whose gradient is exactly zero (no sample touched it this step) keeps its parameter
// and both moments; the others take the ordinary Adam update with the global bias corrections.
// One pass over the gradient, and only touched entries are written, so a step costs a read
// of the table's gradient instead of dense Adam's read-modify-write of four table-sized arrays.
void sparse_adam(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                 double lr, double beta1, double beta2, double eps, double bias_correction1,
                 double bias_correction2) {
    for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq})
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() &&
                        t->numel() == param.numel(),
                    "sparse_adam: param, grad and moments must be contiguous float32 CPU tensors of one size");
    float* p = param.data_ptr<float>();
    const float* g = grad.data_ptr<float>();
    float* m = exp_avg.data_ptr<float>();
    float* v = exp_avg_sq.data_ptr<float>();
    const float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
    const float step = (float)(lr / bias_correction1), inv_sqrt_bc2 = (float)(1.0 / std::sqrt(bias_correction2));
    const int64_t n = param.numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
    for (int64_t i = 0; i < n; ++i) {
        const float gi = g[i];
        if (gi == 0.0f) continue;
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + e);
    }
}

}  // namespace citygen_optim
