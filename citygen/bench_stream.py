"""``citygen bench stream``: a fly-through of a 100 km² tile of packed blocks, by simulation.

What is real and what is simulated:

* **Blocks**: ``area_km2`` cut into square blocks of ``block_size`` metres (the plan's default
  1 km core plus its 50 m margin), one packed file per block on disk, each of the byte size a
  trained block of the ``preset`` (``block``: 16 levels, 2^21 hash table, 128^3 occupancy grid)
  packs to: the hash table, MLP weights, coarse occupancy bits and the fine occupancy bricks
  that :func:`~citygen.render.realtime.pack_field` bakes (their size depends only on the grid
  and the step, not on what was learnt).  The contents are cheap: random weights over a
  synthetic box-city occupancy and random fine bits; the sizes are the real ones.
* **Streaming**: the real :class:`~citygen.render.streaming.BlockCache` (budget, eviction order,
  prefetch) and the real visibility (frustum culling of the cores, nearest first) and level of
  detail rule (:func:`~citygen.render.streaming.lod_levels`), frame by frame; every load reads
  its whole file from disk with :func:`~citygen.render.streaming.load_packed` and keeps the
  tensors resident.  Frames are not rendered (a neural render per frame costs seconds on a CPU
  and says nothing about streaming); ``citygen bench render`` measures rendering.
* **Time**: a simulated clock, so that the figures do not depend on what else the machine is
  doing: frame ``k`` is at ``k / fps`` seconds, the camera flies ``speed_mps``, and a load takes
  ``file bytes / read_gbps`` (one loader, loads one after another, as the cache's one loader
  thread does).  The measured wall time of the real reads is reported beside it.

Flight: a lawnmower over the tile (legs east-west, 90 degree turns rounded with a 500 m
radius on 10 km) at survey altitude, truncated to ``path_km``, the camera looking forward and down by
40 degrees.  Prefetch: the path ahead is known (a recorded or scripted fly-through), so each
frame asks the cache to prefetch the blocks visible from the next ``prefetch_m`` metres of
path, soonest first.  The run is made twice, prefetch on and off.

Reported per run: resident bytes over time (checked against the budget at every frame), cache
hit rate (visible blocks resident when their frame began), loads, bytes read per km flown,
frames that waited for a block (drawn while a block they see was still loading or had no
room; the cache never blocks a frame, so such a frame shows a hole or a coarser stand-in),
stall episodes and the longest, and the level-of-detail levels used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from survey_io.atomic import atomic_path, atomic_write_json

from .bench import _cpu_name
from .bench_render import pinhole, synthetic_layout
from .config import load_config
from .errors import CitygenError
from .fields import CityField
from .images import viridis
from .partition.plan import block_id
from .render import OccupancyGrid
from .render.realtime import PackedField, pack_field
from .render.realtime_sampling import RealtimeSampling, fine_bits, fine_factors
from .render.sampling import look_at
from .render.streaming import (
    BlockCache,
    BlockInfo,
    StreamingRenderer,
    box_distance,
    load_packed,
    lod_levels,
    save_packed,
)

MANIFEST = "blocks.json"
DEVICE_TENSORS = ("weights", "table", "offsets", "scales", "occ_bits")   # PackedField.nbytes counts these
Z_RANGE = (-20.0, 100.0)   # a city block's box after tightening to the observed heights (DESIGN: field box)


# -- blocks ------------------------------------------------------------------------------------------
def template_block(preset: str = "block", block_size: float = 1000.0, margin: float = 50.0,
                   z_range: tuple[float, float] = Z_RANGE, seed: int = 0) -> PackedField:
    """A packed block of the byte size a trained ``preset`` block packs to, over the box
    [-margin, block_size + margin]^2 x z_range (module docstring): random weights, a synthetic
    box-city occupancy, and random fine occupancy bricks in its occupied cells (baking them from
    a density would cost minutes and change no byte count)."""
    cfg = load_config(preset)
    aabb = torch.tensor([[-margin, -margin, z_range[0]], [block_size + margin, block_size + margin, z_range[1]]])
    torch.manual_seed(seed)
    field = CityField(cfg.field, aabb, 4, 7)
    field.occupancy = OccupancyGrid(aabb, cfg.render.grid_resolution)
    synthetic_layout(field.occupancy, np.random.default_rng(seed))
    packed = pack_field(field, cfg.render, sampling=RealtimeSampling(occupancy_factor=1))
    default = RealtimeSampling()
    factors = fine_factors(field.occupancy, cfg.render.step_size, default.occupancy_factor, default.fine_cell_steps)
    n_fine = math.prod(factors)
    fine = torch.zeros(field.occupancy.occupied.numel(), n_fine, dtype=torch.bool)
    occupied = field.occupancy.occupied.cpu()
    gen = torch.Generator().manual_seed(seed)
    fine[occupied] = torch.rand(int(occupied.sum()), n_fine, generator=gen) < 0.5
    geom_i = packed.geom_i.clone()
    geom_i[4:7] = torch.tensor(factors, dtype=torch.int32)
    return replace(packed, occ_bits=torch.cat([packed.occ_bits, fine_bits(fine)]), geom_i=geom_i)


def shifted(packed: PackedField, offset: np.ndarray) -> PackedField:
    """``packed`` moved by ``offset`` metres (its field box, clip box and occupancy box)."""
    geom = packed.geom_f.clone()
    for start in (0, 3, 6, 9, 12, 15):
        geom[start:start + 3] += torch.as_tensor(offset, dtype=torch.float32)
    return replace(packed, geom_f=geom)


def write_blocks(folder: Path, area_km2: float, block_size: float, preset: str = "block", margin: float = 50.0,
                 z_range: tuple[float, float] = Z_RANGE, template: PackedField | None = None) -> dict[str, Any]:
    """Write the tile's packed blocks into ``folder`` (reused when its manifest matches); returns
    the manifest: blocks (id, file, core and extended rectangles), bytes per file, disk use.

    Raises:
        CitygenError: the folder's file system lacks the room (checked before writing).
    """
    folder = Path(folder)
    n = max(1, round(math.sqrt(area_km2) * 1000.0 / block_size))
    want = {"preset": preset, "area_km2": area_km2, "block_size_m": block_size, "margin_m": margin,
            "z_range": list(z_range), "rows": n, "cols": n}
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
        if (all(old.get(k) == v for k, v in want.items())
                and all((folder / b["file"]).is_file() and (folder / b["file"]).stat().st_size == b["file_bytes"]
                        for b in old.get("blocks", []))):
            old["reused"] = True
            return old
    folder.mkdir(parents=True, exist_ok=True)
    packed = template or template_block(preset, block_size, margin, z_range)
    probe = folder / ".probe.safetensors"
    save_packed(probe, packed)
    file_bytes = probe.stat().st_size
    probe.unlink()
    need = file_bytes * n * n
    free = shutil.disk_usage(folder).free
    if need > 0.8 * free:
        raise CitygenError(folder, f"bench stream: {n * n} blocks of {file_bytes / 1e6:.0f} MB need "
                                   f"{need / 1e9:.1f} GB, the file system has {free / 1e9:.1f} GB free "
                                   "(keep 20 % spare); choose another --stream-dir or a smaller --area-km2")
    blocks = []
    for r in range(n):
        for c in range(n):
            bid = block_id(r, c)
            x0, y0 = c * block_size, r * block_size
            save_packed(folder / f"{bid}.safetensors", shifted(packed, np.array([x0, y0, 0.0])))
            blocks.append({"id": bid, "file": f"{bid}.safetensors", "file_bytes": (folder / f"{bid}.safetensors").stat().st_size,
                           "core": [x0, y0, x0 + block_size, y0 + block_size],
                           "extended": [x0 - margin, y0 - margin, x0 + block_size + margin, y0 + block_size + margin]})
    manifest = {**want, "block_bytes_cpu": packed.nbytes, "file_bytes": file_bytes,
                "disk_bytes": sum(b["file_bytes"] for b in blocks), "free_bytes_before": free, "blocks": blocks}
    atomic_write_json(manifest_path, manifest)
    manifest["reused"] = False
    return manifest


# -- the flight --------------------------------------------------------------------------------------
def lawnmower(side: float, length: float, spacing: float, altitude: float, turn_radius: float | None = None,
              legs: tuple[float, ...] = (0.15, 0.35, 0.55, 0.75), inset: float = 0.15) -> np.ndarray:
    """Camera positions (N, 3) every ``spacing`` metres along a lawnmower over a square tile of
    ``side`` metres (legs east-west at the given fractions of the side, alternating direction,
    corners rounded with ``turn_radius``, default 5 % of the side), ``length`` metres long, at
    ``altitude``."""
    turn_radius = 0.05 * side if turn_radius is None else turn_radius
    pts = []
    for k, f in enumerate(legs):
        xs = (inset, 1 - inset) if k % 2 == 0 else (1 - inset, inset)
        pts += [(xs[0] * side, f * side), (xs[1] * side, f * side)]
    dense = [np.array(pts[0], dtype=np.float64)]
    for i in range(1, len(pts) - 1):
        p, prev, nxt = (np.array(q, dtype=np.float64) for q in (pts[i], pts[i - 1], pts[i + 1]))
        a, b = (p - prev) / np.linalg.norm(p - prev), (nxt - p) / np.linalg.norm(nxt - p)
        turn = math.atan2(a[0] * b[1] - a[1] * b[0], float(a @ b))
        if abs(turn) < 1e-9:
            dense.append(p)
            continue
        t1 = p - a * turn_radius * math.tan(abs(turn) / 2)
        centre = t1 + np.array([-a[1], a[0]]) * turn_radius * math.copysign(1.0, turn)
        start = math.atan2(*(t1 - centre)[::-1])
        for s in np.linspace(0.0, 1.0, 64):
            ang = start + turn * s
            dense.append(centre + turn_radius * np.array([math.cos(ang), math.sin(ang)]))
    dense.append(np.array(pts[-1], dtype=np.float64))
    dense = np.array(dense)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    if length > arc[-1] + 1e-6:
        raise CitygenError(None, f"bench stream: the path can be at most {arc[-1] / 1000:.1f} km on this tile, "
                                 f"got {length / 1000:.1f} km")
    s = np.arange(0.0, length + 1e-9, spacing)
    return np.stack([np.interp(s, arc, dense[:, 0]), np.interp(s, arc, dense[:, 1]), np.full_like(s, altitude)], -1)


def path_poses(positions: np.ndarray, pitch_deg: float = 40.0) -> list[np.ndarray]:
    """Camera-to-world matrices along ``positions``, looking along the path and down by ``pitch_deg``."""
    down = math.tan(math.radians(pitch_deg))
    out = []
    for k, eye in enumerate(positions):
        nxt = positions[min(k + 1, len(positions) - 1)] - positions[max(k - 1, 0)] if len(positions) > 1 else np.array([1.0, 0, 0])
        heading = nxt / max(np.linalg.norm(nxt), 1e-9)
        out.append(look_at(eye, eye + heading + np.array([0.0, 0.0, -down])))
    return out


# -- the simulated loader ----------------------------------------------------------------------------
class SimulatedCache(BlockCache):
    """A :class:`BlockCache` whose loads finish on a simulated clock (module docstring).

    Each load reads its file at once (real I/O, timed: ``read_log``) and becomes resident at the
    first frame whose time is at or past its finish: ``max(request, loader free) + bytes /
    read_bps``.  ``read_bps`` None: the measured read time instead.
    """

    def __init__(self, blocks: list[BlockInfo], budget_bytes: int, device: torch.device | str = "cpu",
                 read_bps: float | None = 1e9):
        self.now = 0.0
        self.read_bps = read_bps
        self._pending: list[tuple[float, str, PackedField | None, str | None, float]] = []
        self._loader_free = 0.0
        self.read_log: list[dict[str, Any]] = []
        super().__init__(blocks, budget_bytes, device)

    def _start_loader(self) -> None:
        pass   # no thread: loads run in _submit and finish on the simulated clock

    def close(self) -> None:
        pass

    def _submit(self, block_id: str) -> None:
        info = self.blocks[block_id]
        start = time.perf_counter()
        nbytes = os.stat(info.path).st_size
        packed, error = None, None
        try:
            packed = load_packed(info.path).with_view(clip=info.core).to(self.device)
            if self.device.type == "cpu":
                # safetensors maps the file; copying reads every byte now, as a device upload
                # does (else the bytes would be read at first use, by the frame)
                packed = replace(packed, **{k: getattr(packed, k).clone() for k in DEVICE_TENSORS})
        except CitygenError as err:
            error = str(err)
        wall = time.perf_counter() - start
        took = nbytes / self.read_bps if self.read_bps else wall
        finish = max(self.now, self._loader_free) + took
        self._loader_free = finish
        self.read_log.append({"block": block_id, "bytes": nbytes, "wall_s": wall, "requested": self.now,
                              "finish": finish})
        self._pending.append((finish, block_id, packed, error, took))

    def _poll(self) -> None:
        done = [p for p in self._pending if p[0] <= self.now + 1e-12]
        self._pending = [p for p in self._pending if p[0] > self.now + 1e-12]
        for _, bid, packed, error, took in done:
            self._admit((bid, packed, error, took))


def fly(manifest: dict[str, Any], folder: Path, budget_bytes: int, path_m: float, speed_mps: float = 100.0,
        fps: float = 30.0, altitude: float = 250.0, prefetch_m: float = 1500.0, far: float = 3000.0,
        read_gbps: float | None = 1.0, device: str | torch.device = "cpu", resolution: tuple[int, int] = (1920, 1080),
        positions: np.ndarray | None = None, visible: list[list[str]] | None = None,
        trace: bool = False) -> dict[str, Any]:
    """One simulated fly-through (module docstring); ``prefetch_m`` 0 = prefetch off.
    ``positions``/``visible`` reuse a path and its per-frame visibility (the prefetch-off run)."""
    folder = Path(folder)
    device = torch.device(device)
    side = max(b["core"][2] for b in manifest["blocks"]) - min(b["core"][0] for b in manifest["blocks"])
    z0, z1 = manifest["z_range"]
    infos = []
    for b in manifest["blocks"]:
        ext, core = b["extended"], b["core"]
        infos.append(BlockInfo(b["id"], folder / b["file"], np.array([[ext[0], ext[1], z0], [ext[2], ext[3], z1]]),
                               np.array([[core[0], core[1], z0], [core[2], core[3], z1]]), 0))
    nbytes = load_packed(infos[0].path).to(device).nbytes if device.type == "cuda" else manifest["block_bytes_cpu"]
    infos = [replace(i, nbytes=nbytes) for i in infos]
    spacing = speed_mps / fps
    if positions is None:
        positions = lawnmower(side, path_m, spacing, altitude)
    poses = path_poses(positions)
    camera = pinhole(*resolution)
    cache = SimulatedCache(infos, budget_bytes, device, read_bps=None if read_gbps is None else read_gbps * 1e9)
    streamer = StreamingRenderer(cache, module=None, far=far)
    if visible is None:
        visible = [streamer.visible_blocks(camera, c2w) for c2w in poses]
    ahead = max(0, round(prefetch_m / spacing))
    template = load_packed(infos[0].path)
    focal = max(camera.fl_x, camera.fl_y)
    extent = float((infos[0].aabb[1] - infos[0].aabb[0]).max())
    offsets = template.offsets.numpy()
    dt = 1.0 / fps
    resident_t, inflight_t, levels, table_frac = [], [], [], []
    seen = hits = waited = block_frames_missing = 0
    resident_s: dict[str, float] = {}
    stalls, open_stall, longest = 0, {}, 0
    frames_trace = []
    for k, c2w in enumerate(poses):
        cache.now = k * dt
        soon: list[str] = []
        if ahead:
            for j in range(k + 1, min(k + 1 + ahead, len(poses))):
                soon += [b for b in visible[j] if b not in soon]
        frame = cache.begin_frame(visible[k], soon)
        res_b, inf_b = cache.resident_bytes, cache.inflight_bytes
        if res_b + inf_b > budget_bytes:
            raise RuntimeError(f"block cache over budget at frame {k}: {res_b + inf_b} > {budget_bytes}")
        resident_t.append(res_b)
        inflight_t.append(inf_b)
        for b in cache.resident_ids():
            resident_s[b] = resident_s.get(b, 0.0) + dt
        missing = [b for b in visible[k] if b not in frame.resident]
        seen += len(visible[k])
        hits += len(frame.resident)
        block_frames_missing += len(missing)
        waited += bool(missing)
        for b in missing:
            if b not in open_stall:
                stalls += 1
                open_stall[b] = 0
            open_stall[b] += 1
            longest = max(longest, open_stall[b])
        open_stall = {b: v for b, v in open_stall.items() if b in missing}
        eye = c2w[:3, 3]
        for b in frame.resident:
            n = lod_levels(template.level_scales, extent, focal, box_distance(eye, cache.blocks[b].core))
            levels.append(n)
            table_frac.append(float(offsets[n] / offsets[-1]))
        if trace:
            frames_trace.append({"t": cache.now, "visible": list(visible[k]), "resident": cache.resident_ids(),
                                 "inflight": sorted(cache.inflight_ids()), "resident_bytes": res_b, "inflight_bytes": inf_b})
    cache.close()
    km = (len(poses) - 1) * spacing / 1000.0
    bytes_read = sum(r["bytes"] for r in cache.read_log)
    walls = [r["wall_s"] for r in cache.read_log]
    out: dict[str, Any] = {
        "prefetch_m": prefetch_m, "block_bytes_device": nbytes, "frames": len(poses), "path_km": km, "sim_seconds": len(poses) * dt,
        "peak_resident_bytes": max(resident_t), "peak_resident_plus_inflight_bytes":
            max(r + i for r, i in zip(resident_t, inflight_t)),
        "budget_bytes": budget_bytes, "within_budget": True,
        "visible_blocks_mean": statistics.mean(len(v) for v in visible),
        "visible_blocks_max": max(len(v) for v in visible),
        "hit_rate": hits / seen if seen else 1.0, "loads": len(cache.read_log), "bytes_read": bytes_read,
        "bytes_read_per_km": bytes_read / km if km > 0 else None,
        "frames_waiting": waited, "frames_waiting_fraction": waited / len(poses),
        "block_frames_missing": block_frames_missing, "stall_episodes": stalls, "longest_stall_frames": longest,
        "longest_stall_s": longest * dt, "load_errors": cache.errors,
        "lod_levels_mean": statistics.mean(levels) if levels else None,
        "lod_levels_hist": {str(n): levels.count(n) for n in sorted(set(levels))},
        "lod_table_fraction_mean": statistics.mean(table_frac) if table_frac else None,
        "read_wall_s_median": statistics.median(walls) if walls else None,
        "read_gbps_measured": bytes_read / sum(walls) / 1e9 if walls and sum(walls) > 0 else None,
        "resident_bytes_series": resident_t, "inflight_bytes_series": inflight_t,
        "resident_seconds": resident_s, "loaded": [r["block"] for r in cache.read_log],
    }
    if trace:
        out["trace"] = frames_trace
    out["_positions"], out["_visible"] = positions, visible
    return out


# -- the picture -------------------------------------------------------------------------------------
def _viridis(x: float) -> tuple[int, int, int]:
    return tuple(int(round(c)) for c in viridis(x))


def draw_flythrough(path: Path, manifest: dict[str, Any], runs: dict[str, dict[str, Any]], size_px: int = 900) -> Path:
    """The plan's blocks coloured by seconds resident (prefetch on), the path over them, and
    resident bytes over time of both runs against the budget."""
    on, off = runs["prefetch_on"], runs["prefetch_off"]
    blocks = manifest["blocks"]
    x0 = min(b["core"][0] for b in blocks)
    x1 = max(b["core"][2] for b in blocks)
    pad = 40
    scale = (size_px - 2 * pad) / (x1 - x0)
    chart_h = 260
    img = Image.new("RGB", (size_px, size_px + chart_h + 40), (255, 255, 255))
    d = ImageDraw.Draw(img)

    def px(x, y):
        return pad + (x - x0) * scale, pad + (x1 - y) * scale

    top = max(on["resident_seconds"].values(), default=1.0)
    for b in blocks:
        s = on["resident_seconds"].get(b["id"], 0.0)
        (ua, va), (ub, vb) = px(b["core"][0], b["core"][3]), px(b["core"][2], b["core"][1])
        d.rectangle([ua, va, ub, vb], fill=_viridis(s / top) if s > 0 else (235, 235, 235), outline=(80, 80, 80))
        if s > 0:
            d.text((ua + 3, va + 3), f"{s:.0f}s", fill=(255, 255, 255) if s / top < 0.6 else (0, 0, 0))
    pos = on["_positions"]
    pts = [px(p[0], p[1]) for p in pos[:: max(1, len(pos) // 400)]] + [px(*pos[-1][:2])]
    d.line(pts, fill=(220, 30, 30), width=3)
    for (u, v), label in ((pts[0], "start"), (pts[-1], "end")):
        d.ellipse([u - 6, v - 6, u + 6, v + 6], fill=(220, 30, 30))
        d.rectangle([u + 8, v - 7, u + 12 + 6 * len(label), v + 7], fill=(255, 255, 255))
        d.text((u + 10, v - 6), label, fill=(220, 30, 30))
    d.text((pad, 8), f"{manifest['rows']}x{manifest['cols']} blocks of {manifest['block_size_m']:.0f} m "
                     f"({manifest['file_bytes'] / 1e6:.0f} MB each), {on['path_km']:.1f} km path at "
                     f"{pos[0][2]:.0f} m; colour: seconds resident (prefetch on); north up", fill=(0, 0, 0))
    # resident bytes over time
    cy0, cy1, cx0, cx1 = size_px + 20, size_px + chart_h, pad + 40, size_px - pad
    budget = on["budget_bytes"]
    n = len(on["resident_bytes_series"])
    d.rectangle([cx0, cy0, cx1, cy1], outline=(0, 0, 0))

    def cpt(i, v):
        return cx0 + (cx1 - cx0) * i / max(n - 1, 1), cy1 - (cy1 - cy0) * v / (1.1 * budget)

    d.line([cpt(0, budget), cpt(n - 1, budget)], fill=(0, 0, 0), width=1)
    d.text((cx0 + 4, cpt(0, budget)[1] - 14), f"budget {budget / 1e9:.1f} GB", fill=(0, 0, 0))
    for run, color in ((off, (160, 160, 160)), (on, (30, 90, 220))):
        series = np.asarray(run["resident_bytes_series"])
        step = max(1, n // 800)
        d.line([cpt(i, float(series[i])) for i in range(0, n, step)], fill=color, width=2)
    d.text((cx0 - 12, cy1 - 10), "0", fill=(0, 0, 0))
    d.text((cx0, cy1 + 4), f"resident bytes over {on['sim_seconds']:.0f} s: prefetch on (blue), off (grey)",
           fill=(0, 0, 0))
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path


# -- the benchmark -----------------------------------------------------------------------------------
def bench_stream(area_km2: float = 100.0, block_size: float = 1000.0, budget_gb: float | None = None,
                 path_km: float = 10.0, speed_mps: float = 100.0, fps: float = 30.0, altitude: float = 250.0,
                 prefetch_m: float = 1500.0, far: float = 3000.0, read_gbps: float | None = 1.0,
                 folder: Path | None = None, picture: Path | None = None, preset: str = "block",
                 device: str = "auto", template: PackedField | None = None) -> dict[str, Any]:
    """Write (or reuse) the tile's blocks, fly it with prefetch on and off, return the JSON-ready
    result (module docstring).  Without ``folder`` the blocks go to a temporary folder that is
    removed afterwards."""
    if device == "cuda" and not torch.cuda.is_available():
        raise CitygenError(None, "bench: --device cuda, but torch sees no CUDA device here")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    budget = int((budget_gb if budget_gb is not None else (12.0 if dev.type == "cuda" else 2.0)) * 1e9)
    n = max(1, round(math.sqrt(area_km2) * 1000.0 / block_size))
    positions = lawnmower(n * block_size, path_km * 1000.0, speed_mps / fps, altitude)  # a bad length fails before any write
    start = time.perf_counter()
    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="citygen_stream_")
        folder = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        manifest = write_blocks(Path(folder), area_km2, block_size, preset, template=template)
        write_s = time.perf_counter() - t0
        on = fly(manifest, folder, budget, path_km * 1000.0, speed_mps, fps, altitude, prefetch_m, far, read_gbps, dev,
                 positions=positions)
        off = fly(manifest, folder, budget, path_km * 1000.0, speed_mps, fps, altitude, 0.0, far, read_gbps, dev,
                  positions=on["_positions"], visible=on["_visible"])
        runs = {"prefetch_on": on, "prefetch_off": off}
        if picture is not None:
            draw_flythrough(Path(picture), manifest, runs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    block_bytes = on["block_bytes_device"]
    for run in runs.values():
        series = run.pop("resident_bytes_series")
        inflight = run.pop("inflight_bytes_series")
        step = max(1, len(series) // 200)
        run["resident_bytes_every_s"] = [series[i] for i in range(0, len(series), step)]
        run["series_step_s"] = step / fps
        run["inflight_bytes_max"] = max(inflight)
        run.pop("_positions")
        run.pop("_visible")
        run.pop("block_bytes_device", None)
    return {
        "benchmark": "stream", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(), "what": "simulated clock; real files, cache, visibility and LOD rule; "
                                             "frames not rendered (module docstring of citygen/bench_stream.py)",
        "preset": preset, "area_km2": area_km2, "blocks": len(manifest["blocks"]), "block_size_m": block_size,
        "block_bytes_device": block_bytes,
        "file_bytes": manifest["file_bytes"], "disk_bytes": manifest["disk_bytes"],
        "blocks_reused": manifest["reused"], "write_s": write_s, "budget_bytes": budget,
        "path_km": path_km, "speed_mps": speed_mps, "fps": fps, "altitude_m": altitude, "far_m": far,
        "prefetch_m": prefetch_m, "read_gbps_model": read_gbps,
        "picture": str(picture) if picture is not None else None, "wall_s": time.perf_counter() - start, **runs,
    }


__all__ = ["SimulatedCache", "bench_stream", "draw_flythrough", "fly", "lawnmower", "path_poses", "template_block",
           "write_blocks"]
