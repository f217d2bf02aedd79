// Optimiser steps of the CPU build (OpenMP): the kernel side of citygen/train/optim.py.
// Compiled into the hash-grid CPU extension (cuda_ext/_backend.py, CPU_SOURCES) so it costs no JIT
// build of its own; hashgrid_cpu.cpp's module binds it, and cuda_ext/optim.py is its Python entry.
#pragma once

#include <torch/extension.h>

namespace citygen_optim {

void sparse_adam(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                 double lr, double beta1, double beta2, double eps, double bias_correction1,
                 double bias_correction2);

}  // namespace citygen_optim
