"""The ``citygen plan`` workflow: read (or lay out) a survey, plan, draw, size, report."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from survey_io import read_transforms
from survey_io.atomic import atomic_write_json

from ..checks import format_bytes, largest_fitting, memory_budget, nice_down, nice_up
from ..config import TrainConfig, load_config
from ..errors import CitygenError
from .config import PartitionConfig
from .draw import draw_plan
from .estimate import SizingConfig, sizing_report
from .ground import SPARSE_MODEL, GroundModel, estimate_ground, load_sparse_points
from .layout import FlightLayout, synthetic_survey, synthetic_survey_size
from .plan import PLAN_FILE
from .planner import candidate_counts, make_grid, plan_tile
from .visibility import compute_footprints

#: ground GeoTIFFs looked for beside transforms.json in ``--ground-height auto`` (surface first:
#: the cameras see roofs, and the synthetic city writes both as ground truth).
GROUND_TIF_NAMES = ("dsm.tif", "dtm.tif")
#: the COLMAP model ``citygen ingest`` writes beside transforms.json (local frame).

#: The most blocks one plan may have.  Planning time and plan.json grow with the blocks (the
#: per-block coverage rasters and records): 10,000 blocks (100 m blocks over 1 km²) took 53 s
#: and 0.95 GB on the 2-core reference machine; 100 km² in the usual 1 km blocks is 100.
MAX_BLOCKS = 10_000
#: Planning memory, measured on the 2-core reference machine (peak RSS above the ~250 MB of
#: the interpreter and libraries): ~10 kB per image (100 km² dry run: 36,090 images, 0.62 GB),
#: ~70 kB per block (1 km² in 10,000 blocks of 10 m: 0.95 GB) and 64 bytes per candidate
#: (image, block) pair (index, score and mask arrays, with copies while sorting).
PLAN_BYTES_PER_IMAGE = 10e3
PLAN_BYTES_PER_BLOCK = 70e3
PLAN_BYTES_PER_PAIR = 64.0


@dataclass
class PlanRequest:
    """Everything ``citygen plan`` was asked (see :func:`citygen.cli.plan` for the meaning)."""

    data: Path | None = None
    out: Path | None = None
    partition: PartitionConfig | None = None
    ground_height: str = "auto"
    ground_tif: Path | None = None
    ortho: Path | None = None
    dry_run: bool = False
    layout: FlightLayout | None = None
    train_preset: str = "city-100km2"
    downscale: int | None = None
    sizing: SizingConfig | None = None
    seed: int = 0
    #: bytes the plan may use (None: :func:`citygen.checks.memory_budget`'s default).
    memory_budget_bytes: float | None = None
    #: where that budget came from, for messages.
    memory_budget_source: str = ""
    #: run before the ground is taken (the coarse pass, see :func:`citygen.cli.plan`): only after
    #: the request's size checks passed with a first ground, so bad options stay a one-line error.
    before_ground: Callable[[], object] | None = None


def plan_bytes(n_images: int, n_blocks: int, n_pairs: int = 0) -> float:
    """Estimated planning memory (see the constants above)."""
    return PLAN_BYTES_PER_IMAGE * n_images + PLAN_BYTES_PER_BLOCK * n_blocks + PLAN_BYTES_PER_PAIR * n_pairs


def parse_blocks(text: str | None) -> tuple[int, int] | None:
    """``"2x3"`` -> (2 rows, 3 cols)."""
    if text is None:
        return None
    try:
        rows, cols = (int(v) for v in text.lower().strip().split("x"))
    except ValueError:
        raise CitygenError(None, f"--blocks wants ROWSxCOLS such as 2x2, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise CitygenError(None, f"--blocks needs at least 1x1, got {text!r}")
    return rows, cols


def run_plan(req: PlanRequest) -> dict[str, Any]:
    """Plan a tile; write plan.json, plan.png and plan_report.json under ``req.out`` (when given).

    Returns the report (sizing summary, assumptions, per-block estimates, where things went).
    """
    config = req.partition or PartitionConfig()
    layout = req.layout or FlightLayout()
    if req.memory_budget_bytes is None:
        default = memory_budget(None)
        req = dataclasses.replace(req, memory_budget_bytes=default.bytes, memory_budget_source=default.source)
    if req.dry_run:
        _check_flight_size(layout, config, req)      # before making a single pose
        survey, generator = synthetic_survey(layout, seed=req.seed)
        ground = GroundModel.plane(0.0, source="dry run: flat ground at z = 0") if req.ground_height == "auto" \
            else _ground(survey, req, config)
        source = {"dry_run": True, "generator": generator, "layout": layout.__dict__}
    else:
        if req.data is None:
            raise CitygenError(None, "plan needs --data transforms.json (or --dry-run)")
        survey = read_transforms(req.data).check_image_files()
        if req.before_ground is not None:
            if req.train_preset:  # a bad preset is refused before the pass too
                load_config(req.train_preset)
            first = compute_footprints(survey, _ground(survey, req, config), config.footprint_grid,
                                       config.max_ray_distance_m)
            _check_plan_size(first, survey, config, req)
            req.before_ground()
        ground = _ground(survey, req, config)
        source = {"dry_run": False, "data": str(req.data)}

    train = load_config(req.train_preset) if req.train_preset else TrainConfig()
    if req.downscale is not None:
        train.downscale = int(req.downscale)
    fp = compute_footprints(survey, ground, config.footprint_grid, config.max_ray_distance_m)
    if req.dry_run and config.bounds_crs is None:
        # size exactly the requested square: no snapping (a real tile's grid snaps to CRS
        # multiples of the block size, which can add a row or column of partial blocks)
        config = dataclasses.replace(config, snap_to_block_size=False,
                                     bounds_crs=_dry_run_bounds(fp, survey.georef.origin, layout))
    _check_plan_size(fp, survey, config, req)        # before any (image, block) pair is made
    plan = plan_tile(survey, config, ground, footprints=fp)
    report = sizing_report(plan, survey, train, req.sizing or SizingConfig())
    report["source"] = source
    report["ground"] = plan.ground
    report["train_preset"] = req.train_preset
    cam = survey.cameras[0]
    report["assumptions"]["camera"] = {"width": cam.width, "height": cam.height, "fl_x": cam.fl_x}
    if req.out is not None:
        out = Path(req.out)
        report["files"] = {"plan": str(plan.save(out / PLAN_FILE)),
                           "picture": str(draw_plan(plan, out / "plan.png", footprints=fp, ortho=req.ortho)),
                           "report": str(out / "plan_report.json")}
        atomic_write_json(out / "plan_report.json", report)
    return report


def _budget_text(req: PlanRequest) -> str:
    return f"the memory budget of {format_bytes(req.memory_budget_bytes)} ({req.memory_budget_source})"


def _check_flight_size(layout: FlightLayout, config: PartitionConfig, req: PlanRequest) -> None:
    """Refuse a dry-run flight whose plan would not fit, naming --area-km2 and an area that fits."""
    def blocks(area_km2: float) -> int:
        if config.blocks is not None:
            return config.blocks[0] * config.blocks[1]
        return math.ceil(math.sqrt(area_km2) * 1000.0 / config.block_size_m - 1e-9) ** 2

    def need(area_km2: float) -> float:
        images = synthetic_survey_size(dataclasses.replace(layout, area_km2=area_km2))
        return plan_bytes(images, min(blocks(area_km2), MAX_BLOCKS + 1))

    area = layout.area_km2
    if need(area) > req.memory_budget_bytes:
        fit = largest_fitting(need, 1e-6, area, req.memory_budget_bytes)
        hint = f"use --area-km2 {nice_down(fit)} or less, or fly higher than --altitude {layout.altitude_m:g}" \
            if fit is not None else "raise the budget"
        raise CitygenError(None, f"--area-km2 {area:g} at --altitude {layout.altitude_m:g} m is a flight of "
                                 f"{synthetic_survey_size(layout):,} images; planning it needs ~"
                                 f"{format_bytes(need(area))}, more than {_budget_text(req)}: {hint}")
    n_blocks = blocks(area)
    if n_blocks > MAX_BLOCKS and config.blocks is not None:
        _refuse_blocks_option(config.blocks, synthetic_survey_size(layout))
    if n_blocks > MAX_BLOCKS:
        side = math.sqrt(area) * 1000.0
        raise CitygenError(None, f"--area-km2 {area:g} in --block-size {config.block_size_m:g} m blocks makes "
                                 f"{n_blocks:,} blocks; at most {MAX_BLOCKS:,} in a plan: use --block-size "
                                 f"{nice_up(side / math.sqrt(MAX_BLOCKS))} or more")


def _check_plan_size(fp, survey, config: PartitionConfig, req: PlanRequest) -> None:
    """Refuse a grid of more than :data:`MAX_BLOCKS` blocks, or a plan that would not fit the
    memory budget, naming the option (--blocks or --block-size) and a value that fits."""
    grid = make_grid(fp, survey, config)
    n_blocks, n_images = grid.rows * grid.cols, len(fp.names)
    if n_blocks > MAX_BLOCKS:
        if config.blocks is not None:
            _refuse_blocks_option(config.blocks, n_images)
        ext = grid.extent
        raise CitygenError(None, f"--block-size {config.block_size_m:g} makes {n_blocks:,} blocks "
                                 f"({grid.rows:,} x {grid.cols:,}) over the {ext[2] - ext[0]:.0f} m x "
                                 f"{ext[3] - ext[1]:.0f} m the {n_images:,} images cover; at most {MAX_BLOCKS:,} in "
                                 f"a plan: use --block-size {_fitting_block_size(fp, survey, config)} or more")
    n_pairs = int(candidate_counts(fp, grid, config.margin_for(min(grid.block_size))).sum())
    need = plan_bytes(n_images, n_blocks, n_pairs)
    if need > req.memory_budget_bytes:
        raise CitygenError(None, f"planning {n_images:,} images in {n_blocks:,} blocks ({n_pairs:,} image-block "
                                 f"pairs) needs ~{format_bytes(need)}, more than {_budget_text(req)}: use fewer, "
                                 f"larger blocks (--block-size / --blocks) or plan the survey in parts")


def _refuse_blocks_option(blocks: tuple[int, int], n_images: int) -> None:
    rows, cols = blocks
    raise CitygenError(None, f"--blocks {rows}x{cols} makes {rows * cols:,} blocks for {n_images:,} images; at most "
                             f"{MAX_BLOCKS:,} in a plan: use --blocks AxB with A*B <= {MAX_BLOCKS:,}")


def _fitting_block_size(fp, survey, config: PartitionConfig) -> str:
    """The smallest round block size (2 significant digits) whose grid has <= MAX_BLOCKS blocks."""
    b = config.block_size_m
    for _ in range(2000):
        b *= 1.02
        nice = nice_up(b)
        grid = make_grid(fp, survey, dataclasses.replace(config, block_size_m=float(nice)))
        if grid.rows * grid.cols <= MAX_BLOCKS:
            return nice
    return nice_up(b)


def _dry_run_bounds(fp, origin, layout: FlightLayout) -> tuple[float, float, float, float]:
    """The requested square, not the footprints' spill-over beyond it: ``layout.side_m`` on a
    side, centred on the mean footprint centre (the layouts are symmetric about the area)."""
    centre = fp.polygons[fp.valid].mean(axis=1).mean(axis=0) + np.asarray(origin[:2])
    corner = centre - layout.side_m / 2
    return (float(corner[0]), float(corner[1]), float(corner[0] + layout.side_m), float(corner[1] + layout.side_m))


def _ground(survey, req: PlanRequest, config: PartitionConfig) -> GroundModel:
    if req.ground_tif is not None:
        return GroundModel.from_geotiff(req.ground_tif, survey.georef)
    if req.ground_height != "auto":
        try:
            height = float(req.ground_height)
            if not math.isfinite(height):
                raise ValueError(height)
            return GroundModel.plane(height, source="--ground-height")
        except ValueError:
            raise CitygenError(None, f"--ground-height wants 'auto' or metres, got {req.ground_height!r}") from None
    points = None
    if req.data is not None:
        folder = Path(req.data).parent
        for name in GROUND_TIF_NAMES:
            if (folder / name).is_file():
                return GroundModel.from_geotiff(folder / name, survey.georef)
        if (folder / SPARSE_MODEL).is_dir():
            points = load_sparse_points(folder / SPARSE_MODEL)
    return estimate_ground(survey, config, points=points)


def print_summary(report: dict[str, Any], file=None) -> None:
    """A readable table of the report (rich), on stderr by default so stdout stays JSON."""
    s, a = report["summary"], report["assumptions"]
    gb = 1e9
    gpu_mem = s["gpu_memory_per_block_bytes"]
    table = Table(title=f"citygen plan: {s['blocks']} blocks ({s['grid'][0]}x{s['grid'][1]} of "
                        f"{s['block_size_m'][0]:.0f} m, margin {s['margin_m']:.0f} m), {s['area_km2']:.1f} km²")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    ipb = s["images_per_block"]
    rows = [
        ("images (unassigned)", f"{s['images']} ({s['unassigned_images']})"),
        ("images / block (min / median / max)", f"{ipb['min']} / {ipb['median']:.0f} / {ipb['max']}"),
        ("low-coverage blocks", str(len(s["low_coverage_blocks"]))),
        (f"GPU memory / block (median / max), {a['gpu']}",
         f"{gpu_mem['median'] / gb:.1f} / {gpu_mem['max'] / gb:.1f} GB"),
        ("host memory / block (max, image cache off GPU)", f"{s['host_memory_per_block_bytes']['max'] / gb:.1f} GB"),
        ("all blocks fit the GPU", str(s["all_blocks_fit_gpu"])),
        ("training time / block (estimate)",
         f"{s['train_seconds_per_block'] / 60:.1f} min @ {a['rays_per_second']:.3g} rays/s"),
        ("GPU-hours, whole tile (estimate)", f"{s['gpu_hours_total']:.1f}"),
        ("model size", f"{s['model_bytes_total'] / gb:.2f} GB, {s['model_mb_per_km2']:.1f} MB/km²"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console(file=file or sys.stderr).print(table)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
