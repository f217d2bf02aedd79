"""Native hash-grid kernels (cuda_ext) against the pure-torch reference.

The CPU build is JIT-compiled once per session (cached on disk afterwards).  GPU tests run
wherever torch sees a CUDA device; the nvcc test compile-checks the CUDA file without a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from citygen.fields.hash_encoding import HashEncoding, HashGridConfig, grid_levels
from cuda_ext import _backend

CSRC = Path(_backend.__file__).resolve().parent / "csrc"

CONFIGS = {
    # A small default-shaped grid: dense coarse levels, hashed fine ones.
    "mixed_f2": HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=14, base_resolution=4,
                               per_level_scale=1.6),
    "f1": HashGridConfig(n_levels=4, n_features_per_level=1, log2_hashmap_size=12, base_resolution=8,
                         per_level_scale=2.0),
    "f4_integer_scales": HashGridConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=13,
                                        base_resolution=16, per_level_scale=2.0),
    "f8": HashGridConfig(n_levels=2, n_features_per_level=8, log2_hashmap_size=10, base_resolution=5,
                         per_level_scale=3.0),
}


@pytest.fixture(scope="module")
def cpu_build(hashgrid_cpu):
    """The CPU build (conftest.require_native: skips only without a compiler or with
    CITYGEN_NO_CUDA_EXT set, fails with the compiler's reason otherwise)."""
    return hashgrid_cpu


def _points(cfg: HashGridConfig, n: int, seed: int) -> torch.Tensor:
    """Random points plus edge cases: the cube's corners and faces, and points within a few ulps
    of cell boundaries of every level (x = (k - 0.5) / scale, where pos = x * scale + 0.5 = k)."""
    g = torch.Generator().manual_seed(seed)
    pts = [torch.rand(n, 3, generator=g)]
    corners = torch.tensor([[(c >> d) & 1 for d in range(3)] for c in range(8)], dtype=torch.float32)
    pts.append(corners)
    pts.append(torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.5], [0.5, 1.0, 0.0]]))
    for lv in grid_levels(cfg):
        k = torch.randint(1, lv.resolution, (12, 3), generator=g).float()
        boundary = ((k - 0.5) / lv.scale).clamp(0, 1)
        for ulps in (-2, 0, 2):
            pts.append(boundary + ulps * 6e-8)
    return torch.cat(pts).clamp(0.0, 1.0).contiguous()


def _pair(cfg: HashGridConfig, seed: int) -> tuple[HashEncoding, HashEncoding]:
    torch.manual_seed(seed)
    ref = HashEncoding(cfg, backend="torch", init_scale=1.0)
    ext = HashEncoding(cfg, backend="cuda_ext")
    ext.load_state_dict(ref.state_dict())
    return ref, ext


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cpu_build_matches_torch_reference(cpu_build, name):
    cfg = CONFIGS[name]
    ref, ext = _pair(cfg, seed=1)
    assert ext.backend == "cuda_ext"
    x = _points(cfg, 400, seed=2)
    x_ref = x.clone().requires_grad_()
    x_ext = x.clone().requires_grad_()
    y_ref, y_ext = ref(x_ref), ext(x_ext)
    torch.testing.assert_close(y_ext, y_ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    (y_ref * grad_out).sum().backward()
    (y_ext * grad_out).sum().backward()
    torch.testing.assert_close(ext.params.grad, ref.params.grad, rtol=1e-4, atol=1e-5)
    # Input gradients scale with the finest level's scale: compare relative to their size.
    scale = x_ref.grad.abs().max().item()
    torch.testing.assert_close(x_ext.grad / scale, x_ref.grad / scale, rtol=1e-4, atol=1e-5)


def test_cpu_build_default_config_forward(cpu_build):
    # The production shape (16 levels, 2^19 table), forward only, a few thousand points.
    ref, ext = _pair(HashGridConfig(), seed=4)
    x = torch.rand(3000, 3)
    torch.testing.assert_close(ext(x), ref(x), rtol=1e-5, atol=1e-5)


def test_cpu_level_scales_match_python_layout(cpu_build):
    for cfg in [*CONFIGS.values(), HashGridConfig()]:
        cpp = cpu_build.level_scales(cfg.n_levels, cfg.per_level_scale, cfg.base_resolution)
        py = torch.tensor([lv.scale for lv in grid_levels(cfg)], dtype=torch.float32)
        assert torch.equal(cpp, py)


def test_cpu_build_gradients_only_where_needed(cpu_build):
    # params frozen: only the input gradient is computed (and the other way round).
    cfg = CONFIGS["mixed_f2"]
    _, ext = _pair(cfg, seed=5)
    ext.params.requires_grad_(False)
    x = torch.rand(50, 3, requires_grad=True)
    ext(x).sum().backward()
    assert x.grad is not None and ext.params.grad is None
    ext.params.requires_grad_(True)
    ext(torch.rand(50, 3)).sum().backward()
    assert ext.params.grad is not None and ext.params.grad.abs().sum() > 0


def test_cpu_build_trains_like_reference(cpu_build):
    # Three SGD steps from identical parameters give identical parameters on both backends.
    cfg = CONFIGS["mixed_f2"]
    ref, ext = _pair(cfg, seed=6)
    x = torch.rand(256, 3)
    target = torch.randn(256, ref.n_output_dims)
    for enc in (ref, ext):
        opt = torch.optim.SGD(enc.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            ((enc(x) - target) ** 2).mean().backward()
            opt.step()
    torch.testing.assert_close(ext.params, ref.params, rtol=1e-5, atol=1e-6)


def _accumulation_case(device: str) -> None:
    # Two encode calls (like two march segments) whose gradients are summed in params.grad in
    # place must leave the .grad the reference computes for the same loss; x's gradient still
    # flows through autograd, and an existing .grad is added to, not replaced.
    cfg = CONFIGS["mixed_f2"]
    ref, ext = (enc.to(device) for enc in _pair(cfg, seed=9))
    ext.accumulate_grad_in_place = True
    g = torch.Generator().manual_seed(10)
    xs = [_points(cfg, n, seed=s).to(device) for n, s in ((300, 11), (120, 12))]
    w = [torch.randn(len(x), ref.n_output_dims, generator=g).to(device) for x in xs]
    x_in = xs[0].clone().requires_grad_()
    for enc in (ref, ext):
        x_in.grad = None
        loss = (enc(x_in) * w[0]).sum() + (enc(xs[1]) * w[1]).sum()
        loss.backward()
        if enc is ref:
            x_grad_ref = x_in.grad.clone()
    torch.testing.assert_close(ext.params.grad, ref.params.grad, rtol=1e-4, atol=1e-5)
    scale = x_grad_ref.abs().max().item()
    torch.testing.assert_close(x_in.grad / scale, x_grad_ref / scale, rtol=1e-4, atol=1e-5)
    before = ext.params.grad.clone()
    (ext(xs[1]) * w[1]).sum().backward()
    ref.params.grad = None
    (ref(xs[1]) * w[1]).sum().backward()
    torch.testing.assert_close(ext.params.grad, before + ref.params.grad, rtol=1e-4, atol=1e-5)


def test_cpu_build_accumulates_param_grad_in_place(cpu_build):
    _accumulation_case("cpu")


def test_accumulate_in_place_needs_a_leaf(cpu_build):
    from cuda_ext.hashgrid import hashgrid_encode
    _, ext = _pair(CONFIGS["f1"], seed=13)
    with pytest.raises(ValueError, match="leaf"):
        hashgrid_encode(torch.rand(4, 3), ext.params * 1.0, ext.level_offsets, ext.level_scales, 1,
                        accumulate_into_grad=True)


def test_auto_backend_uses_the_native_build(cpu_build):
    """Where the CPU build works, "auto" must pick it: training tests would otherwise pass
    quietly on the torch fallback."""
    assert HashEncoding(CONFIGS["f1"], backend="auto").backend == "cuda_ext"


def test_disabled_build_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(_backend, "_modules", {})
    monkeypatch.setattr(_backend, "_errors", {})
    monkeypatch.setenv("CITYGEN_NO_CUDA_EXT", "1")
    enc = HashEncoding(CONFIGS["f1"], backend="auto")
    assert enc.backend == "torch"
    assert "CITYGEN_NO_CUDA_EXT" in _backend.unavailable_reason()



def test_cuda_build_reports_why_it_is_missing():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU parity tests cover the CUDA build")
    assert not _backend.cuda_available()
    assert "torch.cuda.is_available() is False" in _backend.unavailable_reason()
    x = torch.rand(4, 3)
    _, ext = _pair(CONFIGS["f1"], seed=9)  # the CPU build still serves CPU tensors
    assert ext(x).shape == (4, 4)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="torch.cuda.is_available() is False: no CUDA device here")


@requires_cuda
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_build_matches_torch_reference(name):
    assert _backend.cuda_available(), _backend.unavailable_reason()
    cfg = CONFIGS[name]
    ref, ext = _pair(cfg, seed=7)
    ref, ext = ref.cuda(), ext.cuda()
    x = _points(cfg, 2000, seed=8).cuda()
    x_ref = x.clone().requires_grad_()
    x_ext = x.clone().requires_grad_()
    y_ref, y_ext = ref(x_ref), ext(x_ext)
    torch.testing.assert_close(y_ext, y_ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y_ref)
    (y_ref * grad_out).sum().backward()
    (y_ext * grad_out).sum().backward()
    torch.testing.assert_close(ext.params.grad, ref.params.grad, rtol=1e-4, atol=1e-5)
    scale = x_ref.grad.abs().max().item()
    torch.testing.assert_close(x_ext.grad / scale, x_ref.grad / scale, rtol=1e-4, atol=1e-5)


@requires_cuda
def test_cuda_build_accumulates_param_grad_in_place():
    assert _backend.cuda_available(), _backend.unavailable_reason()
    _accumulation_case("cuda")


@requires_cuda
def test_tcnn_backend_matches_reference_when_installed():
    pytest.importorskip("tinycudann", reason="tiny-cuda-nn is not installed")
    cfg = HashGridConfig(n_levels=8, log2_hashmap_size=15)
    ref = HashEncoding(cfg, backend="torch", init_scale=1.0).cuda()
    tc = HashEncoding(cfg, backend="tcnn").cuda()
    tc.load_state_dict(ref.state_dict())
    x = torch.rand(4096, 3, device="cuda")
    torch.testing.assert_close(tc(x), ref(x), rtol=1e-4, atol=1e-4)


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compile-checked here")
    result = subprocess.run([nvcc, "-c", "-arch=sm_90", "-std=c++17", str(CSRC / "hashgrid_cuda.cu"),
                             "-o", str(tmp_path / "hashgrid_cuda.o")], check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hashgrid_cuda.o").stat().st_size > 0
