"""``citygen bench export``: peak memory, time and file sizes of large exports, as JSON.

What is measured is the export machinery (windowed rendering, COG writing, chunked point
clouds), not a trained field: rendering 10^8 cells of a field takes hours on a CPU.  The scene
is :class:`LatticeCity`, an analytic :class:`~citygen.export.source.RaySource` that answers
vertical rays in closed form.  Each measurement runs in a fresh process, so its peak resident
memory (``ru_maxrss``) is its own; ``baseline_rss_mb`` is that process's peak after its imports.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from survey_io import CLASSES, Georef

from ..errors import CitygenError
from .points import PointCloud, las_writer
from .run import ExportOptions, export_scene

#: A UTM zone 32N frame (any projected CRS would do).
BENCH_GEOREF = Georef("EPSG:32632", (500_000.0, 5_000_000.0, 100.0))


class LatticeCity:
    """A city of box buildings on a square lattice, rendered exactly for vertical rays.

    Every ``period`` metres a lattice cell holds a ``footprint``-wide building centred in it,
    whose height (6..45 m) and roof colour come from a hash of the cell; a road runs along
    each lattice line (``road_width``), ground elsewhere.  Class logits are +-8 (a sure answer).
    Colours and heights carry a hashed texture at 5 cm (+-0.06 in colour, +-5 cm in height),
    so that the files compress about as a survey's would, not as flat paint does.

    Only straight-down rays (direction (0, 0, -1)) are answered: that is all an ortho / DSM /
    grid point cloud shoots, and it keeps the scene's cost far below the export's.
    """

    classes = CLASSES

    def __init__(self, size_m: float, period: float = 25.0, footprint: float = 15.0, road_width: float = 6.0):
        self.georef = BENCH_GEOREF
        self.bounds = np.array([[0.0, 0.0, 0.0], [size_m, size_m, 50.0]])
        self.period, self.footprint, self.road_width = period, footprint, road_width

    def surface(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closed form seen from above at local (x, y): height, rgb in [0, 1] (N, 3), class id."""
        ix, iy = np.floor(x / self.period), np.floor(y / self.period)
        fx, fy = x - ix * self.period, y - iy * self.period
        lo, hi = (self.period - self.footprint) / 2, (self.period + self.footprint) / 2
        building = (fx > lo) & (fx < hi) & (fy > lo) & (fy < hi)
        half_road = self.road_width / 2
        road = ~building & ((np.minimum(fx, self.period - fx) < half_road) | (np.minimum(fy, self.period - fy) < half_road))
        key = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663)
        roof = (key % 1000).astype(np.float32) / 1000.0
        h = np.floor(x * 20).astype(np.uint64) * np.uint64(0x9E3779B1) + np.floor(y * 20).astype(np.uint64) * \
            np.uint64(0x85EBCA77)                                                   # a murmur-style mix
        h ^= h >> np.uint64(15)
        h *= np.uint64(0x2C1B3C6D)
        h ^= h >> np.uint64(12)
        noise = (h % np.uint64(1024)).astype(np.float64) / 1023.0 - 0.5                      # [-0.5, 0.5]
        z = np.where(building, 6.0 + 39.0 * roof, 0.0) + 0.1 * noise
        rgb = np.stack([np.where(building, 0.4 + 0.5 * roof, np.where(road, 0.35, 0.3 + 0.1 * np.sin(x / 7.0))),
                        np.where(building, 0.3, np.where(road, 0.35, 0.5 + 0.1 * np.cos(y / 9.0))),
                        np.where(building, 0.9 - 0.5 * roof, np.where(road, 0.38, 0.25))], axis=-1)
        rgb = np.clip(rgb + 0.12 * noise[:, None], 0.0, 1.0)
        cls = np.where(building, CLASSES.index("building"), np.where(road, CLASSES.index("road"), CLASSES.index("ground")))
        return z, rgb, cls

    def render_rays(self, origins: torch.Tensor, dirs: torch.Tensor, appearance=None) -> dict[str, torch.Tensor]:
        d = dirs.double().numpy()
        if not np.allclose(d, [0.0, 0.0, -1.0]):
            raise ValueError("LatticeCity answers straight-down rays only")
        o = origins.double().numpy()
        z, rgb, cls = self.surface(o[:, 0], o[:, 1])
        logits = np.full((len(o), len(CLASSES)), -8.0, np.float32)
        logits[np.arange(len(o)), cls] = 8.0
        f32 = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        return {"rgb": f32(rgb), "distance": f32(o[:, 2] - z), "acc": torch.ones(len(o)), "semantics": f32(logits)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _raster_job(size_m: float, gsd: float, what: tuple[str, ...], out: str) -> dict:
    baseline = _peak_rss_mb()
    t0 = time.perf_counter()
    manifest = export_scene(LatticeCity(size_m), out, ExportOptions(what=what, gsd=gsd, progress=False))
    wall = time.perf_counter() - t0
    files = {k: Path(out, v) for k, v in manifest["files"].items()}
    result = {"what": list(what), "size_m": size_m, "gsd": gsd, "width": manifest["grid"]["width"],
              "height": manifest["grid"]["height"], "cells": manifest["counts"]["raster_cells"],
              "wall_s": round(wall, 1), "peak_rss_mb": round(_peak_rss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
              "file_mb": {k: round(p.stat().st_size / 1e6, 1) for k, p in files.items()}}
    try:
        # deferred: rio-cogeo is a [dev] extra, used here only for its validator
        from rio_cogeo.cogeo import cog_validate
    except ImportError:
        return result
    result["valid_cog"] = {k: cog_validate(str(p), quiet=True)[0] for k, p in files.items() if p.suffix == ".tif"}
    return result


def _points_job(n_points: int, chunk: int, path: str) -> dict:
    """Write ``n_points`` points of a LatticeCity's surface (random positions, fixed seed) to LAZ
    through the chunked writer, ``chunk`` at a time."""
    baseline = _peak_rss_mb()
    city = LatticeCity(1000.0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with las_writer(path, city.georef, city.classes, offsets=np.floor(city.georef.origin)) as sink:
        for i in range(0, n_points, chunk):
            n = min(chunk, n_points - i)
            x, y = rng.uniform(0, 1000.0, n), rng.uniform(0, 1000.0, n)
            z, rgb, cls = city.surface(x, y)
            sink.write(PointCloud(xyz=np.stack([x, y, z], 1), rgb=(rgb * 255).astype(np.uint8),
                                  classes=cls.astype(np.uint8), georef=city.georef, class_names=city.classes))
    wall = time.perf_counter() - t0
    return {"points": n_points, "chunk": chunk, "wall_s": round(wall, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "baseline_rss_mb": round(baseline, 1), "file_mb": round(Path(path).stat().st_size / 1e6, 1)}


def _in_fresh_process(fn, *args) -> dict:
    # spawn, not fork: a forked child would inherit (and report) this process's peak memory
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def bench_export(size_m: float = 1000.0, gsd: float = 0.1, n_points: int = 50_000_000, chunk: int = 1_000_000,
                 work: str | Path | None = None) -> dict:
    """Export ortho + DSM of a ``size_m`` square at ``gsd``, then write LAZ files of
    ``n_points // 10`` and ``n_points`` points in chunks; each in its own process.

    Args:
        work: folder for the files (kept); default a temp folder, removed afterwards.
    """
    if not (size_m > 0 and gsd > 0 and math.isfinite(size_m / gsd)):
        raise CitygenError(None, f"bench export: size and gsd must be positive, got {size_m}, {gsd}")
    if n_points < 10 or chunk < 1:
        raise CitygenError(None, f"bench export: --n-points must be >= 10 and the chunk >= 1, got {n_points}, {chunk}")
    with (contextlib.nullcontext(str(work)) if work is not None else tempfile.TemporaryDirectory()) as folder:
        folder = Path(folder)
        rasters = _in_fresh_process(_raster_job, size_m, gsd, ("ortho", "dsm"), str(folder / "rasters"))
        points = [_in_fresh_process(_points_job, n, chunk, str(folder / f"points_{n}.laz"))
                  for n in (n_points // 10, n_points)]
    return {"benchmark": "export", "what": "peak resident memory and wall time of windowed COG rasters and "
            "chunked LAZ, each in a fresh process (LatticeCity analytic scene)", "cpu_count": os.cpu_count(),
            "rasters": rasters, "laz": points}

