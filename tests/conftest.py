"""Fixtures shared by several test modules."""

import os
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster (and steadier on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def require_native(build, reason, what: str):
    """The native CPU build returned by ``build()``, JIT-compiling it if needed.

    Skips only where the build cannot be attempted: no C++ compiler (torch compiles with
    ``$CXX``, else ``c++``) or ``CITYGEN_NO_CUDA_EXT`` set on purpose.  Anywhere else a missing
    build is a FAILURE carrying the compiler's reason (``reason()``), so a broken .cpp can never
    turn the native tests into silent skips.
    """
    flag = os.environ.get("CITYGEN_NO_CUDA_EXT", "")
    if flag not in ("", "0"):
        pytest.skip(f"{what} is disabled on purpose (CITYGEN_NO_CUDA_EXT={flag})")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler!r} is not on PATH): {what} cannot be compiled here")
    module = build()
    if module is None:
        pytest.fail(f"{what} failed to build: {reason()}", pytrace=False)
    return module


@pytest.fixture(scope="session")
def hashgrid_cpu():
    """The hash-grid kernels' native CPU build (cuda_ext); fails when it does not build."""
    from cuda_ext import _backend

    return require_native(_backend.cpu_module, _backend.unavailable_reason, "the hash-grid CPU build of cuda_ext")


@pytest.fixture(scope="module")
def realtime_cpu():
    """The real-time renderer's native CPU build; fails (with the build's reason) when it does not build."""
    from citygen.render.realtime import native_module
    from cuda_ext import realtime as rt_ext

    return require_native(lambda: native_module("cpu"), rt_ext.unavailable_reason,
                          "the real-time renderer's CPU build of cuda_ext")
