"""Adam with row-sparse updates for hash tables (tiny-cuda-nn's rule).

A training batch touches a small part of a hash table: with ``2^19`` entries per level and a
few tens of thousands of samples, most entries get an exactly-zero gradient.  Dense Adam still
moves them (their old momentum keeps pushing for tens of steps, since ``eps`` is 1e-15) and
reads and writes four table-sized arrays per step.  tiny-cuda-nn's optimizer skips hash-grid
entries whose gradient is zero; :class:`HashGridAdam` does the same for parameter groups
marked ``sparse=True``, and is ordinary (fused) ``torch.optim.Adam`` for the others.

The sparse step runs in the native CPU build (``cuda_ext``, one pass over the gradient) when
it is loaded, else :func:`sparse_adam_reference` (pure torch; also the GPU path: dense masked
ops are cheap at GPU bandwidth).  State uses ``torch.optim.Adam``'s keys (``step``,
``exp_avg``, ``exp_avg_sq``), so checkpoints and ``load_state_dict`` work unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sparse_adam_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float,
                          beta1: float, beta2: float, eps: float, bias_correction1: float,
                          bias_correction2: float) -> None:
    """One row-sparse Adam step in place: entries with a zero gradient keep parameter and moments."""
    touched = grad != 0
    exp_avg.copy_(torch.where(touched, beta1 * exp_avg + (1.0 - beta1) * grad, exp_avg))
    exp_avg_sq.copy_(torch.where(touched, beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad, exp_avg_sq))
    denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + eps
    param.sub_(torch.where(touched, (lr / bias_correction1) * exp_avg / denom, torch.zeros_like(param)))


def _native_sparse_adam():
    """The CPU build's ``sparse_adam`` (None when the native build is unavailable)."""
    try:
        from cuda_ext import _backend
    except ImportError:
        return None
    module = _backend.cpu_module()
    return getattr(module, "sparse_adam", None) if module is not None else None


class HashGridAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose ``sparse=True`` parameter groups take row-sparse steps.

    Sparse groups take no weight decay and no AMSGrad (neither makes sense for hash entries).
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            group.setdefault("sparse", False)
            if group["sparse"] and (group["weight_decay"] or group["amsgrad"]):
                raise ValueError("HashGridAdam: sparse groups take neither weight decay nor amsgrad")
        self._native = _native_sparse_adam()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        dense = [g for g in groups if not g["sparse"]]
        if dense:
            # Adam.step walks self.param_groups: show it the dense groups only.
            self.param_groups = dense
            try:
                super().step()
            finally:
                self.param_groups = groups
        for group in groups:
            if group["sparse"]:
                self._sparse_step(group)
        return loss

    def _sparse_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            kwargs = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                          bias_correction1=1.0 - beta1 ** t, bias_correction2=1.0 - beta2 ** t)
            grad = p.grad
            if grad.is_sparse:
                grad = grad.to_dense()
            if self._native is not None and p.device.type == "cpu" and p.dtype == torch.float32 \
                    and p.is_contiguous() and grad.is_contiguous():
                self._native(p, grad, state["exp_avg"], state["exp_avg_sq"], kwargs["lr"], beta1, beta2,
                             kwargs["eps"], kwargs["bias_correction1"], kwargs["bias_correction2"])
            else:
                sparse_adam_reference(p, grad, state["exp_avg"], state["exp_avg_sq"], **kwargs)


__all__ = ["HashGridAdam", "sparse_adam_reference"]
