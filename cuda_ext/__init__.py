"""Native kernels of citygen (C++/OpenMP for CPU tensors, CUDA for CUDA tensors).

Importing this package compiles nothing: builds happen on first use (see :mod:`cuda_ext._backend`,
``python -m cuda_ext.build``).  Each kernel has a pure-torch twin in ``citygen`` that is the
reference the parity tests compare against.

* :func:`cuda_ext.hashgrid.hashgrid_encode` -- tiny-cuda-nn HashGrid encoding, fwd + bwd.
"""

from ._backend import cpu_available, cuda_available, unavailable_reason

__all__ = ["cpu_available", "cuda_available", "unavailable_reason"]
