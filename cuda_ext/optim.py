"""Native optimiser steps (the CPU build): the kernel side of ``citygen.train.optim.HashGridAdam``.

The row-sparse Adam kernel has its own source (``csrc/optim_cpu.cpp``) but is compiled into the
hash-grid CPU build, whose module binds it as ``sparse_adam``, so that it costs no JIT build of
its own (a torch extension takes about a minute to compile on 2 cores); this module is its one
public entry point, so nothing outside ``cuda_ext`` looks it up by name in a build module.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _backend


def sparse_adam_kernel() -> Callable[..., None] | None:
    """The CPU build's row-sparse Adam step, building it on first use; None when the build is
    unavailable (:func:`cuda_ext.unavailable_reason` says why).

    Call it as ``kernel(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
    bias_correction1, bias_correction2)`` on contiguous float32 CPU tensors of one size: in
    place, entries with an exactly-zero gradient keep parameter and both moments (tiny-cuda-nn's
    rule), the others take the ordinary Adam update with the given bias corrections.
    """
    module = _backend.cpu_module()
    return getattr(module, "sparse_adam", None) if module is not None else None


__all__ = ["sparse_adam_kernel"]
