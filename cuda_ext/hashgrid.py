"""Autograd wrapper of the native hash-grid kernels (CPU build for CPU tensors, CUDA for CUDA).

The level table (``offsets``: int32, n_levels + 1 entry offsets; ``scales``: float32 per-level
scales) and the parameter layout are those of ``citygen.fields.hash_encoding`` (tiny-cuda-nn's
HashGrid).  Gradients flow to ``params`` and to ``x`` (first order only).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _backend


def _module_for(t: Tensor) -> ModuleType:
    module = _backend.cuda_module() if t.is_cuda else _backend.cpu_module()
    if module is None:
        kind = "CUDA" if t.is_cuda else "CPU"
        raise RuntimeError(f"cuda_ext: the {kind} hash-grid build is not available: "
                           f"{_backend.unavailable_reason()}")
    return module


class _HashGridEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, offsets: Tensor, scales: Tensor, n_features: int) -> Tensor:
        module = _module_for(x)
        x = x.contiguous()
        params_c = params.detach().contiguous()
        ctx.save_for_backward(x, params_c, offsets, scales)
        ctx.n_features = n_features
        ctx.module = module
        return module.forward(x, params_c, offsets, scales, n_features)

    @staticmethod
    @once_differentiable  # no double backward (e.g. gradient penalties): use the torch reference
    def backward(ctx, grad_out: Tensor):
        x, params, offsets, scales = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_params = None
        if ctx.needs_input_grad[1]:
            grad_params = ctx.module.backward_params(x, grad_out, offsets, scales, ctx.n_features, params.numel())
        if ctx.needs_input_grad[0]:
            grad_x = ctx.module.backward_input(x, params, grad_out, offsets, scales, ctx.n_features)
        return grad_x, grad_params, None, None, None


def hashgrid_encode(x: Tensor, params: Tensor, offsets: Tensor, scales: Tensor, n_features: int) -> Tensor:
    """Encode (N, 3) float32 positions with the native kernels.

    Args:
        x: (N, 3) float32 positions in [0, 1]^3, on CPU or CUDA.
        params: flat float32 parameters (tiny-cuda-nn HashGrid layout), same device.
        offsets: int32 (n_levels + 1,) entry offsets of the levels, same device.
        scales: float32 (n_levels,) level scales, same device.
        n_features: features per level (1, 2, 4 or 8).

    Returns:
        (N, n_levels * n_features) float32, level-major.
    """
    if params.dtype != torch.float32:
        raise TypeError(f"cuda_ext.hashgrid: params must be float32, got {params.dtype}")
    return _HashGridEncode.apply(x.float(), params, offsets, scales, n_features)
