"""The trainer's optimiser: Adam with row-sparse updates for hash tables (tiny-cuda-nn's rule),
and its parameter groups (:func:`adam_groups`, also the nerfstudio method's).

A training batch touches a small part of a hash table: with ``2^19`` entries per level and a
few tens of thousands of samples, most entries get an exactly-zero gradient.  Dense Adam still
moves them (their old momentum keeps pushing for tens of steps, since ``eps`` is 1e-15) and
reads and writes four table-sized arrays per step.  tiny-cuda-nn's optimizer skips hash-grid
entries whose gradient is zero; :class:`HashGridAdam` does the same for parameter groups
marked ``sparse=True``, and is ordinary (fused) ``torch.optim.Adam`` for the others.

The sparse step runs in the native CPU build (:func:`cuda_ext.optim.sparse_adam_kernel`, one
pass over the gradient) when it is loaded, else :func:`sparse_adam_reference` (pure torch; also the GPU path: dense masked
ops are cheap at GPU bandwidth).  State uses ``torch.optim.Adam``'s keys (``step``,
``exp_avg``, ``exp_avg_sq``), so checkpoints and ``load_state_dict`` work unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cuda_ext.optim import sparse_adam_kernel

from ..config import OptimConfig, TrainConfig

if TYPE_CHECKING:  # annotation only
    from ..fields.field import CityField


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
    """The CPU build's sparse Adam step (None when the native build is unavailable)."""
    return sparse_adam_kernel()


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
        #: parameters whose gradient buffer :meth:`zero_grad` keeps (zeroed in place), see there
        self.kept_grads: set[int] = set()

    def keep_grad_buffers(self, params) -> None:
        """Let :meth:`zero_grad` zero these parameters' gradients in place instead of dropping them.

        For the hash tables, whose gradient the native backward accumulates in place
        (``HashEncoding.accumulate_grad_in_place``): a dropped table-sized buffer came back as a
        fresh allocation each step, and on CPU its page faults and zero fill cost 20 ms a step
        (tiny preset, 1 thread) -- a third of a 256-ray step, whatever its rays."""
        self.kept_grads.update(id(p) for p in params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        kept = [p for g in self.param_groups for p in g["params"] if id(p) in self.kept_grads and p.grad is not None]
        for p in kept:
            p.grad.zero_()
        others = [p for g in self.param_groups for p in g["params"] if id(p) not in self.kept_grads]
        for p in others:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

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


#: Adam's betas (instant-ngp's: the second moment follows a sparse hash gradient faster than 0.999).
ADAM_BETAS = (0.9, 0.99)


def adam_groups(optim: OptimConfig) -> list[dict[str, Any]]:
    """Adam's settings per parameter group, without the parameters: the hash table (``grid``) with
    eps 1e-15, no weight decay and (``optim.sparse_grid``) row-sparse steps as in tiny-cuda-nn;
    the MLPs (``mlp``) with a little decay.  Also the nerfstudio method's (citygen.nerfstudio_plugin)."""
    common = {"eps": optim.eps, "betas": ADAM_BETAS}
    # key order as the checkpoints' sidecars have always listed them
    return [{"lr": optim.lr_grid, "weight_decay": 0.0, "name": "grid", "sparse": optim.sparse_grid, **common},
            {"lr": optim.lr_mlp, "weight_decay": optim.weight_decay_mlp, "name": "mlp", "sparse": False, **common}]


def make_optimizer(field: CityField, cfg: TrainConfig, device: torch.device) -> HashGridAdam:
    """The trainer's optimiser: :class:`HashGridAdam` over :func:`adam_groups`."""
    params = {"grid": field.grid_parameters(), "mlp": field.mlp_parameters()}
    groups = []
    for g in adam_groups(cfg.optim):
        groups.append({"params": params[g["name"]], **{k: v for k, v in g.items() if k not in ("eps", "betas")},
                       "initial_lr": g["lr"]})
    # fused Adam is the fastest dense step on CPU (BUILD-NOTES) and on CUDA.
    optimizer = HashGridAdam(groups, betas=ADAM_BETAS, eps=cfg.optim.eps, fused=True)
    optimizer.keep_grad_buffers(params["grid"])
    return optimizer


__all__ = ["ADAM_BETAS", "HashGridAdam", "adam_groups", "make_optimizer", "sparse_adam_reference"]
