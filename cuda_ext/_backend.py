"""Lazy JIT builds of the native kernels (torch.utils.cpp_extension.load).

Nothing is compiled at import or at ``pip install``: the first call that needs a build compiles
it (about a minute on 2 cores) into a cache folder, later processes load it from there.
``python -m cuda_ext.build`` builds ahead of time.

Cache folder: ``$TORCH_EXTENSIONS_DIR`` when set, else ``~/.cache/citygen/torch_extensions``,
in a subfolder named after the Python and torch versions and the CPU build's instruction set
(torch rebuilds when sources or flags change).  The CPU build uses ``-O3 -fopenmp``, plus
``-mavx2 -mfma`` (about 15% faster) only where this CPU has both; that choice is part of the
folder name, so a cache shared between machines never hands AVX2 code to a CPU without it.
No ``-march=native``: it would tie the cached binary to one CPU model.

``CITYGEN_NO_CUDA_EXT=1`` disables both builds (the torch reference is then used).
Functions here never raise: they report availability and keep the reason of a failure.
"""

from __future__ import annotations

import os
import site
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# the optimiser steps (optim_cpu.cpp) have their own source but share this build and its module
CPU_SOURCES = [CSRC / "hashgrid_cpu.cpp", CSRC / "optim_cpu.cpp"]
CUDA_SOURCES = [CSRC / "hashgrid_cuda.cu", CSRC / "hashgrid_cuda_bind.cpp"]
# No -std flag: torch picks the C++ standard its headers need (C++17 for 2.13, C++20 from 2.14),
# and our sources compile under both.
CPU_CFLAGS = ["-O3", "-fopenmp"]
AVX2_CFLAGS = ["-mavx2", "-mfma"]
# The GPU architecture comes from TORCH_CUDA_ARCH_LIST or the visible device (torch decides).
CUDA_CFLAGS = ["-O3"]

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def _cpu_has_avx2_fma() -> bool:
    """True on x86-64 Linux CPUs that report both AVX2 and FMA."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def cpu_isa() -> str:
    """Instruction-set tag of the CPU build on this machine: "avx2" or "generic"."""
    return "avx2" if _cpu_has_avx2_fma() else "generic"


def build_dir() -> Path:
    """Where the JIT builds live (created on demand)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "citygen" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return base / tag


def load_once(key: str, build: Callable[[], ModuleType], modules: dict[str, ModuleType],
              errors: dict[str, str]) -> ModuleType | None:
    """Build (or load from the cache) one extension once per process; None when impossible.

    ``modules``/``errors`` are the caller's registries, so each family of kernels reports its
    own reasons; a failure is remembered (with the compiler's first ``error:`` line) and never
    retried in this process.
    """
    with _lock:
        if key in modules:
            return modules[key]
        if key in errors:
            return None
        if os.environ.get("CITYGEN_NO_CUDA_EXT", "") not in ("", "0"):
            errors[key] = "disabled by CITYGEN_NO_CUDA_EXT"
            return None
        try:
            modules[key] = build()
        except Exception as err:  # noqa: BLE001 -- any build failure means "not available"
            lines = str(err).strip().splitlines() or [""]
            # A compiler failure ends in ninja's "build stopped"; the first "error:" line says why.
            why = next((ln.strip() for ln in lines if "error:" in ln), lines[-1])
            errors[key] = f"{type(err).__name__}: {why}"
            return None
        return modules[key]


def _load(kind: str) -> ModuleType | None:
    return load_once(kind, lambda: _build(kind), _modules, _errors)


def _build(kind: str) -> ModuleType:
    # deferred: only a build needs it (it imports setuptools, 0.4 s)
    from torch.utils.cpp_extension import load

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device (torch.cuda.is_available() is False)")
        if torch.version.cuda is None:
            raise RuntimeError("this torch build has no CUDA support")
    if kind == "cpu":
        isa = cpu_isa()
        directory = build_dir() / f"cpu_{isa}"
        directory.mkdir(parents=True, exist_ok=True)
        cflags = CPU_CFLAGS + (AVX2_CFLAGS if isa == "avx2" else [])
        return load(name="citygen_hashgrid_cpu", sources=[str(s) for s in CPU_SOURCES],
                    extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(CSRC)], build_directory=str(directory), verbose=False)
    directory = build_dir() / "cuda"
    directory.mkdir(parents=True, exist_ok=True)
    return load(name="citygen_hashgrid_cuda", sources=[str(s) for s in CUDA_SOURCES],
                extra_cflags=["-O3"], extra_cuda_cflags=CUDA_CFLAGS,
                extra_include_paths=[str(CSRC), *_pip_cuda_include_dirs()], build_directory=str(directory),
                verbose=False)


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA headers shipped in pip wheels (site-packages/nvidia/cu*/include), which a pip-installed
    CUDA torch uses instead of a system toolkit's."""
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return sorted(str(p) for root in roots for p in Path(root).glob("nvidia/cu*/include") if p.is_dir())


def cpu_module() -> ModuleType | None:
    """The CPU (OpenMP) build, compiling it on first use; None when it cannot be built."""
    return _load("cpu")


def cuda_module() -> ModuleType | None:
    """The CUDA build, compiling it on first use; None without a CUDA device or toolkit."""
    return _load("cuda")


def cpu_available() -> bool:
    """True when the CPU build loads (builds it if needed)."""
    return cpu_module() is not None


def cuda_available() -> bool:
    """True when the CUDA build loads (builds it if needed; False without a CUDA device)."""
    return cuda_module() is not None


def unavailable_reason() -> str:
    """Why a build is missing ('' when both that were tried loaded)."""
    return "; ".join(f"{kind} build: {why}" for kind, why in sorted(_errors.items()))
