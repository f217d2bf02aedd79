"""Loader of the real-time renderer's native builds (CPU/OpenMP and CUDA), JIT-compiled on first use.

Same mechanism and cache folder as the hash-grid builds (:mod:`cuda_ext._backend`: lazy
``torch.utils.cpp_extension.load``, never raising, the reason of a failure kept), as separate
extension modules so that the two are built and cached independently.  ``CITYGEN_NO_CUDA_EXT=1``
disables them.  The kernels' argument conventions are documented in
:mod:`citygen.render.realtime` (which packs the buffers) and ``csrc/realtime_math.h``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import _backend

CPU_SOURCES = [_backend.CSRC / "realtime_cpu.cpp"]
CUDA_SOURCES = [_backend.CSRC / "realtime_cuda.cu", _backend.CSRC / "realtime_cuda_bind.cpp"]

_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def _build(kind: str) -> ModuleType:
    # deferred: only a build needs it (it imports setuptools, 0.4 s)
    from torch.utils.cpp_extension import load

    if kind == "cpu":
        isa = _backend.cpu_isa()
        directory = _backend.build_dir() / f"realtime_cpu_{isa}"
        directory.mkdir(parents=True, exist_ok=True)
        cflags = _backend.CPU_CFLAGS + (_backend.AVX2_CFLAGS if isa == "avx2" else [])
        return load(name="citygen_realtime_cpu", sources=[str(s) for s in CPU_SOURCES], extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"], extra_include_paths=[str(_backend.CSRC)],
                    build_directory=str(directory), verbose=False)
    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device (torch.cuda.is_available() is False)")
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    directory = _backend.build_dir() / "realtime_cuda"
    directory.mkdir(parents=True, exist_ok=True)
    return load(name="citygen_realtime_cuda", sources=[str(s) for s in CUDA_SOURCES], extra_cflags=["-O3"],
                extra_cuda_cflags=_backend.CUDA_CFLAGS,
                extra_include_paths=[str(_backend.CSRC), *_backend._pip_cuda_include_dirs()],
                build_directory=str(directory), verbose=False)


def _load(kind: str) -> ModuleType | None:
    return _backend.load_once(kind, lambda: _build(kind), _modules, _errors)


def cpu_module() -> ModuleType | None:
    """The CPU (OpenMP) build of the real-time renderer; None when it cannot be built."""
    return _load("cpu")


def cuda_module() -> ModuleType | None:
    """The CUDA build of the real-time renderer; None without a CUDA device or toolkit."""
    return _load("cuda")


def module_for(device) -> ModuleType | None:
    """The build that runs on ``device`` (a torch.device or string), or None."""
    return cuda_module() if torch.device(device).type == "cuda" else cpu_module()


def unavailable_reason() -> str:
    """Why a build is missing ('' when every build tried loaded)."""
    return "; ".join(f"realtime {kind} build: {why}" for kind, why in sorted(_errors.items()))
