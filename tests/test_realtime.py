"""Real-time renderer: the native CPU build (the same per-ray math as the CUDA kernels) against
the torch reference renderer, the packed MLPs against the torch modules, the occupancy
bitfield against OccupancyGrid, level of detail in closed form, the block cache, and an nvcc
compile check of the CUDA file."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from citygen.config import FieldConfig, RenderConfig
from citygen.fields import CityField
from citygen.render import OccupancyGrid, render_image
from citygen.render.realtime import (
    RealtimeRenderer,
    RealtimeSampling,
    native_module,
    occupancy_bits,
    pack_field,
)
from citygen.render.streaming import (
    BlockCache,
    BlockInfo,
    StreamingRenderer,
    frustum_visible,
    load_packed,
    lod_levels,
    save_packed,
)
from survey_io import Camera

CSRC = Path(__file__).resolve().parents[1] / "cuda_ext" / "csrc"
AABB = [[-8.0, -8.0, -2.0], [8.0, 8.0, 6.0]]


def make_field(seed: int = 0, step: float = 0.25) -> tuple[CityField, RenderConfig]:
    """A small CityField with random weights scaled so that its density has structure (part
    of the box empty, opaque surfaces elsewhere), and its occupancy grid refreshed from it."""
    torch.manual_seed(seed)
    cfg = FieldConfig(n_levels=8, log2_hashmap_size=12, base_resolution=4, max_resolution=64, hidden_dim=32,
                      geo_feat_dim=15, appearance_dim=8, semantic_hidden_dim=32)
    aabb = torch.tensor(AABB)
    field = CityField(cfg, aabb, 3, 7, torch.tensor([[0.0, -14, 12], [5, 5, 10], [-5, 0, 10]]))
    with torch.no_grad():
        field.encoding.params.uniform_(-2, 2)
        for m in field.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 1.0 / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.normal_(0, 0.3)
        field.density_mlp[-1].bias[0] -= 1.0
        field.background_rgb.weight.normal_(0, 0.5)
        field.background_semantics.normal_()
        field.appearance.weight.normal_(0, 0.5)
    rc = RenderConfig(step_size=step)
    field.occupancy = OccupancyGrid(aabb, 16)
    field.occupancy.update(lambda x: field.density(x)[0], rc.step_size, alpha_threshold=0.05)
    return field.eval(), rc


def look_at(eye, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(fwd, right), fwd, eye
    return c2w


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10.0 * math.log10(float(((a - b) ** 2).mean()) + 1e-20)


# -- parity with the reference renderer (the key test) -----------------------------------------------
@pytest.mark.parametrize("eye", [(0.0, -14.0, 12.0), (9.0, 7.0, 14.0)])
def test_realtime_matches_reference_renderer(realtime_cpu, eye):
    field, rc = make_field()
    occupied = field.occupancy.occupied_fraction()
    assert 0.05 < occupied < 0.95, f"test field should be partly empty, occupancy {occupied}"
    camera = Camera(width=24, height=18, fl_x=22.0, fl_y=22.0, cx=12.0, cy=9.0)
    c2w = look_at(eye)
    ref = render_image(field, camera, c2w, render=rc)
    # The reference's own samples: the same per-sample math must give the same image (the
    # reduced default sampling has its own parity test, test_realtime_sampling.py).
    renderer = RealtimeRenderer(field, rc, backend="native", sampling=RealtimeSampling.reference())
    out = renderer.render(camera, c2w)
    assert float(ref["acc"].mean()) > 0.3, "the view should see the field, not only background"
    assert psnr(out["rgb"], ref["rgb"]) >= 35.0
    hit = ref["acc"] > 0.5
    assert torch.allclose(out["depth"][hit], ref["depth"][hit], rtol=1e-3, atol=1e-2)
    agree = (out["semantics"].argmax(-1) == ref["semantics"].argmax(-1)).float().mean()
    assert float(agree) >= 0.99
    torch.testing.assert_close(out["acc"], ref["acc"], atol=2e-3, rtol=0)
    # Empty-space skipping: fewer evaluations than samples inside the box.
    assert float(out["n_samples"].float().mean()) > 0


def test_empty_space_skipping_evaluates_only_occupied_samples(realtime_cpu):
    """The native march evaluates exactly the samples in occupied cells (up to termination):
    with termination off, its count equals the reference's count of occupied samples."""
    field, rc = make_field(seed=1)
    rc = RenderConfig(step_size=rc.step_size, min_transmittance=0.0)
    camera = Camera(width=12, height=9, fl_x=11.0, fl_y=11.0, cx=6.0, cy=4.5)
    c2w = look_at((0.0, -14.0, 12.0))
    from citygen.render import camera_rays, render_rays
    origins, dirs, _ = camera_rays(camera, c2w)
    code = field.appearance_for_position(origins[0])
    ref = render_rays(field, origins, dirs, code, step_size=rc.step_size, occupancy=field.occupancy,
                      min_transmittance=0.0)
    out = RealtimeRenderer(field, rc, backend="native", sampling=RealtimeSampling.reference()).render(camera, c2w)
    # Equal up to samples that sit on a cell boundary (the kernel builds its rays in float32,
    # the reference in float64 then rounds): at most a fraction of a percent.
    n_ref, n_out = int(ref["n_samples"]), int(out["n_samples"].sum())
    assert n_ref > 0 and abs(n_out - n_ref) <= max(2, 0.005 * n_ref), (n_out, n_ref)


# -- packed MLPs and occupancy bitfield ---------------------------------------------------------------
def test_packed_field_matches_torch_modules(realtime_cpu):
    field, rc = make_field(seed=2)
    code = field.appearance.weight[1]
    packed = pack_field(field, rc, appearance=code)
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.tensor(AABB[0]), torch.tensor(AABB[1])
    x = lo + torch.rand(500, 3, generator=g) * (hi - lo)
    dirs = torch.nn.functional.normalize(torch.randn(500, 3, generator=g), dim=-1)
    sigma, rgb, sem = realtime_cpu.eval_points(x, dirs, packed.weights, packed.table, packed.offsets, packed.scales,
                                             packed.occ_bits, packed.layout, packed.geom_f, packed.geom_i)
    with torch.no_grad():
        ref = field(x, dirs, code.expand(500, -1))
    torch.testing.assert_close(sigma, ref["sigma"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rgb, ref["rgb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sem, ref["semantics"], rtol=1e-4, atol=1e-4)


def test_packed_dense_layer_matches_nn_linear(realtime_cpu):
    """The semantic head alone (a Linear-ReLU-Linear on the geometry features) against nn.Linear:
    feed features through a field whose density MLP passes geo through unchanged."""
    field, rc = make_field(seed=3)
    lin1, lin2 = field.semantic_mlp[0], field.semantic_mlp[2]
    packed = pack_field(field, rc)
    off1, off2 = int(packed.layout[13]), int(packed.layout[14])
    S, G, C = lin1.out_features, lin1.in_features, lin2.out_features
    w = packed.weights
    torch.testing.assert_close(w[off1:off1 + S * G].reshape(S, G), lin1.weight.detach())
    torch.testing.assert_close(w[off1 + S * G:off1 + S * G + S], lin1.bias.detach())
    torch.testing.assert_close(w[off2:off2 + C * S].reshape(C, S), lin2.weight.detach())
    assert all(int(o) % 8 == 0 for o in packed.layout[7:18])


def test_occupancy_bitfield_lookup_matches_grid(realtime_cpu):
    grid = OccupancyGrid(torch.tensor(AABB), 8)
    g = torch.Generator().manual_seed(0)
    grid.occupied.copy_(torch.rand(grid.n_cells, generator=g) < 0.4)
    bits = occupancy_bits(grid.occupied)
    assert bits.numel() == math.ceil(grid.n_cells / 32)
    lo, hi = torch.tensor(AABB[0]), torch.tensor(AABB[1])
    x = lo - 1 + torch.rand(4000, 3, generator=g) * (hi - lo + 2)  # some points outside the box
    extent = torch.tensor(AABB)[1] - torch.tensor(AABB)[0]
    geom_f = torch.cat([torch.tensor(AABB).reshape(-1)] * 3 + [torch.tensor([1.0, 0.1, -9.0]), extent]).float()
    geom_i = torch.tensor([8, 1, 1, 2, 1, 1, 1], dtype=torch.int32)
    got = realtime_cpu.occupancy_query(x, bits, geom_f, geom_i)
    assert torch.equal(got, grid.query(x))
    # Closed form: one occupied cell, its centre hits, the other cells' centres miss.
    grid.occupied.zero_()
    grid.occupied[(3 * 8 + 5) * 8 + 2] = True
    centres = grid.cell_points(torch.arange(grid.n_cells)) * 0 + grid.aabb[0] + (
        torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) / 8 * (hi - lo)
    got = realtime_cpu.occupancy_query(centres.float().contiguous(), occupancy_bits(grid.occupied), geom_f, geom_i)
    assert got.nonzero().squeeze(-1).tolist() == [(3 * 8 + 5) * 8 + 2]


# -- level of detail --------------------------------------------------------------------------------
def test_lod_levels_closed_form():
    base, b, L = 16, 1.5, 12
    scales = [base * b**lv - 1 for lv in range(L)]
    extent, focal = 500.0, 1000.0
    for d in (10.0, 300.0, 1e4, 3e4, 1e5, 1e7):
        limit = 2.0 * extent * focal / d
        expected = min(max(math.floor(math.log((limit + 1) / base) / math.log(b) + 1e-9) + 1, 1), L) if limit + 1 >= base else 1
        assert lod_levels(scales, extent, focal, d) == expected, d
    # Monotone: farther never needs more levels; nearest gets all.
    ns = [lod_levels(scales, extent, focal, d) for d in np.geomspace(1, 1e8, 50)]
    assert ns == sorted(ns, reverse=True) and ns[0] == L and ns[-1] == 1


def test_lod_zeroes_finest_levels(realtime_cpu):
    """With k active levels the encoding's finer levels contribute nothing: the packed field
    then equals the torch field whose finer-level parameters are zero."""
    field, rc = make_field(seed=4)
    packed = pack_field(field, rc).with_view(n_active_levels=3)
    x = torch.rand(64, 3) * 10 - 5
    dirs = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    sigma, _, _ = realtime_cpu.eval_points(x, dirs, packed.weights, packed.table, packed.offsets, packed.scales,
                                         packed.occ_bits, packed.layout, packed.geom_f, packed.geom_i)
    with torch.no_grad():
        start = field.encoding.levels[3].offset * 2
        field.encoding.params[start:] = 0.0
        ref, _ = field.density(x)
    torch.testing.assert_close(sigma, ref, rtol=1e-4, atol=1e-5)


# -- block cache ---------------------------------------------------------------------------------
def _block(i: int, nbytes: int = 100, delay: float = 0.0) -> BlockInfo:
    lo = np.array([100.0 * i, 0.0, 0.0])
    box = np.stack([lo, lo + [100.0, 100.0, 20.0]])

    def load():
        time.sleep(delay)
        field, rc = make_field(seed=0)
        return pack_field(field, rc, sampling=RealtimeSampling.reference())  # no fine bake: cache tests

    return BlockInfo(f"b{i}", None, box, box, nbytes, load=load)


def test_block_cache_budget_and_eviction_order():
    cache = BlockCache([_block(i) for i in range(6)], budget_bytes=300)
    try:
        frame = cache.begin_frame(["b0", "b1", "b2", "b3"])         # b3 does not fit
        assert frame.loading == ["b0", "b1", "b2"] and frame.deferred == ["b3"] and frame.resident == []
        cache.wait_idle()
        assert cache.resident_bytes <= 300
        frame = cache.begin_frame(["b0", "b1", "b2"])
        assert frame.resident == ["b0", "b1", "b2"]
        cache.begin_frame(["b1"])                                    # b0, b2 leave the frustum; b1 used last
        # b4 and b5 enter: outside-frustum blocks go first, least recently used first (b0, then b2).
        frame = cache.begin_frame(["b1", "b4"])
        assert frame.evicted == ["b0"]
        cache.wait_idle()
        frame = cache.begin_frame(["b1", "b4", "b5"])
        assert frame.evicted == ["b2"]
        cache.wait_idle()
        assert sorted(cache.resident_ids()) == ["b1", "b4", "b5"] and cache.resident_bytes <= 300
        # All visible: a nearer block evicts the farthest visible one, never a nearer one.
        frame = cache.begin_frame(["b3", "b1", "b4", "b5"])
        assert frame.evicted == ["b5"] and frame.loading == ["b3"]
        cache.wait_idle()
        assert sorted(cache.resident_ids()) == ["b1", "b3", "b4"]
    finally:
        cache.close()


def test_block_cache_loads_in_background_without_blocking_frames(tmp_path):
    field, rc = make_field(seed=0)
    path = tmp_path / "b.safetensors"
    save_packed(path, pack_field(field, rc))
    assert torch.equal(load_packed(path).weights, pack_field(field, rc).weights)
    slow = _block(1, delay=0.5)
    disk = BlockInfo("disk", path, slow.aabb, slow.core, 100)
    cache = BlockCache([slow, disk], budget_bytes=1000)
    try:
        start = time.perf_counter()
        frame = cache.begin_frame(["b1", "disk"])
        assert time.perf_counter() - start < 0.2, "begin_frame must not wait on loads"
        assert frame.resident == [] and set(frame.loading) == {"b1", "disk"}
        cache.wait_idle()
        frame = cache.begin_frame(["b1", "disk"])
        assert frame.resident == ["b1", "disk"] and not cache.errors
    finally:
        cache.close()


def test_frustum_culling():
    camera = Camera(width=100, height=100, fl_x=50.0, fl_y=50.0, cx=50.0, cy=50.0)
    c2w = look_at((0.0, 0.0, 100.0), (0.0, 0.01, 0.0))  # (almost) straight down
    # Straight down from 100 m with a 90 degree field of view: the ground within ~100 m is seen.
    assert frustum_visible(camera, c2w, np.array([[-10, -10, 0], [10, 10, 5]]), far=1000)
    assert not frustum_visible(camera, c2w, np.array([[300, 300, 0], [320, 320, 5]]), far=1000)
    assert not frustum_visible(camera, c2w, np.array([[-10, -10, 200], [10, 10, 210]]), far=1000)  # behind
    assert not frustum_visible(camera, c2w, np.array([[-10, -10, 0], [10, 10, 5]]), far=50)         # too far


def test_streaming_single_block_matches_realtime(realtime_cpu):
    """One block streamed through the cache renders the same image as the direct renderer."""
    field, rc = make_field(seed=0)
    camera = Camera(width=16, height=12, fl_x=15.0, fl_y=15.0, cx=8.0, cy=6.0)
    c2w = look_at((0.0, -14.0, 12.0))
    direct = RealtimeRenderer(field, rc, backend="native")
    code = field.appearance_for_position(torch.tensor(c2w[:3, 3], dtype=torch.float32))
    ref = direct.render(camera, c2w, appearance=code)
    packed = pack_field(field, rc, appearance=code)
    info = BlockInfo("b", None, np.array(AABB), np.array(AABB), packed.nbytes, load=lambda: packed)
    cache = BlockCache([info], budget_bytes=10 * packed.nbytes)
    try:
        streamer = StreamingRenderer(cache, realtime_cpu, far=1e4, oversample=1e9)  # LOD off: all levels
        first = streamer.render(camera, c2w)
        assert first["blocks"].loading == ["b"]
        cache.wait_idle()
        out = streamer.render(camera, c2w)
        assert out["blocks"].resident == ["b"] and out["levels"]["b"] == packed.n_levels
        assert psnr(out["rgb"], ref["rgb"]) > 60
    finally:
        cache.close()


@pytest.mark.parametrize("eye", [(9.0, 7.0, 14.0), (-12.0, 3.0, 10.0)])
def test_streaming_two_blocks_composite_like_one(realtime_cpu, eye):
    """The field split at x = 0 into two blocks (clip boxes), composited front to back in the
    cache's visibility order, renders the unsplit image (the sample grid restarts at the split,
    so equality holds up to quadrature)."""
    field, rc = make_field(seed=0)
    camera = Camera(width=24, height=18, fl_x=22.0, fl_y=22.0, cx=12.0, cy=9.0)
    c2w = look_at(eye)
    code = field.appearance_for_position(torch.tensor(c2w[:3, 3], dtype=torch.float32))
    whole = RealtimeRenderer(field, rc, backend="native").render(camera, c2w, appearance=code)
    packed = pack_field(field, rc, appearance=code)
    box = np.array(AABB)
    left, right = box.copy(), box.copy()
    left[1, 0] = right[0, 0] = 0.0
    infos = [BlockInfo("left", None, box, left, packed.nbytes, load=lambda: packed),
             BlockInfo("right", None, box, right, packed.nbytes, load=lambda: packed)]
    cache = BlockCache(infos, budget_bytes=10 * packed.nbytes)
    try:
        streamer = StreamingRenderer(cache, realtime_cpu, far=1e4, oversample=1e9)
        streamer.render(camera, c2w)
        cache.wait_idle()
        out = streamer.render(camera, c2w)
        nearest_first = ["right", "left"] if eye[0] > 0 else ["left", "right"]
        assert out["blocks"].resident == nearest_first
        assert psnr(out["rgb"], whole["rgb"]) > 45
    finally:
        cache.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA real-time kernel runs on GPUs only")
def test_cuda_realtime_matches_reference_renderer():
    """The CUDA build (float16 weights and table, float accumulation) against the reference."""
    module = native_module("cuda")
    if module is None:
        from cuda_ext import realtime as rt_ext
        pytest.fail(f"a CUDA device is present but the real-time CUDA build failed: {rt_ext.unavailable_reason()}")
    field, rc = make_field()
    field = field.cuda()
    field.occupancy = field.occupancy.cuda()
    camera = Camera(width=48, height=36, fl_x=44.0, fl_y=44.0, cx=24.0, cy=18.0)
    c2w = look_at((0.0, -14.0, 12.0))
    ref = render_image(field, camera, c2w, render=rc)
    out = RealtimeRenderer(field, rc, backend="native").render(camera, c2w)
    assert out["rgb"].is_cuda
    assert psnr(out["rgb"], ref["rgb"]) >= 35.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA real-time kernel runs on GPUs only")
def test_cuda_realtime_matches_cpu_build(realtime_cpu):
    """The CUDA kernel against the CPU build of the same per-ray math, on the same field and the
    reference's samples: only the CUDA build's float16 weights and table separate the two, so the
    bounds are those of the CUDA-vs-reference test."""
    if native_module("cuda") is None:
        from cuda_ext import realtime as rt_ext
        pytest.fail(f"a CUDA device is present but the real-time CUDA build failed: {rt_ext.unavailable_reason()}")
    field, rc = make_field()
    camera = Camera(width=48, height=36, fl_x=44.0, fl_y=44.0, cx=24.0, cy=18.0)
    c2w = look_at((9.0, 7.0, 14.0))
    cpu = RealtimeRenderer(field, rc, backend="native", sampling=RealtimeSampling.reference()).render(camera, c2w)
    field = field.cuda()
    field.occupancy = field.occupancy.cuda()
    gpu = RealtimeRenderer(field, rc, backend="native", sampling=RealtimeSampling.reference()).render(camera, c2w)
    gpu = {k: v.cpu() for k, v in gpu.items() if isinstance(v, torch.Tensor)}
    assert float(cpu["acc"].mean()) > 0.3, "the view should see the field, not only background"
    assert psnr(gpu["rgb"], cpu["rgb"]) >= 35.0
    agree = (gpu["semantics"].argmax(-1) == cpu["semantics"].argmax(-1)).float().mean()
    assert float(agree) >= 0.98
    n_cpu, n_gpu = float(cpu["n_samples"].float().mean()), float(gpu["n_samples"].float().mean())
    assert abs(n_gpu - n_cpu) <= 0.05 * n_cpu


def test_realtime_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA real-time kernel cannot be compile-checked here")
    out = tmp_path / "realtime_cuda.o"
    result = subprocess.run([nvcc, "-c", "-arch=sm_90", "-std=c++17", "-I", str(CSRC), str(CSRC / "realtime_cuda.cu"),
                             "-o", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_bench_render_cpu_reports_pending_gpu_figures(realtime_cpu):
    from citygen.bench_render import bench_render

    result = bench_render(resolutions=[(32, 18)], n_frames=2, reference_frames=1, device="cpu",
                          stream_area_km2=1.0, stream_block_size=250.0, stream_budget_gb=0.002, stream_frames=4)
    assert result["gpu_figures"] == "pending" and "pending" in result["note"]
    view = result["views"][0]
    assert view["backend"] == "native" and view["reference"]["speedup"] == 1.0
    assert view["realtime"]["psnr_vs_reference_db"] >= 35.0
    assert view["realtime"]["samples_per_ray"] > 0
    assert "ESTIMATE" in result["estimate_4k_h100"]["label"]
    stream = result["streaming"]
    assert stream["blocks"] == 16 and stream["frames"] == 4
    assert 0 < stream["peak_resident_bytes"] <= stream["budget_bytes"]


def test_bench_render_rejects_bad_resolution():
    result = subprocess.run([sys.executable, "-m", "citygen.cli", "bench", "render", "--res", "wide"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "resolution must look like 1920x1080" in result.stderr and "Traceback" not in result.stderr
