"""``citygen bench render``: frames per second of the real-time renderer, as JSON.

Two parts:

* **Single tile/block fly-through** at each requested resolution (default 1920x1080 and
  3840x2160 on a GPU; pass small ones such as ``--res 160x90`` on a CPU): the real-time path
  (``citygen.render.realtime``, native build for the device) and the torch reference renderer
  on the same device and views (the 1.0x baseline), with frame times, time per stage, mean
  field evaluations per ray, and peak GPU memory.  The field is a trained run/tile when given,
  else a synthetic one: production-sized hash grid and MLPs with random weights over a
  synthetic city layout (ground plus box buildings in the occupancy grid, density made opaque
  so rays stop a few samples past the first occupied cell, as on a converged city).
* **Streaming**: a synthetic tile of ``stream_area_km2`` (default 100 km²) cut into blocks,
  random weights, flown through with a :class:`~citygen.render.streaming.BlockCache` under a
  memory budget (default 12 GB on a GPU): FPS, worst frame time, blocks resident / loading,
  peak resident bytes.  The blocks' files are a few distinct packed blocks written once to a
  temporary folder and reused (block ``i`` reads file ``i % n_files``, placed at its own
  position), so the benchmark does not need tens of GB of disk.

Representation choice (why fused field evaluation): the occupancy grid the trainer already
keeps bounds the samples evaluated per ray to the few around the first surface (measured:
``samples_per_ray`` in the output), so a fused encode + MLP per sample costs little more than a
proposal network would (which needs its own evaluations per ray) and keeps the field live —
edits, restyling and semantics apply at render time — whereas a baked mesh/texture would be
faster per pixel but must be re-baked after every edit and loses the volumetric semantics
and soft geometry.  The one mesh the real-time path does bake is not a replacement but a bound
(``--narrow-band``, :mod:`citygen.render.envelope`, Adaptive Shells): per block an outer and an
inner shell from the density, within 10 % of the packed block's bytes, give each pixel the
interval [t_in, t_out] in which the field is still evaluated, so the field stays live (an edit
re-bakes only the envelope of the blocks it touches, seconds per block) while the samples before
the first surface go; what it buys is reported, not assumed (samples per pixel with and without
the band, PSNR against the reference and the survey's ground truth, bake seconds, and the
roofline estimate at 1920x1080 and 3840x2160).  The real-time path renders with the reduced sampling of
:mod:`citygen.render.realtime_sampling` (reported as ``sampling``; on the synthetic field
without its fine occupancy level, which could skip nothing in its uniformly opaque cells), so
``psnr_vs_reference_db`` is the price of that reduction.  ``estimate_4k`` turns the measured
samples per ray into an H100 frame time from FLOPs and bytes per sample; it is an estimate with
its assumptions spelled out, never a measurement.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from cuda_ext import realtime as rt_ext
from survey_io import Camera

from .bench import _cpu_name
from .config import FieldConfig, RenderConfig
from .errors import CitygenError
from .fields import CityField
from .images import colorize_heat, load_rgb, rgb_to_uint8, write_png
from .render import OccupancyGrid, render_image
from .render.envelope import bake_field_envelope
from .render.realtime import RealtimeRenderer, native_module, pack_field
from .render.realtime_sampling import RealtimeSampling
from .render.sampling import look_at
from .render.streaming import BlockCache, BlockInfo, StreamingRenderer, load_packed, save_packed
from .store.checkpoint import read_sidecar, resolve_checkpoint
from .store.field import load_field
from .store.layout import PLAN_FILE, discover
from .train.data import load_survey

GPU_PENDING = ("GPU figures pending: this run had no CUDA device; the numbers below are CPU figures of the "
               "same per-ray math (native CPU build) and say nothing about GPU frame rates.")


def parse_resolution(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CitygenError(None, f"bench render: resolution must look like 1920x1080, got {text!r}") from None
    if w < 1 or h < 1:
        raise CitygenError(None, f"bench render: resolution must be positive, got {text!r}")
    return w, h


def fly_path(aabb: np.ndarray, n_frames: int, altitude: float, pitch_deg: float = 40.0,
             length: float | None = None) -> list[np.ndarray]:
    """A straight fly-through along the box's diagonal at ``altitude`` above its top, looking
    forward and down by ``pitch_deg``: from 15% to 85% of the diagonal, or ``length`` metres
    from the 15% point when given."""
    lo, hi = np.asarray(aabb[0], dtype=np.float64), np.asarray(aabb[1], dtype=np.float64)
    start = np.array([lo[0] + 0.15 * (hi[0] - lo[0]), lo[1] + 0.15 * (hi[1] - lo[1]), hi[2] + altitude])
    end = np.array([lo[0] + 0.85 * (hi[0] - lo[0]), lo[1] + 0.85 * (hi[1] - lo[1]), hi[2] + altitude])
    heading = (end - start) / max(np.linalg.norm(end - start), 1e-9)
    if length is not None:
        end = start + heading * length
    down = math.tan(math.radians(pitch_deg))
    out = []
    for s in np.linspace(0.0, 1.0, max(n_frames, 1)):
        eye = start + s * (end - start)
        out.append(look_at(eye, eye + heading + np.array([0.0, 0.0, -down])))
    return out


def pinhole(width: int, height: int, fov_deg: float = 60.0) -> Camera:
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return Camera(width=width, height=height, fl_x=f, fl_y=f, cx=width / 2, cy=height / 2)


# -- synthetic fields ------------------------------------------------------------------------------
def synthetic_layout(occupancy, rng: np.random.Generator, ground: float = 2.0, coverage: float = 0.35) -> None:
    """Fill an OccupancyGrid with a synthetic city: a ground slab and box buildings."""
    r = occupancy.resolution
    lo, hi = occupancy.aabb[0].cpu().numpy(), occupancy.aabb[1].cpu().numpy()
    size = (hi - lo) / r
    z = lo[2] + (np.arange(r) + 0.5) * size[2]
    occ = np.zeros((r, r, r), dtype=bool)
    occ[:, :, z <= lo[2] + ground] = True
    cell = max(r // 8, 2)
    for i in range(0, r, cell):
        for j in range(0, r, cell):
            if rng.random() < coverage * 2:
                h = lo[2] + ground + rng.uniform(0.15, 0.8) * (hi[2] - lo[2] - ground)
                w = max(1, int(cell * rng.uniform(0.4, 0.8)))
                occ[i:i + w, j:j + w, z <= h] = True
    occupancy.occupied.copy_(torch.from_numpy(occ.reshape(-1)))
    occupancy.density.copy_(torch.where(occupancy.occupied, 1.0, 0.0))


def synthetic_field(cfg: FieldConfig, aabb: np.ndarray, grid_resolution: int = 128, seed: int = 0,
                    device: str | torch.device = "cpu"):
    """A CityField with random weights over a synthetic layout (see the module docstring)."""
    torch.manual_seed(seed)
    aabb_t = torch.as_tensor(aabb, dtype=torch.float32)
    field = CityField(cfg, aabb_t, 4, 7)
    with torch.no_grad():
        field.encoding.params.uniform_(-0.5, 0.5)
        field.density_mlp[-1].bias[0] += 4.0   # near-opaque surfaces: rays stop a few samples into an occupied cell
    field.occupancy = OccupancyGrid(aabb_t, grid_resolution)
    synthetic_layout(field.occupancy, np.random.default_rng(seed))
    return field.to(device).eval()


def load_bench_field(tile: Path, device: torch.device):
    """(field, render config, label) from a training run, a checkpoint or a tile (its first trained block)."""
    tile = Path(tile)
    source = tile
    if (tile / PLAN_FILE).is_file():
        blocks = sorted(discover(tile).trained.values())  # the first block folder by name
        if not blocks:
            raise CitygenError(tile, "bench render: the tile has no trained block")
        source = blocks[0]
    sidecar = resolve_checkpoint(source)
    field, meta = load_field(sidecar, device)
    return field, meta["train_config"].render, str(sidecar)


# -- measurements ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def per_sample_cost(field) -> dict[str, float]:
    """FLOPs and hash-table bytes of one field evaluation (density + colour + semantics)."""
    cfg = field.cfg
    enc = field.encoding.n_output_dims
    H, G, S, C = cfg.hidden_dim, cfg.geo_feat_dim, cfg.semantic_hidden_dim, field.n_classes
    macs = enc * H + H * (1 + G) + G * H + (cfg.color_hidden_layers - 1) * H * H + 3 * H + G * S + S * C
    interp = cfg.n_levels * 8 * (cfg.n_features_per_level * 2 + 8)  # weights, products, index math (rough)
    return {"flops": 2.0 * macs + interp,
            "table_bytes_fp16": float(cfg.n_levels * 8 * cfg.n_features_per_level * 2)}


def estimate_4k(samples_per_ray: float, cost: dict[str, float],
                resolution: tuple[int, int] = (3840, 2160)) -> dict[str, Any]:
    """H100 frame-time ESTIMATE at ``resolution`` (default 3840x2160) from samples per ray and the
    per-sample cost.

    Three bounds per evaluated sample: the MLPs as scalar fp32 FMAs (this kernel), the MLPs on
    fp16 tensor cores (the planned fused-MLP kernel), and the hash-table gathers served from L2
    (a block's fp16 table, at most 2^19 x 16 levels x 4 B = 32 MiB, fits the 50 MB L2).  The
    frame time of a design is the larger of its compute bound and the gather bound; also given
    is the most samples per ray that still allows 30 FPS.
    """
    rays = resolution[0] * resolution[1]
    samples = rays * samples_per_ray
    scalar = 51e12 * 0.25        # H100 PCIe fp32 non-tensor peak, 25% for thread-per-ray scalar code
    tensor = 756e12 * 0.15       # H100 PCIe fp16 dense tensor-core peak, 15% for tiny 64-wide layers
    l2 = 5.5e12 * 0.5            # assumed L2 bandwidth, 50% for 4-byte random gathers in 32-byte sectors
    gather_bytes = cost["table_bytes_fp16"] * 8  # each corner costs a whole 32-byte sector

    per_sample = {"scalar_mlp_s": cost["flops"] / scalar, "tensor_core_mlp_s": cost["flops"] / tensor,
                  "l2_gathers_s": gather_bytes / l2}
    frame_scalar = samples * max(per_sample["scalar_mlp_s"], per_sample["l2_gathers_s"])
    frame_tc = samples * max(per_sample["tensor_core_mlp_s"], per_sample["l2_gathers_s"])

    def max_spr(per: float) -> float:
        return (1.0 / 30.0) / (rays * per)

    return {
        "label": "ESTIMATE from FLOPs and bytes per sample, not a measurement",
        "resolution": f"{resolution[0]}x{resolution[1]}",
        "assumptions": ["H100 PCIe peaks: 51 TFLOP/s fp32, 756 TFLOP/s fp16 tensor (dense); L2 ~5.5 TB/s (assumed)",
                        "efficiencies: 25% scalar fp32, 15% tensor core, 50% L2 for random 4-byte gathers",
                        ("every hash-corner read costs a 32-byte sector and the block's table stays in L2 "
                         "(pessimistic: neighbouring rays of a warp share sectors at the coarse levels)"),
                        "frame = samples x max(compute, gathers); ray setup, compositing, streaming ignored",
                        f"samples per ray = {samples_per_ray:.2f}, as measured on the CPU build for this field/path"],
        "samples_per_frame": samples,
        "frame_ms_scalar_mlp": 1e3 * frame_scalar, "fps_scalar_mlp": 1.0 / frame_scalar if frame_scalar else None,
        "frame_ms_tensor_core_mlp": 1e3 * frame_tc, "fps_tensor_core_mlp": 1.0 / frame_tc if frame_tc else None,
        "max_samples_per_ray_for_30fps_scalar_mlp":
            max_spr(max(per_sample["scalar_mlp_s"], per_sample["l2_gathers_s"])),
        "max_samples_per_ray_for_30fps_tensor_core_mlp":
            max_spr(max(per_sample["tensor_core_mlp_s"], per_sample["l2_gathers_s"])),
    }


def bench_views(field, render_cfg: RenderConfig, device: torch.device, resolutions: list[tuple[int, int]],
                n_frames: int, reference_frames: int, altitude: float,
                sampling: RealtimeSampling | None = None) -> list[dict[str, Any]]:
    """Real-time (with ``sampling``, None = its defaults) vs reference on the same fly-through
    views, per resolution."""
    renderer = RealtimeRenderer(field, render_cfg, device=device, sampling=sampling)
    path_aabb = field.aabb.detach().cpu().numpy()
    results = []
    for W, H in resolutions:
        camera = pinhole(W, H)
        views = fly_path(path_aabb, n_frames, altitude)
        entry: dict[str, Any] = {"resolution": f"{W}x{H}", "frames": len(views), "backend": renderer.backend,
                                 "fallback_reason": renderer.fallback_reason}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, stages, samples = [], [], []
        renderer.render(camera, views[0])                              # warm-up (JIT, allocator)
        for c2w in views:
            _sync(device)
            start = time.perf_counter()
            out = renderer.render(camera, c2w)
            _sync(device)
            times.append(time.perf_counter() - start)
            stages.append(renderer.timings)
            if "n_samples" in out:
                samples.append(float(out["n_samples"].float().mean()))
        entry["realtime"] = {
            "frame_s_median": statistics.median(times), "frame_s_worst": max(times),
            "fps": 1.0 / statistics.median(times),
            "stages_s_median": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
            "samples_per_ray": statistics.mean(samples) if samples else None,
            "peak_gpu_bytes": _peak_memory(device)}
        if reference_frames > 0:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ref_times, psnrs = [], []
            for c2w in views[:reference_frames]:
                _sync(device)
                start = time.perf_counter()
                ref = render_image(field, camera, c2w, render=render_cfg)
                _sync(device)
                ref_times.append(time.perf_counter() - start)
                out = renderer.render(camera, c2w)
                mse = float(((out["rgb"] - ref["rgb"]) ** 2).mean())
                psnrs.append(-10 * math.log10(max(mse, 1e-20)))
            ref_median = statistics.median(ref_times)
            entry["reference"] = {"frame_s_median": ref_median, "fps": 1.0 / ref_median, "speedup": 1.0,
                                  "frames": len(ref_times), "peak_gpu_bytes": _peak_memory(device)}
            entry["realtime"]["speedup_vs_reference"] = ref_median / entry["realtime"]["frame_s_median"]
            entry["realtime"]["psnr_vs_reference_db"] = min(psnrs)
        results.append(entry)
    return results


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(max(float(((a.float() - b.float()) ** 2).mean()), 1e-20))


def survey_views(survey_path: Path, downscale: int, max_views: int,
                 names: list[str] | None = None) -> list[tuple[str, Camera, np.ndarray, Path]]:
    """(name, camera, c2w, ground-truth image) of the survey's held-out views (``names``: only
    those, e.g. a tile block's), at the training downscale.

    A camera with lens distortion is replaced by its pinhole part: the native kernels model no
    distortion (the renderer would fall back to torch and count no samples), and all three renders
    of a view (reference, real-time, narrow band) use the same camera, so their differences and
    losses against the image stay comparable (caliterra's k1 = -0.0057: under a pixel at the
    corners of a 500 x 375 view)."""
    survey = load_survey(survey_path)
    views = [im for im in survey.test_images if names is None or im.name in names][:max_views]
    survey.check_image_files(views)
    out = []
    for im in views:
        cam = survey.camera_of(im)
        if cam.has_distortion:
            cam = replace(cam, k1=0.0, k2=0.0, k3=0.0, k4=0.0, p1=0.0, p2=0.0)
        if downscale > 1:
            cam = cam.scaled(1.0 / downscale)
        out.append((im.name, cam, np.asarray(im.c2w, dtype=np.float64), survey.image_path(im)))
    return out


def bench_narrow_band(field, render_cfg: RenderConfig, device: torch.device, resolution: tuple[int, int],
                      n_frames: int, altitude: float, sampling: RealtimeSampling, survey: Path | None = None,
                      downscale: int = 1, max_survey_views: int = 4, picture: Path | None = None,
                      view_names: list[str] | None = None, bake: bool = True,
                      strips: list | None = None) -> dict[str, Any]:
    """The baked envelope and narrow-band rendering (:mod:`citygen.render.envelope`) against the
    plain real-time path and the torch reference: on the fly path and, with ``survey``, on its
    held-out views (also against their ground-truth images): samples per pixel, PSNR, envelope
    bytes against the packed block's, bake and ray-cast seconds, and the H100 roofline ESTIMATE
    at 1920x1080 and 3840x2160 from the narrow band's samples per pixel; ``picture``: a PNG of the
    first view of each set, reference | narrow band | the band's samples per pixel (heat map).
    ``view_names``: only these held-out views; ``bake=False``: no envelope (the "narrow band"
    figures are then the plain real-time path's: the band costs minutes of bake per block on a CPU
    and saves nothing on sharpened fields, DESIGN.md "1.5 samples per pixel reached");
    ``strips``: a list that collects the picture's rows instead of (or as well as) ``picture``."""
    plain = RealtimeRenderer(field, render_cfg, device=device, sampling=sampling)
    if plain.backend != "native":
        return {"available": False, "reason": plain.fallback_reason}
    packed = plain.packed
    envelope = (bake_field_envelope(field, render_cfg.step_size, packed.nbytes,
                                    min_transmittance=sampling.min_transmittance or render_cfg.min_transmittance)
                if bake else None)
    banded = RealtimeRenderer(field, render_cfg, device=device, sampling=sampling, envelope=envelope) if bake else plain
    camera = pinhole(*resolution)
    sets: dict[str, list[tuple[str, Camera, np.ndarray, Path | None]]] = {
        "fly_path": [(f"fly_{i}", camera, c2w, None)
                     for i, c2w in enumerate(fly_path(field.aabb.detach().cpu().numpy(), n_frames, altitude))]}
    if survey is not None:
        sets["survey_views"] = survey_views(survey, downscale, max_survey_views, view_names)
    result: dict[str, Any] = {"available": True, "packed_bytes": packed.nbytes, "banded": bake, "view_sets": {}}
    if envelope is not None:
        result.update({"envelope_bytes": envelope.nbytes, "envelope_fraction": envelope.nbytes / packed.nbytes,
                       "bake_s": envelope.bake_seconds,
                       "triangles": {"outer": len(envelope.outer.triangles),
                                     "inner": len(envelope.inner.triangles)},
                       "sigma_outer": envelope.sigma_outer, "sigma_inner": envelope.sigma_inner,
                       "margin_m": envelope.margin})
    all_band, all_plain = [], []
    strips = strips if strips is not None else []
    for name, views in sets.items():
        rows = []
        for view, cam, c2w, gt_path in views:
            ref = render_image(field, cam, c2w, render=render_cfg)
            a = plain.render(cam, c2w)
            b = banded.render(cam, c2w) if bake else a
            if not rows:
                strips.append((view, ref["rgb"], b["rgb"], b["n_samples"]))
            band_s = banded.timings.get("band", 0.0)
            row = {"view": view, "resolution": f"{cam.width}x{cam.height}",
                   "samples_per_pixel": float(a["n_samples"].float().mean()),
                   "samples_per_pixel_narrow_band": float(b["n_samples"].float().mean()),
                   "psnr_vs_reference_db": _psnr(a["rgb"], ref["rgb"]),
                   "psnr_vs_reference_db_narrow_band": _psnr(b["rgb"], ref["rgb"]),
                   "band_raycast_s": band_s}
            if gt_path is not None:
                gt = torch.from_numpy(load_rgb(gt_path, (cam.width, cam.height))).float() / 255
                as8 = {k: torch.from_numpy(rgb_to_uint8(o["rgb"])).float() / 255 for k, o in
                       (("reference", ref), ("realtime", a), ("narrow_band", b))}
                row["psnr_vs_ground_truth_db"] = {k: _psnr(v, gt) for k, v in as8.items()}
                row["narrow_band_loss_vs_ground_truth_db"] = (row["psnr_vs_ground_truth_db"]["reference"]
                                                             - row["psnr_vs_ground_truth_db"]["narrow_band"])
            rows.append(row)
            all_band.append(row["samples_per_pixel_narrow_band"])
            all_plain.append(row["samples_per_pixel"])
        result["view_sets"][name] = {
            "views": rows,
            "samples_per_pixel_mean": statistics.mean(r["samples_per_pixel"] for r in rows),
            "samples_per_pixel_narrow_band_mean": statistics.mean(r["samples_per_pixel_narrow_band"] for r in rows),
            "psnr_vs_reference_db_worst": min(r["psnr_vs_reference_db"] for r in rows),
            "psnr_vs_reference_db_narrow_band_worst": min(r["psnr_vs_reference_db_narrow_band"] for r in rows)}
    spp_band, spp_plain = statistics.mean(all_band), statistics.mean(all_plain)
    cost = per_sample_cost(field)
    result["samples_per_pixel_mean"] = spp_plain
    result["samples_per_pixel_narrow_band_mean"] = spp_band
    result["roofline_h100"] = {f"{w}x{h}": {"narrow_band": estimate_4k(spp_band, cost, (w, h)),
                                            "without_band": estimate_4k(spp_plain, cost, (w, h))}
                               for w, h in ((1920, 1080), (3840, 2160))}
    if picture is not None:
        result["picture"] = str(draw_band_picture(Path(picture), strips, "narrow band" if bake else "real-time"))
    return result


def bench_tile_narrow_band(tile: Path, device: torch.device, resolution: tuple[int, int], n_frames: int,
                           sampling: RealtimeSampling, survey: Path | None = None, max_survey_views: int = 4,
                           picture: Path | None = None, bake: bool = True) -> dict[str, Any]:
    """:func:`bench_narrow_band` on every trained block of a tile: each block's fly path over its
    box and its own held-out views (the plan's ``test_images`` of the block, up to
    ``max_survey_views``); the tile's figures pool every block's views (each block has the same
    number, so the mean over views is the mean over blocks).  Blocks are measured one at a time
    as the streaming renderer draws them, each over its own box, so the margin cross-fade of the
    reference tile renderer is not part of any figure.  ``picture``: the first block's first fly
    frame, then each block's first held-out view (or fly frame without ``survey``)."""
    found = discover(tile)
    plan_blocks = {b.id: b for b in found.plan.blocks}
    blocks: dict[str, Any] = {}
    rows_by_set: dict[str, list[dict[str, Any]]] = {}
    picked = []
    cost = None
    for i, (block_id, run) in enumerate(found.trained.items()):
        sidecar = resolve_checkpoint(run)
        field, meta = load_field(sidecar, device)
        strips: list = []
        r = bench_narrow_band(field, meta["train_config"].render, device, resolution, n_frames,
                              0.5 * float((field.aabb[1] - field.aabb[0])[:2].max()), sampling, survey=survey,
                              downscale=int(meta["config"].get("downscale", 1)), max_survey_views=max_survey_views,
                              view_names=list(plan_blocks[block_id].test_images), bake=bake, strips=strips)
        if not r["available"]:
            return r
        blocks[block_id] = {"checkpoint": str(sidecar), **r}
        for name, vs in r["view_sets"].items():
            rows_by_set.setdefault(name, []).extend({"block": block_id, **row} for row in vs["views"])
        picked += strips[:1] if i == 0 and len(strips) > 1 else []
        picked += strips[-1:]
        cost = per_sample_cost(field)
        del field
    if not blocks:
        raise CitygenError(tile, "bench render: the tile has no trained block")
    rows = [row for rs in rows_by_set.values() for row in rs]
    spp = statistics.mean(r["samples_per_pixel"] for r in rows)
    spp_band = statistics.mean(r["samples_per_pixel_narrow_band"] for r in rows)
    result: dict[str, Any] = {
        "available": True, "tile": str(tile), "blocks_measured": list(blocks), "banded": bake,
        "view_sets": {name: {"views": len(rs),
                             "samples_per_pixel_mean": statistics.mean(r["samples_per_pixel"] for r in rs),
                             "psnr_vs_reference_db_worst": min(r["psnr_vs_reference_db"] for r in rs),
                             "psnr_vs_reference_db_mean": statistics.mean(r["psnr_vs_reference_db"] for r in rs)}
                      for name, rs in rows_by_set.items()},
        "samples_per_pixel_mean": spp, "samples_per_pixel_narrow_band_mean": spp_band,
        "psnr_vs_reference_db_worst": min(r["psnr_vs_reference_db"] for r in rows),
        "roofline_h100": {f"{w}x{h}": {"narrow_band": estimate_4k(spp_band, cost, (w, h)),
                                       "without_band": estimate_4k(spp, cost, (w, h))}
                          for w, h in ((1920, 1080), (3840, 2160))},
        "blocks": blocks}
    gt = [r["psnr_vs_ground_truth_db"] for r in rows if "psnr_vs_ground_truth_db" in r]
    if gt:
        result["psnr_vs_ground_truth_db_mean"] = {k: statistics.mean(g[k] for g in gt) for k in gt[0]}
    if picture is not None:
        result["picture"] = str(draw_band_picture(Path(picture), picked, "narrow band" if bake else "real-time"))
    return result


#: the heat map's top (samples per pixel): the colour saturates there
PICTURE_SPP_TOP = 8.0


def draw_band_picture(path: Path, strips: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
                      middle: str = "narrow band") -> Path:
    """One row per view: reference | narrow band | its field samples per pixel (viridis up to
    ``PICTURE_SPP_TOP``, black = none), labelled with the view and its mean samples per pixel."""
    label_h = 14
    rows = []
    for view, ref, band, n in strips:
        heat = colorize_heat(n.detach().cpu().numpy().astype(np.float64), PICTURE_SPP_TOP)
        row = np.concatenate([rgb_to_uint8(ref), rgb_to_uint8(band), heat], axis=1)
        img = Image.new("RGB", (row.shape[1], row.shape[0] + label_h), (255, 255, 255))
        img.paste(Image.fromarray(row), (0, label_h))
        w = row.shape[1] // 3
        d = ImageDraw.Draw(img)
        spp = float(n.float().mean())
        for i, text in enumerate(("reference", middle,
                                  f"samples/pixel {spp:.2f} (0..{PICTURE_SPP_TOP:g}) {view}")):
            d.text((i * w + 3, 1), text, fill=(0, 0, 0))
        rows.append(img)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    write_png(path, np.asarray(out))
    return path


def stream_field_config(gpu: bool) -> FieldConfig:
    """The streamed blocks' field: production-sized on a GPU, small enough for a CPU otherwise."""
    return FieldConfig() if gpu else FieldConfig(n_levels=8, log2_hashmap_size=13, hidden_dim=32,
                                                 semantic_hidden_dim=32, max_resolution=256)


def bench_streaming(device: torch.device, resolution: tuple[int, int], area_km2: float, block_size: float,
                    budget_bytes: int, n_frames: int, cfg: FieldConfig, altitude: float, n_files: int = 4,
                    grid_resolution: int = 64, seed: int = 0, speed_mps: float = 100.0) -> dict[str, Any]:
    """Fly through a synthetic tile of many random blocks under a memory budget, at ``speed_mps``
    metres per second paced at 30 frames per second (so the path is ``n_frames * speed / 30`` long)."""
    module = native_module(device)
    if module is None:
        return {"available": False, "reason": rt_ext.unavailable_reason()}
    side = math.sqrt(area_km2) * 1000.0
    n = max(1, round(side / block_size))
    height = 80.0
    render_cfg = RenderConfig(step_size=block_size / 256)
    with tempfile.TemporaryDirectory(prefix="citygen_stream_") as tmp:
        files = []
        local_box = np.array([[0.0, 0.0, -5.0], [block_size, block_size, height]])
        for k in range(n_files):
            packed = pack_field(synthetic_field(cfg, local_box, grid_resolution, seed + k), render_cfg,
                                sampling=RealtimeSampling(occupancy_factor=1))  # opaque cells: nothing to skip
            files.append(Path(tmp) / f"block_{k}.safetensors")
            save_packed(files[-1], packed)
        nbytes = packed.to(device).nbytes

        def loader(path: Path, offset: np.ndarray):
            def load():
                p = load_packed(path)
                geom = p.geom_f.clone()
                for start in (0, 3, 6, 9, 12, 15):
                    geom[start:start + 3] += torch.as_tensor(offset, dtype=torch.float32)
                return replace(p, geom_f=geom)
            return load

        blocks = []
        for r in range(n):
            for c in range(n):
                offset = np.array([c * block_size, r * block_size, 0.0])
                box = local_box + offset
                blocks.append(BlockInfo(f"r{r}_c{c}", None, box, box, nbytes,
                                        load=loader(files[(r * n + c) % n_files], offset)))
        cache = BlockCache(blocks, budget_bytes, device)
        try:
            streamer = StreamingRenderer(cache, module, far=6 * block_size)
            camera = pinhole(*resolution)
            tile_box = np.array([[0.0, 0.0, -5.0], [side, side, height]])
            times, resident, loading, peak_bytes, levels, evictions = [], [], [], 0, [], 0
            for c2w in fly_path(tile_box, n_frames, altitude, length=n_frames * speed_mps / 30.0):
                start = time.perf_counter()
                out = streamer.render(camera, c2w)
                _sync(device)
                times.append(time.perf_counter() - start)
                resident.append(len(out["blocks"].resident))
                loading.append(len(out["blocks"].loading))
                evictions += len(out["blocks"].evicted)
                levels += list(out["levels"].values())
                peak_bytes = max(peak_bytes, cache.resident_bytes + cache.inflight_bytes)
            loads = list(cache.load_seconds)
        finally:
            cache.close()
    return {
        "available": True, "area_km2": area_km2, "blocks": n * n, "block_size_m": block_size,
        "block_bytes": nbytes, "budget_bytes": budget_bytes, "peak_resident_bytes": peak_bytes,
        "resolution": f"{resolution[0]}x{resolution[1]}", "frames": len(times),
        "fps_mean": len(times) / sum(times), "frame_s_median": statistics.median(times),
        "frame_s_worst": max(times), "resident_blocks_mean": statistics.mean(resident),
        "loading_blocks_mean": statistics.mean(loading), "loads_completed": len(loads), "evictions": evictions,
        # frames drawn while a block they could see was still loading (drawn without it: the
        # loader never blocks a frame), and frames over twice the median time (hitches)
        "frames_with_blocks_loading": sum(1 for k in loading if k > 0),
        "slow_frames": sum(1 for t in times if t > 2 * statistics.median(times)),
        "speed_mps": speed_mps, "path_m": n_frames * speed_mps / 30.0,
        "load_s_median": statistics.median(loads) if loads else None,
        "lod_levels_mean": statistics.mean(levels) if levels else None,
        "field": asdict(cfg),
    }


def bench_render(tile: Path | None = None, resolutions: list[tuple[int, int]] | None = None, n_frames: int = 5,
                 reference_frames: int = 1, device: str = "auto", stream: bool = True,
                 stream_area_km2: float = 100.0, stream_block_size: float = 500.0,
                 stream_budget_gb: float | None = None, stream_frames: int | None = None,
                 narrow_band: bool = False, survey: Path | None = None,
                 picture: Path | None = None, bake: bool = True, survey_views: int = 4) -> dict[str, Any]:
    """Run the render benchmark (module docstring) and return the JSON-ready result; with
    ``narrow_band`` also :func:`bench_narrow_band` (``survey``: its held-out views too;
    ``picture``: its PNG; on a tile folder of several trained blocks, :func:`bench_tile_narrow_band`
    over all of them; ``bake=False``: without the envelope; ``survey_views``: held-out views per block)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise CitygenError(None, "bench: --device cuda, but torch sees no CUDA device here")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    gpu = dev.type == "cuda"
    resolutions = resolutions or ([(1920, 1080), (3840, 2160)] if gpu else [(160, 90)])
    if tile is not None:
        field, render_cfg, label = load_bench_field(tile, dev)
        # the held-out views are scored at the size the block trained on
        meta_downscale = int(read_sidecar(Path(label))["config"].get("downscale", 1))
        altitude = 0.5 * float((field.aabb[1] - field.aabb[0])[:2].max())
        sampling = RealtimeSampling()
    else:
        cfg = FieldConfig() if gpu else FieldConfig(log2_hashmap_size=17, hidden_dim=64)
        aabb = np.array([[0.0, 0.0, -5.0], [500.0, 500.0, 80.0]])
        field = synthetic_field(cfg, aabb, 128, device=dev)
        render_cfg, label = RenderConfig(step_size=500.0 / 512), "synthetic (random weights, box-city occupancy)"
        altitude = 150.0
        # The synthetic density is opaque throughout every occupied cell: a fine occupancy level
        # could skip nothing there, and baking it would only cost time; the termination
        # threshold of the reduced sampling still applies.
        sampling = RealtimeSampling(occupancy_factor=1)
    result: dict[str, Any] = {
        "benchmark": "render", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if gpu else _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "gpu_figures": "measured" if gpu else "pending", "field_source": label,
        "field": asdict(field.cfg), "render": asdict(render_cfg), "sampling": asdict(sampling),
    }
    if not gpu:
        result["note"] = GPU_PENDING
    result["views"] = bench_views(field, render_cfg, dev, resolutions, n_frames, reference_frames, altitude, sampling)
    spr = [v["realtime"]["samples_per_ray"] for v in result["views"] if v["realtime"]["samples_per_ray"]]
    if spr:
        cost = per_sample_cost(field)
        result["per_sample_cost"] = cost
        result["estimate_4k_h100"] = estimate_4k(statistics.mean(spr), cost)
    if narrow_band and tile is not None and (Path(tile) / PLAN_FILE).is_file() and len(discover(tile).trained) > 1:
        del field  # one block's field at a time: a tile's blocks need not fit together
        result["narrow_band"] = bench_tile_narrow_band(Path(tile), dev, resolutions[0], n_frames, sampling, survey=survey,
                                                       max_survey_views=survey_views, picture=picture, bake=bake)
    elif narrow_band:
        downscale = meta_downscale if tile is not None else 1
        result["narrow_band"] = bench_narrow_band(field, render_cfg, dev, resolutions[0], n_frames, altitude, sampling,
                                                  survey=survey, downscale=downscale, picture=picture, bake=bake,
                                                  max_survey_views=survey_views)
    if stream:
        budget = int((stream_budget_gb if stream_budget_gb is not None else (12.0 if gpu else 0.005)) * 1e9)
        result["streaming"] = bench_streaming(dev, resolutions[0], stream_area_km2, stream_block_size, budget,
                                              stream_frames or (300 if gpu else 8), stream_field_config(gpu),
                                              altitude=250.0)
    return result


__all__ = ["bench_render", "bench_streaming", "bench_tile_narrow_band", "estimate_4k", "fly_path", "parse_resolution", "per_sample_cost",
           "stream_field_config", "synthetic_field"]
