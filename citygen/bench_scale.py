"""``citygen bench scale``: the whole chain on synthetic surveys of growing area, stage by stage.

For each area (default 0.1, 0.25, 1 and 4 km²) a synthetic survey is made (the tiny city's flight
and camera, so the image count grows with the area, at a reduced image resolution) and run
through the chain, each stage in its own process so that its peak resident memory is its own:

* ``synth``   -- the synthetic renderer (ray-cast ground truth): input, reported apart;
* ``ingest``  -- pose priors from the JPEGs' EXIF GPS and DJI gimbal XMP (``read_drone_folder``;
  no SfM, which is a different experiment);
* ``plan``    -- the partition into blocks of ``block_size`` metres (``run_plan``);
* ``train``   -- every block trained by the local executor (``tiny`` preset, ``steps`` per block,
  fixed, no time cap): short on purpose, so the run fits the machine; it measures the chain's
  cost, not the quality;
* ``render``  -- held-out views composited from all blocks and scored (half resolution): an
  evenly spaced subset, :data:`VIEWS_PER_BLOCK` per block (the survey holds out ~1 image in 8);
* ``export``  -- orthophoto, DSM and LAS of the surveyed square at :data:`EXPORT_GSD_M` (2 m);
* ``pack``    -- every block packed for the real-time renderer (fine occupancy baked) and saved.

The native kernels are built (or loaded from the JIT cache) once before the first stage, timed
apart (``native_build_s``), so that no stage carries the compiler.

Per stage: wall time of the stage's work (``seconds``; the process's start-up and imports
apart, ``startup_s``, and both together, ``process_s``),
peak resident set size (the process's own, or its largest waited-for child's -- the training
workers), and, over the areas run, the growth exponent ``k`` of ``seconds ~ area^k`` (and of
``seconds ~ images^k``) fitted by least squares on log-log.  With two areas the fit is exact and
says little; with four it has two degrees of freedom.  ``estimate`` gives the areas not run:
each stage's time grows with what drives its work (:data:`DRIVERS`: images, blocks, views
rendered or export cells), as a fixed cost plus a cost per unit (:func:`fit_affine` over the
areas run; a power law through two small areas bends below that line), and those sizes come
from :func:`predicted_sizes` (the synthetic flight and the planner, nothing rendered: at 500 m
blocks 69/152/510/1824 images and 4/6/12/30 blocks for 0.1/0.25/1/4 km²).  The area exponent
alone would mislead at small areas: a tile is whole blocks, so the block count moves in steps.

No stage's work grows faster than its driver (checked in the code): ``plan`` pairs an image
only with the blocks its footprint's bounding box meets (``candidate_pairs``), not every
(image, block) pair; ``train`` loads each block's own images; ``export`` renders one ray per
cell, each through the blocks whose boxes it meets (at most four at a corner), window by window
in strips over the blocks' columns, so a chunk of rays spans at most two block columns and each
block's field is loaded about once per window (``export.json`` ``field_cache.loads``; before,
row bands spanned the whole window, reloading fields from an 8-field cache and paying every
spanned block's occupancy and blend per sample); ``render`` and ``pack`` are per view and per
block.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from survey_io import read_drone_folder, read_transforms
from survey_io.atomic import atomic_path, atomic_write_json
from survey_io.synthetic import PRESETS, make_survey, plan_flight

from .errors import CitygenError
from .export.run import ExportOptions, export_tile
from .partition import PartitionConfig
from .partition.planner import plan_tile
from .partition.run import PlanRequest, run_plan
from .render.realtime import pack_field
from .render.streaming import save_packed
from .render.tile_views import render_tile_views
from .store.checkpoint import resolve_checkpoint
from .store.field import load_field
from .store.layout import discover, read_plan, read_tile_config
from .tile import open_tile, train_tile
from .train.data import load_survey

AREAS_KM2 = (0.1, 0.25, 1.0, 4.0)
STAGES = ("synth", "ingest", "plan", "train", "render", "export", "pack")
CHAIN = STAGES[1:]            # the synthetic renderer is the input, reported apart
BLOCK_SIZE_M = 500.0
STEPS = 60
IMAGE_SIZE = (160, 120)
#: the export's cell: 2 m, a quarter of the cells of 1 m (the export's work is one ray per cell,
#: and its time follows the cell count: 0.18 ms a cell on the shared 2-core box)
EXPORT_GSD_M = 2.0
#: held-out views rendered: an evenly spaced subset, this many per block (the survey holds out
#: about one image in eight, which at 4 km2 is 228 views: minutes of rendering that measure the
#: same per-view cost 228 times), at half the survey's resolution
VIEWS_PER_BLOCK = 2
RENDER_DOWNSCALE = 2
#: the settings only one stage reads: they go into that stage's arguments alone, so that changing
#: one reruns that stage and reuses the others
STAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "render": {"views_per_block": VIEWS_PER_BLOCK, "downscale": RENDER_DOWNSCALE},
    "export": {"export_gsd_m": EXPORT_GSD_M}}
#: what each stage's work grows with: the estimate for an area not run scales each stage's time
#: by its driver (:func:`fit_affine` over the areas run), the driver predicted by `predicted_sizes`
DRIVERS = {"synth": "images", "ingest": "images", "plan": "images", "train": "blocks", "render": "views",
           "export": "cells", "pack": "blocks"}


def fit_exponent(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> dict[str, float] | None:
    """Least squares on log-log: ``y = c * x**k``; returns k, c and the residual RMS in log10
    (None with fewer than two distinct x or a non-positive value)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(set(x.tolist())) < 2 or np.any(x <= 0) or np.any(y <= 0):
        return None
    lx, ly = np.log10(x), np.log10(y)
    k, b = np.polyfit(lx, ly, 1)
    rms = float(np.sqrt(np.mean((ly - (k * lx + b)) ** 2)))
    return {"k": float(k), "c": float(10 ** b), "rms_log10": rms, "points": int(len(x))}


def fit_affine(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> dict[str, float] | None:
    """Least squares ``y = a + b * x`` with ``a, b >= 0`` (a fixed cost plus a cost per unit of
    the driver); with one distinct x, ``a = 0`` and ``b`` the mean of ``y / x`` (proportional:
    the larger of the two readings when extrapolating upwards).  None without a positive x.

    This, not the power law of :func:`fit_exponent`, extrapolates a stage's time: a stage with a
    fixed cost fits a power law with ``k < 1`` through two small areas, and that curve bends
    below the line its per-unit cost draws (the first 0.1/0.25 km2 figures: training's k = 0.47 on
    blocks put 30 blocks at ~370 s, the affine fit at ~540 s)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) == 0 or np.any(x <= 0) or not np.all(np.isfinite(y)):
        return None
    if len(set(x.tolist())) < 2:
        return {"a": 0.0, "b": float(np.mean(y / x)), "points": int(len(x))}
    b, a = np.polyfit(x, y, 1)
    if a < 0:      # through the origin
        a, b = 0.0, float(np.dot(x, y) / np.dot(x, x))
    if b < 0:      # no growth measured: the mean
        a, b = float(np.mean(y)), 0.0
    return {"a": float(a), "b": float(max(b, 0.0)), "points": int(len(x))}


def views_to_render(test_names: list[str], blocks: int, per_block: int = VIEWS_PER_BLOCK) -> list[str]:
    """An evenly spaced subset of the held-out views (in the survey's order): ``per_block`` per
    block, all of them when there are no more."""
    n = min(len(test_names), per_block * blocks)
    if n >= len(test_names):
        return list(test_names)
    return [test_names[i] for i in np.linspace(0, len(test_names) - 1, n).round().astype(int)]


def export_cells(area_km2: float, gsd: float = EXPORT_GSD_M) -> int:
    """Cells of the export of the surveyed square (the export stage's driver; whole cells, as
    the export's grid covers the square)."""
    return math.ceil(round(math.sqrt(area_km2) * 1000.0 / gsd, 6)) ** 2


# -- the stages (each runs in its own process: python -m citygen.bench_scale STAGE ARGS OUT) --------
def _survey_config(area_km2: float):
    w, h = IMAGE_SIZE
    return replace(PRESETS["tiny"], area_m=math.sqrt(area_km2) * 1000.0, width=w, height=h, antialias=False)


def predicted_sizes(area_km2: float, block_size: float = BLOCK_SIZE_M) -> dict[str, float]:
    """What the chain will see at ``area_km2``, without rendering anything: the synthetic flight's
    images and held-out views (``plan_flight``), the plan's blocks and training (image, block)
    pairs (the planner on that flight, the ground at the take-off height, as the survey's DSM has
    it), the views the render stage draws and the export's cells."""
    cfg = _survey_config(area_km2)
    survey = plan_flight(cfg)
    survey = replace(survey, images=[replace(im, depth=None) for im in survey.images])  # no files to read
    plan = plan_tile(survey, PartitionConfig(block_size_m=block_size, flight_height_m=cfg.altitude_m))
    held_out = set(survey.test_names)
    return {"area_km2": area_km2, "images": len(survey.images), "test_images": len(survey.test_names),
            "blocks": len(plan.blocks), "pairs": sum(1 for b in plan.blocks for n in b.images if n not in held_out),
            "views": len(views_to_render(survey.test_names, len(plan.blocks))), "cells": export_cells(area_km2)}


def _stage(name: str, a: dict[str, Any]) -> dict[str, Any]:
    root = Path(a["root"])
    data = root / "survey" / "transforms.json"
    tile = root / "tile"
    if name == "synth":
        make_survey(root / "survey", _survey_config(a["area_km2"]), seed=a["seed"])
        s = read_transforms(data)
        return {"images": len(s.images), "test_images": len(s.test_names)}
    if name == "ingest":
        truth = read_transforms(data)
        priors = read_drone_folder(data.parent / "images", georef=truth.georef)
        exact = {Path(im.name).name: im.c2w for im in truth.images}
        err = [float(np.linalg.norm(im.c2w[:3, 3] - exact[Path(im.name).name][:3, 3])) for im in priors.images]
        return {"images": len(priors.images), "position_error_m_max": max(err)}
    if name == "plan":
        report = run_plan(PlanRequest(data=data, out=tile, partition=PartitionConfig(block_size_m=a["block_size"]),
                                      train_preset="tiny"))
        return {"blocks": report["summary"]["blocks"]}
    if name == "train":
        result = train_tile(tile, data, "tiny", executor="local",
                            overrides={"steps": a["steps"], "max_seconds": 0, "seed": a["seed"],
                                       "checkpoint_every": a["steps"], "log_every": max(1, a["steps"] // 4)})
        result.raise_for_failures()
        return {"blocks": len(result.blocks), "per_block": _block_walls(tile)}
    if name == "render":
        renderer, survey = open_tile(tile), load_survey(data)
        names = views_to_render(survey.test_names, len(renderer.plan.blocks), a["views_per_block"])
        report = render_tile_views(renderer, survey, names, root / "renders", downscale=a["downscale"])
        atomic_write_json(root / "renders" / "metrics.json", report)
        return {"views": len(report["views"]), "test_images": len(survey.test_names),
                "psnr_mean": report["mean"].get("psnr")}
    if name == "export":
        # the surveyed square, not the tile's bounds: the tile is whole blocks, so its area
        # moves in steps of a block while the survey's grows smoothly
        half, gsd = math.sqrt(a["area_km2"]) * 1000.0 / 2, a["export_gsd_m"]
        # export_tile takes its extent from --bounds (CRS), not from options.rect (it exports
        # the blocks' cores without one: 1 km2 of cores for the 0.1 km2 survey)
        e0, n0 = (float(v) for v in read_plan(tile).georef.origin[:2])
        manifest = export_tile(tile, root / "export", ExportOptions(what=("ortho", "dsm", "las"), gsd=gsd,
                                                                     survey=data, progress=False),
                               bounds_crs=f"{e0 - half!r},{n0 - half!r},{e0 + half!r},{n0 + half!r}")
        return {"files": len(manifest["files"]), "gsd_m": gsd, "cells": manifest["counts"]["raster_cells"],
                "timings_s": manifest["timings_s"]}
    if name == "pack":
        total, n = 0, 0
        for block, run in sorted(discover(tile).trained.items()):
            field, meta = load_field(resolve_checkpoint(run), "cpu")
            out = root / "packed" / f"{block}.safetensors"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_packed(out, pack_field(field, meta["train_config"].render))
            total += out.stat().st_size
            n += 1
        return {"blocks": n, "bytes": total}
    raise CitygenError(None, f"bench scale: unknown stage {name!r}")


def _block_walls(tile: Path) -> list[dict[str, Any]]:
    """Per trained block: its training images and the wall time of its worker (``state.json``:
    started to the last update, the one that marked it done)."""
    out = []
    for block_id, rec in sorted((read_tile_config(tile) or {}).get("blocks", {}).items()):
        state = json.loads((tile / rec["dir"] / "state.json").read_text())
        wall = datetime.fromisoformat(state["updated"]) - datetime.fromisoformat(state["started"])
        out.append({"id": block_id, "images": int(rec["n_images"]), "seconds": wall.total_seconds()})
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stage_main(argv: list[str]) -> int:
    name, args, out = argv[0], json.loads(argv[1]), Path(argv[2])
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    figures = _stage(name, args)
    seconds = time.perf_counter() - started
    # ru_maxrss is KiB on Linux: this process, and the largest child it waited for (training workers)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    # CPU seconds of the work (this process and its waited-for children): what the wall time
    # would be on an idle core, as the stages run one thread each; on a shared box the wall
    # time is this stretched by the other jobs
    atomic_write_json(out, {"stage": name, "seconds": seconds, "cpu_s": _cpu_seconds() - cpu_started,
                            "peak_rss_bytes": max(own, kids),
                            "peak_rss_self_bytes": own, "peak_rss_children_bytes": kids, **figures})
    return 0


def run_stage(name: str, args: dict[str, Any], out: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one stage in a fresh process; its figures plus ``process_s`` (wall time with start-up)."""
    out = Path(out)
    if out.is_file():      # a finished stage of the same run (same arguments) is not run again
        try:
            done = json.loads(out.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("args") == args and "process_s" in done:
            return {**done, "reused": True}
    start = time.perf_counter()
    env = dict(os.environ)
    # one thread per stage (and per training worker) unless told otherwise: the measurement
    # does not then depend on OpenMP's behaviour on a busy box, and ``cpu_s`` is the idle wall time
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-m", "citygen.bench_scale", name, json.dumps(args), str(out)],
                          capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CitygenError(out.parent, f"bench scale: stage {name} failed (exit {proc.returncode}): {tail[0]}")
    result = json.loads(out.read_text())
    result.update(args=args, process_s=wall, startup_s=max(wall - result["seconds"], 0.0))
    atomic_write_json(out, result)
    return result


def fit_and_estimate(runs: list[dict[str, Any]], all_areas: tuple[float, ...] = AREAS_KM2,
                     block_size: float = BLOCK_SIZE_M) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per stage, the growth exponents and the driver fit over ``runs`` (each with ``area_km2``,
    ``images``, ``sizes`` and per-stage ``seconds``, ``startup_s``, ``process_s``,
    ``peak_rss_bytes``); and per area of ``all_areas``, each stage's time: measured where run,
    else :func:`fit_affine` at :func:`predicted_sizes`' driver plus the median start-up."""
    fits = {}
    for name in STAGES:
        # fitted on the stage's own work: process start-up (imports, ~5-40 s on a shared 2-core
        # box) does not grow with the survey and is added back as its median
        t = [r["stages"][name]["seconds"] for r in runs]
        driver = DRIVERS[name]
        fits[name] = {"vs_area": fit_exponent([r["area_km2"] for r in runs], t),
                      "vs_images": fit_exponent([r["images"] for r in runs], t),
                      "driver": driver, "vs_driver": fit_exponent([r["sizes"][driver] for r in runs], t),
                      "affine_vs_driver": fit_affine([r["sizes"][driver] for r in runs], t),
                      "peak_rss_vs_area": fit_exponent([r["area_km2"] for r in runs],
                                                       [r["stages"][name]["peak_rss_bytes"] for r in runs])}
    # training, block by block: a block's worker costs a fixed part (process, data, checkpoint)
    # plus a part per training image (decoding, per-image state): fitted over every block of
    # every run, so that a tile of more images per block (interior blocks: up to ~260 at 4 km2
    # against 10-126 at 0.1/0.25 km2) is not priced at the small tiles' mean block
    blocks = [b for r in runs for b in r["stages"]["train"].get("per_block", [])]
    per_block = fit_affine([b["images"] for b in blocks], [b["seconds"] for b in blocks]) if blocks else None
    if per_block is not None:
        per_block["outside_blocks_s"] = float(np.median(
            [r["stages"]["train"]["seconds"] - sum(b["seconds"] for b in r["stages"]["train"]["per_block"])
             for r in runs if r["stages"]["train"].get("per_block")]))
    fits["train"]["per_block"] = per_block
    for name in STAGES:
        cpu = [r["stages"][name].get("cpu_s") for r in runs]
        wall = sum(r["stages"][name]["seconds"] for r in runs)
        fits[name]["cpu_share"] = min(1.0, sum(cpu) / wall) if None not in cpu and wall > 0 else 1.0
    estimate = {}
    for area in all_areas:
        done = next((r for r in runs if r["area_km2"] == area), None)
        sizes = predicted_sizes(area, block_size)
        per = {}
        for name in STAGES:
            f = fits[name]["affine_vs_driver"]
            startup = float(np.median([r["stages"][name]["startup_s"] for r in runs]))
            if done:
                per[name] = done["stages"][name]["process_s"]
            elif name == "train" and per_block is not None:
                per[name] = (per_block["outside_blocks_s"] + per_block["a"] * sizes["blocks"]
                             + per_block["b"] * sizes["pairs"] + startup)
            else:
                per[name] = f["a"] + f["b"] * sizes[DRIVERS[name]] + startup if f else None
        # the same on an idle box: each stage's wall time scaled by its measured share of CPU
        # (CPU seconds / wall seconds of its work over the runs; 1 where not recorded)
        idle = {n: None if v is None else v * fits[n]["cpu_share"] for n, v in per.items()}
        estimate[f"{area:g}"] = {"measured": done is not None, "predicted_sizes": sizes, "stages_s": per,
                                 "chain_s": sum(per[n] for n in CHAIN if per[n] is not None),
                                 "total_s": sum(v for v in per.values() if v is not None),
                                 "idle_stages_s": idle, "idle_total_s": sum(v for v in idle.values() if v is not None)}
    return fits, estimate


def bench_scale(out_dir: Path, areas: tuple[float, ...] = AREAS_KM2[:2], block_size: float = BLOCK_SIZE_M,
                steps: int = STEPS, seed: int = 0, picture: Path | None = None,
                all_areas: tuple[float, ...] = AREAS_KM2) -> dict[str, Any]:
    """Run the chain at each area into ``out_dir/area_<A>km2`` (module docstring); returns the
    JSON-ready result with per-stage fits and the estimated time of ``all_areas``."""
    out_dir = Path(out_dir)
    # the native kernels are compiled once (JIT, about a minute on 2 cores, minutes on a busy
    # box) by the first process that needs them: built here, before any stage, so that no
    # stage's time carries the compiler (timed apart; on a warm cache it only loads them)
    started = time.perf_counter()
    built = subprocess.run([sys.executable, "-m", "cuda_ext.build"], capture_output=True, text=True, check=False)
    native_build_s = time.perf_counter() - started
    runs = []
    for area in areas:
        root = out_dir / f"area_{area:g}km2"
        root.mkdir(parents=True, exist_ok=True)
        args = {"root": str(root), "area_km2": area, "seed": seed, "block_size": block_size, "steps": steps}
        stages = {}
        for name in STAGES:
            stages[name] = run_stage(name, {**args, **STAGE_SETTINGS.get(name, {})}, root / f"stage_{name}.json")
        # a train stage reused from an earlier version lacks the per-block walls: the tile's
        # block states hold them
        stages["train"].setdefault("per_block", _block_walls(root / "tile"))
        sizes = {"area_km2": area, "images": stages["synth"]["images"], "test_images": stages["synth"]["test_images"],
                 "blocks": stages["plan"]["blocks"], "views": stages["render"]["views"],
                 "cells": stages["export"]["cells"]}
        runs.append({**sizes, "sizes": sizes, "predicted_sizes": predicted_sizes(area, block_size), "stages": stages,
                     "chain_s": sum(stages[s]["process_s"] for s in CHAIN)})
    fits, estimate = fit_and_estimate(runs, all_areas, block_size)
    largest = max(runs, key=lambda r: r["area_km2"])
    result = {"benchmark": "scale", "areas_run_km2": list(areas), "block_size_m": block_size, "steps_per_block": steps,
              "image_size": list(IMAGE_SIZE), "export_gsd_m": EXPORT_GSD_M, "train_preset": "tiny",
              "views_per_block": VIEWS_PER_BLOCK, "render_downscale": RENDER_DOWNSCALE,
              "cpu_count": os.cpu_count(), "native_build_s": native_build_s,
              "native_build_ok": built.returncode == 0, "runs": runs, "fits": fits, "estimate": estimate,
              "estimated_total_s_all_areas": sum(e["total_s"] for e in estimate.values()),
              "estimated_idle_total_s_all_areas": sum(e["idle_total_s"] for e in estimate.values()),
              "load_average_1min": os.getloadavg()[0],
              "largest_run": {"area_km2": largest["area_km2"],
                              "peak_rss_bytes": max(st["peak_rss_bytes"] for st in largest["stages"].values()),
                              "peak_rss_stage": max(largest["stages"], key=lambda n: largest["stages"][n]["peak_rss_bytes"])},
              "note": "times are process wall times (start-up and imports included; `startup_s` apart); "
                      "synth is the synthetic renderer, reported apart from the chain; idle_*: the same "
                      "scaled by each stage's CPU seconds per wall second (cpu_s / seconds), the wall time "
                      "of a box where each stage has a core to itself"}
    if picture is not None:
        result["picture"] = str(draw_scale(Path(picture), result))
    return result


def draw_scale(path: Path, result: dict[str, Any], size: tuple[int, int] = (900, 560)) -> Path:
    """Log-log plot of each stage's time against area (measured points, fitted lines extended to
    the areas not run, dashed)."""
    colors = {"synth": (150, 150, 150), "ingest": (31, 119, 180), "plan": (255, 127, 14), "train": (44, 160, 44),
              "render": (214, 39, 40), "export": (148, 103, 189), "pack": (140, 86, 75)}
    W, H = size
    x0, x1, y0, y1 = 80, W - 170, 30, H - 60
    areas = [float(a) for a in result["estimate"]]
    vals = [v for e in result["estimate"].values() for v in e["stages_s"].values() if v]
    lo_a, hi_a = math.log10(min(areas) / 1.5), math.log10(max(areas) * 1.5)
    lo_t, hi_t = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)

    def pt(a, t):
        return (x0 + (x1 - x0) * (math.log10(a) - lo_a) / (hi_a - lo_a),
                y1 - (y1 - y0) * (math.log10(t) - lo_t) / max(hi_t - lo_t, 1e-9))

    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for e in range(lo_t, hi_t + 1):
        _, v = pt(areas[0], 10.0 ** e)
        d.line([x0, v, x1, v], fill=(225, 225, 225))
        d.text((x0 - 50, v - 6), f"{10.0 ** e:g} s", fill=(0, 0, 0))
    for a in areas:
        u, _ = pt(a, 10.0 ** lo_t)
        d.line([u, y0, u, y1], fill=(225, 225, 225))
        d.text((u - 14, y1 + 6), f"{a:g} km2", fill=(0, 0, 0))
    for k, name in enumerate(STAGES):
        fit = result["fits"][name]["vs_area"]
        points = [(float(a), e["stages_s"][name], e["measured"]) for a, e in result["estimate"].items()
                  if e["stages_s"][name]]
        line = [pt(a, t) for a, t, _ in points]
        for i in range(len(line) - 1):
            d.line([line[i], line[i + 1]], fill=colors[name], width=2 if points[i + 1][2] else 1)
        for (u, v), (_, _, measured) in zip(line, points):
            d.ellipse([u - 4, v - 4, u + 4, v + 4], fill=colors[name] if measured else (255, 255, 255),
                      outline=colors[name], width=2)
        label = f"{name}" + (f"  k={fit['k']:.2f}" if fit else "")
        d.text((x1 + 12, y0 + 18 * k), label, fill=colors[name])
    d.text((x0, 8), "citygen bench scale: wall time per stage (process) against area; filled: measured, "
                    "hollow: estimated from each stage's driver", fill=(0, 0, 0))
    d.text((x1 + 12, y0 + 18 * len(STAGES) + 6), "k: exponent of the\nstage's work vs area", fill=(0, 0, 0))
    idle = result.get("estimated_idle_total_s_all_areas")
    d.text((x0, H - 30), f"estimated total for {', '.join(f'{a:g}' for a in areas)} km2: "
                         f"{result['estimated_total_s_all_areas'] / 60:.0f} min as measured"
                         + (f", {idle / 60:.0f} min on an idle box (CPU time)" if idle else ""), fill=(0, 0, 0))
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path


if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))


__all__ = ["AREAS_KM2", "STAGES", "bench_scale", "draw_scale", "export_cells", "fit_affine", "fit_and_estimate",
           "fit_exponent", "predicted_sizes", "run_stage", "views_to_render"]
