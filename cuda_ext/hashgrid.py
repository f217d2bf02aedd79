"""Autograd wrapper of the native hash-grid kernels (CPU build for CPU tensors, CUDA for CUDA).

The level table (``offsets``: int32, n_levels + 1 entry offsets; ``scales``: float32 per-level
scales) and the parameter layout are those of ``citygen.fields.hash_encoding`` (tiny-cuda-nn's
HashGrid).  Gradients flow to ``params`` and to ``x`` (first order only).

With ``accumulate_into_grad`` the parameter gradient is added in place into ``params.grad``
instead of being returned to autograd (Megatron-LM's "gradient accumulation fusion").  A
training step that encodes in several calls (the segments of the ray march) then fills one
gradient table; returned gradients would cost each call a fresh table-sized buffer to zero and
then add, traffic that grows with the table rather than with the batch.
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
    def forward(ctx, x: Tensor, params: Tensor, offsets: Tensor, scales: Tensor, n_features: int,
                grad_sink: Tensor | None) -> Tensor:
        module = _module_for(x)
        x = x.contiguous()
        params_c = params.detach().contiguous()
        ctx.save_for_backward(x, params_c, offsets, scales)
        ctx.n_features = n_features
        ctx.module = module
        ctx.grad_sink = grad_sink  # the leaf whose .grad takes the parameter gradient in place
        return module.forward(x, params_c, offsets, scales, n_features)

    @staticmethod
    @once_differentiable  # no double backward (e.g. gradient penalties): use the torch reference
    def backward(ctx, grad_out: Tensor):
        x, params, offsets, scales = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_params = None
        sink = ctx.grad_sink
        if sink is not None:
            if sink.grad is None:
                sink.grad = torch.zeros_like(sink)
            ctx.module.backward_params_accumulate(x, grad_out, offsets, scales, ctx.n_features, sink.grad)
        elif ctx.needs_input_grad[1]:
            grad_params = ctx.module.backward_params(x, grad_out, offsets, scales, ctx.n_features, params.numel())
        if ctx.needs_input_grad[0]:
            grad_x = ctx.module.backward_input(x, params, grad_out, offsets, scales, ctx.n_features)
        return grad_x, grad_params, None, None, None, None


def hashgrid_encode(x: Tensor, params: Tensor, offsets: Tensor, scales: Tensor, n_features: int,
                    accumulate_into_grad: bool = False) -> Tensor:
    """Encode (N, 3) float32 positions with the native kernels.

    Args:
        x: (N, 3) float32 positions in [0, 1]^3, on CPU or CUDA.
        params: flat float32 parameters (tiny-cuda-nn HashGrid layout), same device.
        offsets: int32 (n_levels + 1,) entry offsets of the levels, same device.
        scales: float32 (n_levels,) level scales, same device.
        n_features: features per level (1, 2, 4 or 8).
        accumulate_into_grad: add the parameter gradient in place into ``params.grad`` (created
            as zeros when None) during backward instead of returning it; ``params`` must then be
            a leaf tensor (a Parameter).  ``loss.backward()`` sees the same ``.grad``;
            ``torch.autograd.grad(..., params)`` does not, so this is for training loops only.

    Returns:
        (N, n_levels * n_features) float32, level-major.
    """
    if params.dtype != torch.float32:
        raise TypeError(f"cuda_ext.hashgrid: params must be float32, got {params.dtype}")
    grad_sink = None
    if accumulate_into_grad and params.requires_grad and torch.is_grad_enabled():
        if not params.is_leaf or params.grad is not None and not params.grad.is_contiguous():
            raise ValueError("cuda_ext.hashgrid: accumulate_into_grad needs params to be a leaf tensor "
                             "with a contiguous (or no) .grad")
        grad_sink = params
    return _HashGridEncode.apply(x.float(), params, offsets, scales, n_features, grad_sink)
