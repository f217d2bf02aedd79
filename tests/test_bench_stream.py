"""The simulated streaming fly-through (citygen/bench_stream.py) and the cache's prefetch, on a
3x3 tile of tiny packed blocks: budget, prefetch and byte accounting checked against the files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from citygen.bench_render import synthetic_field
from citygen.bench_stream import SimulatedCache, fly, lawnmower, write_blocks
from citygen.config import FieldConfig, RenderConfig
from citygen.render.realtime import pack_field
from citygen.render.realtime_sampling import RealtimeSampling
from citygen.render.streaming import BlockInfo

DEVICE_TENSORS = ("weights", "table", "offsets", "scales", "occ_bits")   # what the kernels read on the device
SPEED, FPS = 10.0, 30.0


@pytest.fixture(scope="module")
def tile(tmp_path_factory):
    """9 blocks of 100 m (the tiny field packed: ~40 KB each) written like the 100 km² tile."""
    cfg = FieldConfig(n_levels=4, log2_hashmap_size=10, hidden_dim=16, semantic_hidden_dim=16, max_resolution=64)
    template = pack_field(synthetic_field(cfg, np.array([[-5.0, -5.0, -5.0], [105.0, 105.0, 10.0]]), 16),
                          RenderConfig(step_size=1.0), sampling=RealtimeSampling(occupancy_factor=1))
    folder = tmp_path_factory.mktemp("blocks")
    manifest = write_blocks(folder, 0.09, 100.0, preset="test", margin=5.0, z_range=(-5.0, 10.0), template=template)
    return folder, manifest


def device_bytes(path) -> int:
    """Bytes of the device-resident tensors, from the file's own header (not PackedField.nbytes)."""
    total = 0
    with safe_open(str(path), "pt") as f:
        for k in DEVICE_TENSORS:
            sl = f.get_slice(k)
            assert sl.get_dtype() in ("F32", "I32")        # 4-byte elements on a CPU device
            total += int(np.prod(sl.get_shape())) * 4
    return total


def run(tile, budget_blocks: float, prefetch_m: float, read_gbps: float = 4e-5, trace: bool = True):
    """500 m at 30 m altitude and 10 m/s, 100 m draw distance (2.8 blocks in view on average)."""
    folder, manifest = tile
    one = device_bytes(folder / manifest["blocks"][0]["file"])
    return fly(manifest, folder, int(budget_blocks * one), 500.0, SPEED, FPS, altitude=30.0,
               prefetch_m=prefetch_m, far=100.0, read_gbps=read_gbps, trace=trace)


@pytest.mark.parametrize("budget_blocks", [1.5, 2.5, 4.5])
@pytest.mark.parametrize("prefetch_m", [0.0, 150.0])
def test_resident_bytes_never_over_budget(tile, budget_blocks, prefetch_m):
    folder, manifest = tile
    files = {b["id"]: folder / b["file"] for b in manifest["blocks"]}
    out = run(tile, budget_blocks, prefetch_m)
    budget = out["budget_bytes"]
    sizes = {b: device_bytes(p) for b, p in files.items()}
    peak = 0
    for frame in out["trace"]:
        held = sum(sizes[b] for b in frame["resident"]) + sum(sizes[b] for b in frame["inflight"])
        assert held <= budget, frame
        peak = max(peak, sum(sizes[b] for b in frame["resident"]))
    assert peak == out["peak_resident_bytes"] > 0


def test_prefetch_waits_less_and_never_more(tile):
    """Loads of 1 s (40 KB at 40 KB/s) against 10 s per 100 m block: without prefetch each new
    block is missing from its first frames, with 150 m of look-ahead it is mostly there in time
    (measured: 135 against 363 frames waiting; the simulated clock makes this deterministic)."""
    on, off = run(tile, 4.5, 150.0), run(tile, 4.5, 0.0)
    assert on["frames_waiting"] <= off["frames_waiting"]
    assert off["frames_waiting"] >= 100           # several 1 s loads seen missing (30 frames each)
    assert on["frames_waiting"] < 0.5 * off["frames_waiting"]
    assert on["hit_rate"] > off["hit_rate"]
    # without prefetch the path's visible blocks are the only loads; prefetch loads no block that is never seen
    seen = {b for f in off["trace"] for b in f["visible"]}
    assert set(off["loaded"]) <= seen and set(on["loaded"]) <= seen


def test_bytes_read_per_km_equal_the_files_read(tile):
    folder, manifest = tile
    for prefetch_m in (0.0, 150.0):
        out = run(tile, 2.5, prefetch_m, trace=False)
        expected = sum((folder / f"{b}.safetensors").stat().st_size for b in out["loaded"])
        assert out["bytes_read"] == expected
        assert out["path_km"] == pytest.approx(0.5, abs=1e-9)
        assert out["bytes_read_per_km"] == pytest.approx(expected / 0.5)
        assert out["loads"] == len(out["loaded"]) >= 1


def test_prefetch_never_evicts_a_visible_block(tile):
    """Room for two blocks, both visible: a prefetch of a third loads nothing and evicts nothing."""
    folder, manifest = tile
    infos = [BlockInfo(b["id"], folder / b["file"], np.zeros((2, 3)), np.zeros((2, 3)), 1000)
             for b in manifest["blocks"][:3]]
    cache = SimulatedCache(infos, 2000, read_bps=1e9)
    a, b, c = (i.id for i in infos)
    cache.begin_frame([a, b])
    cache.now = 1.0
    frame = cache.begin_frame([a, b], prefetch=[c])
    assert frame.resident == [a, b] and frame.prefetching == [] and frame.evicted == []
    cache.now = 2.0
    frame = cache.begin_frame([a], prefetch=[c])    # b left the view: it makes room for c
    assert frame.evicted == [b] and frame.prefetching == [c]
    cache.now = 3.0
    assert cache.begin_frame([c]).resident == [c]


def test_lawnmower_length_and_turns():
    side, length, spacing = 10_000.0, 10_000.0, 5.0
    p = lawnmower(side, length, spacing, 250.0)
    steps = np.linalg.norm(np.diff(p[:, :2], axis=0), axis=1)
    assert steps.sum() == pytest.approx(length, rel=2e-3)            # chords of the arcs are a bit shorter
    assert np.all(p[:, 2] == 250.0) and np.all((p[:, :2] >= 0) & (p[:, :2] <= side))
    heading = np.unwrap(np.arctan2(np.diff(p[:, 1]), np.diff(p[:, 0])))
    assert abs(heading[-1] - heading[0]) == pytest.approx(np.pi, abs=0.02)   # 7 km east, U-turn, back west


def test_bench_stream_path_too_long_is_one_line():
    result = subprocess.run([sys.executable, "-m", "citygen.cli", "bench", "stream", "--stream-area-km2", "1",
                             "--stream-path-km", "50"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "the path can be at most" in result.stderr and "Traceback" not in result.stderr


def test_bench_stream_writes_picture_and_reuses_blocks(tmp_path):
    """The whole benchmark on 9 tiny blocks: the picture is written, a second run reuses the
    block files (same manifest) instead of rewriting them."""
    from PIL import Image

    from citygen.bench_stream import bench_stream

    cfg = FieldConfig(n_levels=4, log2_hashmap_size=10, hidden_dim=16, semantic_hidden_dim=16, max_resolution=64)
    template = pack_field(synthetic_field(cfg, np.array([[-5.0, -5.0, -20.0], [105.0, 105.0, 100.0]]), 16),
                          RenderConfig(step_size=1.0), sampling=RealtimeSampling(occupancy_factor=1))
    kw = dict(area_km2=0.09, block_size=100.0, budget_gb=3.5 * template.nbytes / 1e9, path_km=0.3, speed_mps=10.0,
              altitude=150.0, prefetch_m=150.0, far=400.0, folder=tmp_path / "blocks", preset="test",
              device="cpu", template=template)
    first = bench_stream(picture=tmp_path / "fly.png", **kw)
    assert first["blocks"] == 9 and not first["blocks_reused"]
    assert first["disk_bytes"] == sum(p.stat().st_size for p in (tmp_path / "blocks").glob("*.safetensors"))
    with Image.open(tmp_path / "fly.png") as img:
        assert img.format == "PNG" and img.size[0] == 900
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "blocks").glob("*.safetensors")}
    second = bench_stream(**kw)
    assert second["blocks_reused"]
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "blocks").glob("*.safetensors")}
    for run in ("prefetch_on", "prefetch_off"):
        assert second[run]["peak_resident_plus_inflight_bytes"] <= second["budget_bytes"]
        assert second[run]["frames_waiting"] == first[run]["frames_waiting"]   # simulated clock: reproducible
