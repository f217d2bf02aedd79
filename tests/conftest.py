"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster (and steadier on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def realtime_cpu():
    """The real-time renderer's native CPU build (skips, with the build's reason, where it is unavailable)."""
    from citygen.render.realtime import native_module

    module = native_module("cpu")
    if module is None:
        from cuda_ext import realtime as rt_ext

        pytest.skip(f"the real-time CPU build is unavailable: {rt_ext.unavailable_reason()}")
    return module
