"""Native kernels of citygen (C++/OpenMP for CPU tensors, CUDA for CUDA tensors).

Importing this package compiles nothing: builds happen on first use (``python -m cuda_ext.build``
builds ahead of time).  Each kernel has a pure-torch twin in ``citygen`` that is the reference
the parity tests compare against.

Public API (what ``citygen`` and ``viewer`` may use; ``cuda_ext._backend`` is private, and the
import-linter contract ``cuda-ext-public`` in pyproject.toml keeps it so):

* availability of the hash-grid builds: :func:`cpu_available`, :func:`cuda_available`,
  :func:`unavailable_reason` (why a build is missing), :func:`build_dir` (the JIT cache folder),
  :func:`cpu_isa` (the CPU build's instruction-set tag);
* :func:`cuda_ext.hashgrid.hashgrid_encode` -- tiny-cuda-nn HashGrid encoding, fwd + bwd;
* :mod:`cuda_ext.realtime` -- the real-time renderer's builds (``cpu_module``, ``cuda_module``,
  ``unavailable_reason``);
* :func:`cuda_ext.optim.sparse_adam_step` -- the CPU build's row-sparse Adam step (the optimiser
  itself is ``citygen.train.optim.HashGridAdam``).
"""

from ._backend import build_dir, cpu_available, cpu_isa, cuda_available, unavailable_reason

__all__ = ["build_dir", "cpu_available", "cpu_isa", "cuda_available", "unavailable_reason"]
