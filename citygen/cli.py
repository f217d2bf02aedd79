"""The ``citygen`` command line: the only module that parses arguments.

Each subcommand is a plain function whose typed, documented parameters tyro turns into
flags.  Each checks its option values (:mod:`citygen.checks`) and output locations before
any work.  Library code raises :class:`SurveyError` / :class:`CitygenError` for bad input;
here they become one line on stderr and exit status 2, without a traceback, and so does an
``OSError`` that names a path (disk full, permission denied, a file where a folder should
be ...).  Anything else is a bug and keeps its traceback.

Imports: each subcommand imports its modules inside its own function, on purpose, so that
``citygen --help`` and a command's option errors come without torch, rasterio, ray ... (the
top of the layers in pyproject.toml; tests/test_layers.py checks that importing this module
loads neither torch nor the viewer).  Everywhere else imports sit at the top of the module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import tyro

from survey_io import SurveyError

from .checks import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Range,
    check_out_dir,
    check_out_file,
    check_values,
    memory_budget,
    os_error_line,
)
from .errors import CitygenError

EXIT_BAD_INPUT = 2
#: The largest image side a command renders (16K): a typo such as 1920000x1080 fails at once.
IMAGE_SIDE = Range(1, 16384)
#: Flags of ``train`` / ``train-tile`` that set a config key, for errors about that key.
TRAIN_FLAGS = {"steps": "--steps", "rays_per_batch": "--rays-per-batch", "threads": "--threads",
               "device": "--device", "downscale": "--downscale", "seed": "--seed", "max_seconds": "--max-seconds"}


def _check_train_memory(cfg, budget_gb: float | None) -> None:
    """Refuse a training config that would not fit: the GPU's memory when it trains on one
    (unless --memory-budget-gb is given), else the host memory budget."""
    from .partition.estimate import check_train_memory

    if budget_gb is None and cfg.device in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            check_train_memory(cfg, total, "the GPU's memory; set --memory-budget-gb to change it", TRAIN_FLAGS)
            return
    budget = memory_budget(budget_gb)
    check_train_memory(cfg, budget.bytes, budget.source, TRAIN_FLAGS)


def synth(out: tyro.conf.Positional[Path], preset: str = "tiny", seed: int = 0) -> None:
    """Render a synthetic city drone survey (images with EXIF GPS, transforms.json, depth,
    semantics, ground-truth DSM and orthophoto GeoTIFFs, held-out test views).

    Args:
        out: output folder.
        preset: survey size: tiny (~60 images at 320x240) ... see `survey_io.synthetic.PRESETS`.
        seed: the city and the flight are deterministic for a seed.
    """
    from survey_io.synthetic import PRESETS, make_survey

    check_values([("--seed", seed, NON_NEGATIVE)])
    check_out_dir(out, "OUT")
    if preset not in PRESETS:
        raise CitygenError(None, f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    make_survey(out, PRESETS[preset], seed=seed)


def demo(out: Path = Path("outputs/demo"), seed: int = 0, lpips_weights: Path | None = None) -> None:
    """Run the whole pipeline on the built-in synthetic city and write a summary.

    Args:
        out: output folder (images, metrics, exports, summary.json).
        seed: seed of the synthetic city.
        lpips_weights: LPIPS weights (safetensors, from scripts/convert_lpips_weights.py) to score
            the held-out views with LPIPS too (default: $CITYGEN_LPIPS_WEIGHTS; none: no LPIPS).
    """
    from .demo import run_demo
    from .nets.lpips import resolve_lpips_weights

    run_demo(out, seed=seed, lpips_weights=resolve_lpips_weights(lpips_weights))


def status(tile_dir: tyro.conf.Positional[Path],
           as_json: Annotated[bool, tyro.conf.arg(name="json")] = False) -> None:
    """Show the state of every block of a tile being (or having been) trained.

    Args:
        tile_dir: the tile's output folder (the one given to run_tile).
        as_json: print the status as JSON instead of a table.
    """
    import json

    from .distributed import tile_status

    summary = tile_status(tile_dir)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console

    from .distributed.status_view import status_table

    Console().print(status_table(summary))


def triangulate(survey: tyro.conf.Positional[Path], out: Path | None = None, force: bool = False,
                max_image_size: int = 1000, num_threads: int = 2, matcher: str = "auto", seed: int = 0,
                verbose: bool = False) -> None:
    """Points for a posed survey without them: features, matches, triangulation with the poses fixed.

    Writes what ingest writes beside transforms.json: OUT/sparse/0 (COLMAP model, local frame),
    OUT/points3D_heldout.npz (the evaluation tenth) and OUT/triangulate_report.json, so that
    field boxes, sparse depth and the held-out point check use them.

    Args:
        survey: the survey's transforms.json (or its folder), or a BlocksExchange XML (needs --out).
        out: output folder; default the survey's folder.  Another folder gets links to the
            images and its own transforms.json.
        force: replace points the survey already has (OUT/sparse/0).
        max_image_size: long side (pixels) features are extracted at.
        num_threads: CPU threads for COLMAP.
        matcher: exhaustive, spatial (camera neighbours), or auto (exhaustive up to 60 images).
        seed: random seed of COLMAP.
        verbose: show COLMAP's log.
    """
    import json

    from survey_io.sfm import SfmOptions
    from survey_io.triangulate import triangulate_survey

    check_values([("--max-image-size", max_image_size, AT_LEAST_ONE), ("--num-threads", num_threads, AT_LEAST_ONE),
                  ("--seed", seed, NON_NEGATIVE)])
    if out is not None:
        check_out_dir(out, "--out")
    options = SfmOptions(max_image_size=max_image_size, num_threads=num_threads, matcher=matcher, seed=seed,
                         verbose=verbose)
    report = triangulate_survey(survey, out, force=force, options=options)
    print(json.dumps({"points": report["num_points3D"], "held_out_points": report["held_out_points"]["num_points"],
                      "median_reprojection_error_px": round(report["median_reprojection_error_px"], 3),
                      "images_with_points": f"{report['images_with_points']}/{report['images']}",
                      "matcher": report["matcher"], "seconds": round(report["timings_s"]["total"], 1),
                      "out": report["out"]}))


def _coarse_pass(data: Path, skip: bool) -> dict[str, Any] | None:
    """`citygen triangulate` run once on a survey with neither depth maps nor SfM points (see
    :func:`survey_io.triangulate.needs_coarse_pass`), said in one line on stderr: its points give
    the field boxes, the attribution surface and the plan's ground instead of camera heights.
    A pass that fails (no point triangulated, a read-only folder) leaves today's behaviour: the
    line says why, nothing is refused.  Returns what the command's JSON summary records."""
    from survey_io.ingest import SPARSE_MODEL
    from survey_io.triangulate import needs_coarse_pass, survey_transforms, triangulate_survey

    if skip or not needs_coarse_pass(data):
        return None
    folder = survey_transforms(data).parent
    print(f"citygen: coarse pass (no depth maps, no SfM points; --no-coarse-pass skips): triangulating "
          f"{folder} ...", end=" ", file=sys.stderr, flush=True)
    try:
        report = triangulate_survey(data)
    except (SurveyError, OSError) as err:
        reason = os_error_line(err) if isinstance(err, OSError) else str(err)
        print(f"failed ({reason}); heights from the cameras as without it", file=sys.stderr)
        return {"failed": reason}
    seconds = round(report["timings_s"]["total"], 1)
    print(f"{report['num_points3D']} points in {seconds} s, kept in {folder / SPARSE_MODEL}", file=sys.stderr)
    return {"points": report["num_points3D"], "seconds": seconds, "out": report["out"]}


def ingest(folder: tyro.conf.Positional[Path], out: Path, max_image_size: int = 1000, num_threads: int = 2,
           camera_model: str = "SIMPLE_RADIAL", matcher: str = "auto", vertical_weight: float = 0.1,
           gps_prior: bool = True, keep_gps_outliers: bool = False, seed: int = 0, verbose: bool = False,
           focal: Literal["auto", "fixed", "refine"] = "auto", holdout_every: int = 8, max_gps_lag: int = 3) -> None:
    """Structure from motion on a folder of drone JPEGs, georegistered by their EXIF GPS.

    Writes OUT/transforms.json (local ENU frame, with georef), OUT/images (links to the
    inputs), OUT/sparse/0 (COLMAP model) and OUT/ingest_report.json (registered images,
    GPS residuals in metres, timings).

    Args:
        folder: folder of drone JPEGs with GPS EXIF (or holding them in images/).
        out: output folder.
        max_image_size: long side (pixels) features are extracted at.
        num_threads: CPU threads for COLMAP.
        camera_model: COLMAP model refined by SfM: SIMPLE_RADIAL, RADIAL, OPENCV, PINHOLE, SIMPLE_PINHOLE.
        matcher: exhaustive, spatial (GPS neighbours), or auto (exhaustive up to 60 images).
        vertical_weight: weight of GPS altitude against horizontal position in the alignment.
        gps_prior: let COLMAP's bundle adjustment use the GPS positions (robust loss).
        keep_gps_outliers: keep registered images whose SfM position is a GPS outlier.
        seed: random seed of SfM and alignment.
        verbose: show COLMAP's log.
        focal: auto (EXIF focal length fixed for nadir-only flights, refined where the viewing
            directions spread enough), fixed (always the EXIF value), refine (always self-calibrate).
        holdout_every: hold out every n-th image (name order) for evaluation; 0 for none.
        max_gps_lag: largest camera-to-GPS lag (frames) tried; 0 turns the lag estimate off.
    """
    import json

    from survey_io.ingest import IngestOptions
    from survey_io.ingest import ingest as run_ingest
    from survey_io.sfm import SfmOptions

    check_values([("--max-image-size", max_image_size, AT_LEAST_ONE), ("--num-threads", num_threads, AT_LEAST_ONE),
                  ("--vertical-weight", vertical_weight, POSITIVE), ("--seed", seed, NON_NEGATIVE),
                  ("--holdout-every", holdout_every, NON_NEGATIVE), ("--max-gps-lag", max_gps_lag, NON_NEGATIVE)])
    check_out_dir(out, "--out")
    options = IngestOptions(
        sfm=SfmOptions(max_image_size=max_image_size, num_threads=num_threads, camera_model=camera_model,
                       matcher=matcher, use_gps_prior=gps_prior, seed=seed, verbose=verbose),
        vertical_weight=vertical_weight, drop_gps_outliers=not keep_gps_outliers, seed=seed, focal=focal,
        holdout_every=holdout_every, max_gps_lag_frames=max_gps_lag)
    report = run_ingest(folder, out, options).report
    res = report["gps_residual_m"]
    summary = {"registered": f"{report['registered']}/{report['total']}", "written": report["written"],
               "unregistered": report["unregistered"], "gps_outliers": report["gps_outliers"],
               "gps_residual_horizontal_rmse_m": round(res["horizontal"]["rmse"], 3),
               "gps_residual_vertical_rmse_m": round(res["vertical"]["rmse"], 3),
               "reprojection_error_px": round(report["sfm"]["mean_reprojection_error_px"], 3),
               "focal_px": [round(c["used_px"], 1) for c in report["focal"]["cameras"]],
               "focal_source": [c["source"] for c in report["focal"]["cameras"]],
               "gps_lag_frames": report["gps_lag"]["frames"],
               "held_out_views": len(report["held_out_views"]["names"]),
               "held_out_points": report["held_out_points"]["num_points"],
               "seconds": round(report["timings_s"]["total"], 1), "out": str(out)}
    print(json.dumps(summary))


def bench(what: tyro.conf.Positional[Literal["encode", "render", "stream", "scale", "export", "view"]],
          out: Path | None = None, n_points: int = 2**16, repeats: int = 5, device: str = "auto",
          tile: Path | None = None, res: tuple[str, ...] = (), frames: int = 5, reference_frames: int = 1,
          no_stream: bool = False, stream_budget_gb: float | None = None, stream_frames: int | None = None,
          sweep_log2: tuple[int, ...] = (), narrow_band: bool = False, survey: Path | None = None,
          stream_area_km2: float = 100.0, stream_block_size: float = 1000.0, stream_path_km: float = 10.0,
          stream_prefetch_m: float = 1500.0, stream_read_gbps: float = 1.0, stream_dir: Path | None = None,
          picture: Path | None = None, scale_dir: Path = Path("outputs/bench_scale"),
          scale_areas: tuple[float, ...] = (0.1, 0.25), scale_steps: int = 60,
          size_m: float = 1000.0, gsd: float = 0.1, las_points: int = 50_000_000, work: Path | None = None,
          view_frames: int = 120, view_rest_jobs: int = 0, view_no_lod: bool = False, no_bake: bool = False,
          survey_views: int = 4) -> None:
    """Measure throughput and print it as JSON (and write it to --out).

    Args:
        what: which benchmark: encode (hash-grid forward + backward, every available backend
            side by side, torch reference = 1.0x), render (the real-time renderer), stream (a
            simulated fly-through of a 100 km2 tile of block-preset-sized packed blocks, prefetch
            on and off), scale (the chain, stage by stage, on synthetic surveys of growing area),
            export (peak memory of windowed COG rasters and chunked LAZ, analytic scene), view
            (the viewer's envelope layer: frame times along a fly path, headless EGL; needs --tile,
            bakes the envelope where missing).
        out: also write the JSON here.
        n_points: points per step.
        repeats: timed steps per backend (the median is reported).
        device: cpu, cuda or auto (cuda when available).
        tile: render: a trained run, checkpoint or tile folder (default: a synthetic field); view: the tile.
        res: render: resolutions such as 1920x1080 (default 1920x1080 3840x2160 on a GPU, 160x90 on a CPU);
            view: the window size (default 1280x720).
        frames: render: fly-through frames per resolution.
        reference_frames: render: frames of the torch reference renderer (the 1.0x baseline).
        no_stream: render: skip the 100 km2 streaming fly-through.
        stream_budget_gb: render, stream: device memory budget of the block cache (default 12 on a GPU;
            on a CPU 0.005 for render, 2 for stream).
        stream_frames: render: frames of the streaming fly-through.
        sweep_log2: encode: instead of --n-points, one run per size 2^K for each K given
            (e.g. --sweep-log2 18 19 20 21 22).
        narrow_band: render: also bake the block's envelope and compare narrow-band rendering
            (samples per pixel, PSNR, envelope bytes, bake time, H100 roofline estimate).
        survey: render --narrow-band: the survey (transforms.json) whose held-out views are also
            scored, against their ground-truth images too.  On a tile folder of several blocks
            every block is measured on its fly path and its own held-out views, and pooled.
        no_bake: render --narrow-band: no envelope bake (minutes a block on a CPU); the same views
            and figures for the plain real-time path.
        survey_views: render --narrow-band: held-out views scored (per block on a tile).
        size_m: export: side of the square exported as ortho + DSM COGs (analytic scene), metres.
        gsd: export: their cell size, metres.
        las_points: export: points of the larger of the two chunked LAZ files (the other: a tenth).
        work: export: keep the files in this folder (default: a temp folder, removed).
        stream_area_km2: stream: the tile's area (square).
        stream_block_size: stream: block side, metres (the plan's default 1000).
        stream_path_km: stream: length of the flight path.
        stream_prefetch_m: stream: prefetch the blocks seen from this much path ahead.
        stream_read_gbps: stream: simulated read speed of a block load, GB/s.
        stream_dir: stream: keep the blocks' files here and reuse them on the next run (default: a
            temporary folder, removed; 100 blocks of the block preset take about 19 GB).
        picture: render --narrow-band: the first view of each set, reference | narrow band | its
            samples per pixel (PNG); stream: the picture of the path over the plan; scale: the
            log-log plot of stage time against area; view: the last flying frame (PNG; the frame
            after the rest beside it, *_rest.png).
        scale_dir: scale: where each area's survey, tile and outputs go (area_<A>km2/).
        scale_areas: scale: areas in km2 to run (0.1 0.25 1 4 is the whole study; the default
            runs the two smallest and extrapolates the others).
        scale_steps: scale: training steps per block (fixed, short).
        view_frames: view: frames along the fly path.
        view_rest_jobs: view: then rest and run this many neural refinement jobs (0: none).
        view_no_lod: view: draw every chunk at the finest level, unculled (the baseline of the
            levels of detail and frustum culling).
    """
    import json

    from survey_io.atomic import atomic_write_json

    if device not in ("auto", "cpu", "cuda"):
        raise CitygenError(None, f"bench: unknown device {device!r} (known: auto, cpu, cuda)")
    check_values([("--n-points", n_points, AT_LEAST_ONE), ("--repeats", repeats, AT_LEAST_ONE),
                  ("--frames", frames, AT_LEAST_ONE), ("--reference-frames", reference_frames, NON_NEGATIVE),
                  ("--stream-budget-gb", stream_budget_gb, POSITIVE), ("--stream-frames", stream_frames, AT_LEAST_ONE),
                  ("--stream-area-km2", stream_area_km2, POSITIVE), ("--stream-block-size", stream_block_size, POSITIVE),
                  ("--stream-path-km", stream_path_km, POSITIVE), ("--stream-prefetch-m", stream_prefetch_m, NON_NEGATIVE),
                  ("--stream-read-gbps", stream_read_gbps, POSITIVE), ("--scale-steps", scale_steps, AT_LEAST_ONE),
                  ("--view-frames", view_frames, AT_LEAST_ONE), ("--view-rest-jobs", view_rest_jobs, NON_NEGATIVE)]
                 + [(f"--scale-areas {a}", a, POSITIVE) for a in scale_areas])
    if out is not None:
        check_out_file(out, "--out")
    if picture is not None:
        check_out_file(picture, "--picture")
    if what == "encode":
        from .bench import bench_encode, bench_encode_sweep

        if any(not 0 <= k <= 30 for k in sweep_log2):
            raise CitygenError(None, f"bench: --sweep-log2 takes exponents 0..30, got {list(sweep_log2)}")
        result = (bench_encode_sweep([2**k for k in sweep_log2], repeats=repeats, device=device) if sweep_log2
                  else bench_encode(n_points=n_points, repeats=repeats, device=device))
    elif what == "render":
        from .bench_render import bench_render, parse_resolution

        if survey is not None and not narrow_band:
            raise CitygenError(None, "bench render: --survey scores the narrow band's views; pass --narrow-band with it")
        if picture is not None and not narrow_band:
            raise CitygenError(None, "bench render: --picture draws the narrow band's views; pass --narrow-band with it")

        resolutions = [parse_resolution(r) for r in res]
        check_values((f"--res {r}", side, IMAGE_SIDE) for r, wh in zip(res, resolutions) for side in wh)
        check_values([("--survey-views", survey_views, AT_LEAST_ONE)])
        result = bench_render(tile=tile, resolutions=resolutions or None, n_frames=frames,
                              reference_frames=reference_frames, device=device, stream=not no_stream,
                              stream_budget_gb=stream_budget_gb, stream_frames=stream_frames,
                              narrow_band=narrow_band, survey=survey, picture=picture, bake=not no_bake,
                              survey_views=survey_views)
    elif what == "stream":
        from .bench_stream import bench_stream

        result = bench_stream(area_km2=stream_area_km2, block_size=stream_block_size, budget_gb=stream_budget_gb,
                              path_km=stream_path_km, prefetch_m=stream_prefetch_m, read_gbps=stream_read_gbps,
                              folder=stream_dir, picture=picture, device=device)
    elif what == "scale":
        from .bench_scale import bench_scale

        if not scale_areas:
            raise CitygenError(None, "bench scale: --scale-areas needs at least one area")
        result = bench_scale(check_out_dir(scale_dir, "--scale-dir"), tuple(scale_areas), steps=scale_steps,
                             picture=picture)
    elif what == "export":
        from .export.bench import bench_export

        check_values([("--size-m", size_m, POSITIVE), ("--gsd", gsd, POSITIVE), ("--las-points", las_points, Range(10))])
        if work is not None:
            check_out_dir(work, "--work")
        result = bench_export(size_m=size_m, gsd=gsd, n_points=las_points, work=work)
    elif what == "view":
        from viewer.launch import bench_view, open_app

        from .bench_render import parse_resolution

        if tile is None:
            raise CitygenError(None, "bench view: --tile is required (a trained tile folder)")
        if len(res) > 1:
            raise CitygenError(None, f"bench view: one --res (the window size), got {len(res)}")
        size = parse_resolution(res[0]) if res else (1280, 720)
        check_values((f"--res {res[0] if res else ''}", side, IMAGE_SIDE) for side in size)
        app = open_app(tile, size=size, device="cpu" if device == "auto" else device, layer="envelope")
        result = bench_view(app, frames=view_frames, screenshot=picture, rest_jobs=view_rest_jobs,
                            lod=not view_no_lod)
    print(json.dumps(result, indent=2))
    if out is not None:
        atomic_write_json(out, result)


def plan(data: Path | None = None, out: Path | None = None, dry_run: bool = False, area_km2: float = 100.0,
         altitude: float = 250.0, block_size: float = 1000.0, blocks: str | None = None, margin: float | None = None,
         max_images_per_block: int = 2000, ground_height: str = "auto", ground_tif: Path | None = None,
         ortho: Path | None = None, train_preset: str = "city-100km2", downscale: int | None = None,
         gpu: str = "h100", rays_per_second: float | None = None, seed: int = 0,
         memory_budget_gb: float | None = None, no_coarse_pass: bool = False) -> None:
    """Cut a tile into blocks, assign images by what they see, and size the training job.

    Writes OUT/plan.json, OUT/plan.png and OUT/plan_report.json; prints the report as JSON on
    stdout and a table on stderr.  With --dry-run no survey is needed: a synthetic flight
    over --area-km2 at --altitude is planned (poses only, nothing rendered).

    Args:
        data: the survey's transforms.json (not with --dry-run).
        out: output folder (optional with --dry-run).
        dry_run: plan a synthetic flight layout instead of --data.
        area_km2: dry run: area of the square tile.
        altitude: dry run: flying height above ground, metres.
        block_size: block core side, metres (the grid snaps to multiples of it in the CRS).
        blocks: ROWSxCOLS instead of --block-size, e.g. 2x2 (tiny scenes).
        margin: overlap margin around each core, metres (default: 50 m, or 10% of the block
            side with --blocks).
        max_images_per_block: cap per block (the images seeing most of the core win).
        ground_height: a ground-plane height in local metres, or 'auto': dsm.tif / dtm.tif beside
            --data, else the median height of the COLMAP points in sparse/0 beside it, else of
            the depth maps, else the median camera height minus 120 m.
        ground_tif: a DSM/DTM GeoTIFF (survey CRS) to cut the view frusta with.
        ortho: an orthophoto GeoTIFF drawn under the plan picture.
        train_preset: training config preset the sizing assumes (tiny, block, city-100km2; citygen/configs/<name>.yaml).
        downscale: training image downscale (overrides the preset).
        gpu: target GPU for the sizing: h100, h200, a100, l40s, cpu.
        rays_per_second: measured training throughput (overrides the GPU's estimate).
        seed: dry run: seed of the flight layout's jitter.
        memory_budget_gb: refuse plans estimated to need more memory (default: 75% of the
            RAM available when it starts).
        no_coarse_pass: with --ground-height auto and neither a ground GeoTIFF, depth maps nor
            SfM points beside --data, take the ground from the cameras instead of triangulating
            the survey's points first (`citygen triangulate`, once; kept in its folder).
    """
    from .partition.config import PartitionConfig
    from .partition.estimate import SizingConfig
    from .partition.layout import FlightLayout
    from .partition.run import PlanRequest, parse_blocks, print_summary, report_json, run_plan

    if not dry_run and (data is None or out is None):
        raise CitygenError(None, "plan needs --data and --out (or --dry-run)")
    check_values([("--area-km2", area_km2, POSITIVE), ("--altitude", altitude, POSITIVE),
                  ("--block-size", block_size, POSITIVE), ("--margin", margin, NON_NEGATIVE),
                  ("--max-images-per-block", max_images_per_block, AT_LEAST_ONE),
                  ("--downscale", downscale, AT_LEAST_ONE), ("--rays-per-second", rays_per_second, POSITIVE),
                  ("--seed", seed, NON_NEGATIVE)])
    budget = memory_budget(memory_budget_gb)
    if out is not None:
        check_out_dir(out, "--out")
    request = PlanRequest(
        data=data, out=out, dry_run=dry_run, ground_height=ground_height, ground_tif=ground_tif, ortho=ortho,
        partition=PartitionConfig(block_size_m=block_size, blocks=parse_blocks(blocks),
                                  margin_m=50.0 if margin is None else margin,
                                  margin_fraction=0.1 if margin is None and blocks is not None else None,
                                  max_images_per_block=max_images_per_block),
        layout=FlightLayout(area_km2=area_km2, altitude_m=altitude) if dry_run else None,
        train_preset=train_preset, downscale=downscale,
        sizing=SizingConfig(gpu=gpu, rays_per_second=rays_per_second), seed=seed,
        memory_budget_bytes=budget.bytes, memory_budget_source=budget.source)
    if data is not None and not dry_run and ground_height == "auto" and ground_tif is None and not no_coarse_pass:
        from survey_io.triangulate import needs_coarse_pass

        from .partition.run import GROUND_TIF_NAMES

        if not any((data.parent / name).is_file() for name in GROUND_TIF_NAMES) and needs_coarse_pass(data):
            request.before_ground = lambda: _coarse_pass(data, False)
    report = run_plan(request)
    print(report_json(report))
    print_summary(report)


def _chosen_preset(preset: str | None, data: Path) -> tuple[str, str]:
    """``preset``, or the default for the survey at ``data`` (``citygen.config.choose_preset``: tiny
    with depth maps, drone without), and why (for the command's JSON summary: a line on stderr
    before the run would break the one-line errors of bad input found later)."""
    from .config import choose_preset
    from .train.data import load_survey

    survey = load_survey(data)
    name, why = choose_preset(preset, bool(survey.images) and all(im.depth is not None for im in survey.images))
    return str(name), why


def train(data: Path, out: Path, preset: str | None = None, steps: int | None = None, resume: bool = False,
          rays_per_batch: int | None = None, threads: int | None = None, device: str | None = None,
          downscale: int | None = None, seed: int | None = None, max_seconds: float | None = None,
          override: tuple[str, ...] = (), no_eval: bool = False, no_progress: bool = False,
          lpips_weights: Path | None = None, memory_budget_gb: float | None = None,
          no_coarse_pass: bool = False) -> None:
    """Train one block's neural field on a survey (all its training images), then evaluate the
    held-out views.  Writes OUT/config.json, OUT/metrics.jsonl, OUT/checkpoints/ and OUT/eval/.

    Args:
        data: the survey's transforms.json (or its folder).
        out: run folder.
        preset: config preset (tiny, drone, block, city-100km2; shipped in citygen/configs/) or a YAML
            file (default: tiny when every image has a depth map, else drone).
        steps: training steps (overrides the preset).
        resume: continue exactly from the newest checkpoint in OUT.
        rays_per_batch: rays per step (overrides the preset).
        threads: CPU threads (overrides the preset).
        device: cpu, cuda or auto (overrides the preset).
        downscale: image downscale factor (overrides the preset).
        seed: random seed (overrides the preset).
        max_seconds: stop training after this many seconds (overrides the preset).
        override: further config overrides as dotted KEY=VALUE, e.g. --override optim.lr_grid=0.005 field.n_levels=12.
        no_eval: skip the held-out evaluation at the end.
        no_progress: no progress bar.
        lpips_weights: LPIPS weights (safetensors, from scripts/convert_lpips_weights.py) for the
            evaluation (default: $CITYGEN_LPIPS_WEIGHTS; none: no LPIPS).
        memory_budget_gb: refuse configs estimated to need more memory to train (default: the
            GPU's memory on a GPU, else 75% of the RAM available when it starts).
        no_coarse_pass: a survey with neither depth maps nor SfM points keeps the box from camera
            heights instead of getting its points triangulated first (`citygen triangulate`, once;
            kept in its folder).
    """
    import json

    from .config import load_config, parse_overrides
    from .nets.lpips import resolve_lpips_weights
    from .train import train_block

    overrides = {k: v for k, v in dict(steps=steps, rays_per_batch=rays_per_batch, threads=threads, device=device,
                                       downscale=downscale, seed=seed, max_seconds=max_seconds).items()
                 if v is not None}
    overrides.update(parse_overrides(override))
    if no_eval:
        overrides["eval_at_end"] = False
    preset, why = _chosen_preset(preset, data)
    cfg = load_config(preset, overrides, TRAIN_FLAGS)
    _check_train_memory(cfg, memory_budget_gb)
    check_out_dir(out, "--out")
    # a resumed run keeps the box and the losses it started with: no pass in the middle of a run
    coarse = _coarse_pass(data, no_coarse_pass or resume)
    result = train_block(cfg, data, out, resume=resume, progress=not no_progress,
                         lpips_weights=None if no_eval else resolve_lpips_weights(lpips_weights))
    summary = {"out": str(result.out), "preset": cfg.preset, "preset_reason": why, "checkpoint": str(result.checkpoint), "step": result.step,
               "train_seconds": round(result.seconds, 2), "box_source": result.box_source, "coarse_pass": coarse,
               "eval": result.eval["mean"] if result.eval else None,
               "heldout_points": result.eval.get("heldout_points") if result.eval else None}
    print(json.dumps(summary, indent=2))


def train_tile(tile: tyro.conf.Positional[Path], data: Path, preset: str | None = None,
               executor: Literal["local", "ray"] = "local", ray_address: str | None = None,
               max_parallel: int | None = None, max_retries: int = 2, steps: int | None = None,
               rays_per_batch: int | None = None, threads: int | None = None, device: str | None = None,
               downscale: int | None = None, blocks: list[str] | None = None, override: tuple[str, ...] = (),
               memory_budget_gb: float | None = None, no_eval: bool = False, no_coarse_pass: bool = False,
               overlap: Literal["split", "both"] | None = None) -> None:
    """Train every block of a planned tile (TILE/plan.json from `citygen plan`) through an
    executor; block runs go to TILE/block_<id>/.  Re-running resumes: finished blocks are
    skipped, the others continue from their last checkpoints.  Watch it with `citygen status TILE`.
    Then the survey's held-out views are rendered from all blocks together into TILE/eval/
    (PNGs, metrics.json) and scored: PSNR/SSIM and the rendered depth against the held-out SfM points.

    Args:
        tile: the tile folder holding plan.json.
        data: the survey's transforms.json the tile was planned on.
        preset: training config preset (tiny, drone, block, city-100km2; shipped in citygen/configs/) or a
            YAML file (default: tiny when every image has a depth map, else drone).
        executor: local (worker processes on this machine) or ray (a Ray cluster).
        ray_address: Ray cluster to join (default: start a local Ray instance).
        max_parallel: local executor: blocks at once (default: one per GPU, 1 on CPU).
        max_retries: retries per block after a failed attempt.
        steps: training steps per block (overrides the preset); a block spends these steps' rays
            in batches scaled by its share of the survey's pixels, over correspondingly more steps.
        rays_per_batch: rays per step (overrides the preset), scaled per block likewise.
        threads: CPU threads per block (overrides the preset).
        device: cpu, cuda or auto (overrides the preset).
        downscale: image downscale factor (overrides the preset).
        blocks: train only these block ids.
        override: further config overrides as dotted KEY=VALUE, e.g. --override steps=200 checkpoint_every=50.
        memory_budget_gb: refuse configs estimated to need more memory per block (default: the
            GPU's memory on a GPU, else 75% of the RAM available when it starts).
        no_eval: skip the held-out evaluation of the tile at the end.
        no_coarse_pass: a survey with neither depth maps nor SfM points keeps boxes from the
            plan and camera heights (and attribution on the plan's ground) instead of getting its
            points triangulated first (`citygen triangulate`, once; kept in its folder).
        overlap: where two blocks overlap, train each pixel in both (both) or in one of them
            drawn by the compositor's blend weights (split: as good at equal CPU time on the
            failure-like survey, 0.3 dB worse on the demo; DESIGN.md).  Default: both for a new
            tile, a resumed tile keeps the rule it started with.
    """
    import json

    from .config import load_config, parse_overrides
    from .tile import train_tile as run_train_tile

    check_values([("--max-parallel", max_parallel, AT_LEAST_ONE), ("--max-retries", max_retries, NON_NEGATIVE)])
    overrides = {k: v for k, v in dict(steps=steps, rays_per_batch=rays_per_batch, threads=threads, device=device,
                                       downscale=downscale).items() if v is not None}
    overrides.update(parse_overrides(override))
    preset, why = _chosen_preset(preset, data)
    cfg = load_config(preset, overrides, TRAIN_FLAGS)
    _check_train_memory(cfg, memory_budget_gb)
    check_out_dir(tile, "TILE")
    from .store.layout import TILE_CONFIG_FILE

    # a rerun resumes the blocks with the boxes and attribution they started with: no pass then
    coarse: dict[str, Any] = {}
    skip_pass = no_coarse_pass or (tile / TILE_CONFIG_FILE).is_file()
    result = run_train_tile(tile, data, preset, executor, overrides=overrides, max_parallel=max_parallel,
                            ray_address=ray_address, max_retries=max_retries, blocks=blocks,
                            coarse_pass=lambda: coarse.update(_coarse_pass(data, skip_pass) or {}),
                            split_overlaps=None if overlap is None else overlap == "split")
    summary = {"tile": str(tile), "preset": preset, "preset_reason": why, "coarse_pass": coarse or None, "ok": result.ok,
               "failed": result.failed,
               "blocks": {b: {"state": o.state, "attempts": o.attempts, "skipped": o.skipped, "error": o.error,
                              "step": (o.result or {}).get("step"),
                              "train_seconds": (o.result or {}).get("train_seconds")}
                          for b, o in sorted(result.blocks.items())}}
    if not no_eval and not result.failed:
        summary["eval"] = _evaluate_tile(tile, data, cfg.downscale)
    print(json.dumps(summary, indent=2))
    result.raise_for_failures()


def _evaluate_tile(tile: Path, data: Path, downscale: int) -> dict[str, Any] | str:
    """The trained tile's held-out views, composited from all blocks (`citygen render`'s scoring),
    at the training downscale into TILE/eval/: their mean PSNR/SSIM and the rendered depth against
    the survey's held-out SfM points; a sentence when the survey holds no view out."""
    from .render.tile_views import render_tile_views
    from .tile import open_tile
    from .train.data import load_survey

    survey = load_survey(data)
    if not survey.test_images:
        return "no held-out views in the survey"
    renderer = open_tile(tile)
    if renderer.missing_blocks:  # --blocks trained a part: a view would show holes, not the field's error
        return f"not evaluated: blocks {', '.join(map(str, renderer.missing_blocks))} not trained yet"
    report = render_tile_views(renderer, survey, ("test",), tile / "eval", downscale=max(int(downscale), 1))
    return {"views": len(report["views"]), "mean": report["mean"], "heldout_points": report["heldout_points"],
            "metrics": str(tile / "eval" / "metrics.json")}


def render(tile: tyro.conf.Positional[Path], out: Path, views: tuple[str, ...] = ("test",), data: Path | None = None,
           device: str = "cpu", downscale: int | None = None, seam_band: float | None = None,
           lpips_weights: Path | None = None) -> None:
    """Render survey views of a trained tile (all blocks blended) and score them against the
    survey's ground truth.  Writes OUT/<view>_rgb.png, _depth.png, _semantics.png and
    OUT/metrics.json (PSNR, SSIM, LPIPS with weights, semantic accuracy/mIoU, depth error, and
    the seam metric: PSNR near block boundaries vs inside blocks, where the survey has depth maps).

    Args:
        tile: the tile folder (plan.json + block_<id>/ checkpoints).
        out: output folder.
        views: test (held-out views), all, or image names.
        data: the survey's transforms.json (default: the one the tile was trained on).
        device: cpu or cuda.
        downscale: render at 1/downscale of the survey's image size (default: the training downscale).
        seam_band: seam metric: pixels within this many metres of a block boundary count as
            boundary pixels (default: the plan's overlap margin).
        lpips_weights: LPIPS weights (safetensors, from scripts/convert_lpips_weights.py)
            (default: $CITYGEN_LPIPS_WEIGHTS; none: no LPIPS).
    """
    import json

    from .nets.lpips import load_lpips, resolve_lpips_weights
    from .render.tile_views import render_tile_views
    from .store.layout import read_tile_config
    from .tile import open_tile
    from .train.data import load_survey

    check_values([("--downscale", downscale, AT_LEAST_ONE), ("--seam-band", seam_band, POSITIVE)])
    check_out_dir(out, "--out")
    lpips_net = load_lpips(resolve_lpips_weights(lpips_weights), device)  # fail before any rendering
    record = read_tile_config(tile) or {}
    if data is None:
        if "data" not in record:
            raise CitygenError(tile, "no survey recorded for this tile: pass --data transforms.json")
        data = Path(record["data"])
    if downscale is None:
        downscale = int(record.get("train", {}).get("downscale", 1))
    if downscale < 1:
        raise CitygenError(None, f"--downscale must be >= 1, got {downscale}")
    renderer = open_tile(tile, device=device)
    report = render_tile_views(renderer, load_survey(data), views, out, downscale=downscale, seam_band_m=seam_band,
                               lpips_weights=lpips_net)
    seams = report["seams"] or {}
    print(json.dumps({"out": str(out), "views": len(report["views"]), "mean": report["mean"],
                      "seams": {k: v for k, v in seams.items() if k != "views"} or None,
                      "heldout_points": report["heldout_points"], "render_seconds": report["render_seconds"]}, indent=2))


def view(tile: tyro.conf.Positional[Path], ply: Path | None = None, survey: Path | None = None,
         width: int = 1280, height: int = 720, device: str = "cpu",
         screenshot: Path | None = None, screenshot_size: tuple[int, int] | None = None,
         camera: int | None = None, mode: Literal["rgb", "depth", "semantics"] = "rgb", no_hud: bool = False,
         layer: Literal["auto", "envelope", "neural"] = "auto") -> None:
    """Open the desktop viewer on a trained tile (neural rendering) or on a baked PLY preview
    (mesh or point cloud from `citygen export`).  Fly with W/A/S/D/Q/E and the mouse; keys
    1/2/3 switch RGB/depth/classes, b block boundaries, m measure, k/l/j camera-path
    keyframe/play/save, f screenshot, r survey view, n/p training cameras, t the tile's edits
    on/off, c the next style (none, named styles, styles stored on the tile).  With --screenshot
    nothing opens: the view is rendered headless (EGL) and saved.

    Args:
        tile: a tile folder (plan.json + block checkpoints) or a .ply file.
        ply: also load this baked PLY over the tile.
        survey: transforms.json whose training cameras n/p jump to (default: the tile's survey).
        width: window width in pixels.
        height: window height in pixels.
        device: cpu or cuda (neural rendering).
        screenshot: render headless and save this PNG instead of opening a window.
        screenshot_size: screenshot width and height (default: the window size).
        camera: with --screenshot: view from this training camera (index) instead of the survey view.
        mode: with --screenshot: display mode.
        no_hud: with --screenshot: leave the HUD out.
        layer: what draws while the camera moves over a tile: envelope (the blocks' baked
            envelopes, baked first where missing; the neural render refines the view at rest),
            neural (every frame: for CUDA), auto (neural on CUDA, else the envelopes already
            baked by `citygen bake-envelope`, else neural).
    """
    from viewer.launch import headless_screenshot, open_app, run_window

    check_values([("--width", width, IMAGE_SIDE), ("--height", height, IMAGE_SIDE), ("--camera", camera, NON_NEGATIVE)]
                 + [("--screenshot-size", v, IMAGE_SIDE) for v in screenshot_size or ()])
    if screenshot is not None:
        check_out_file(screenshot, "--screenshot")
    app = open_app(tile, ply=ply, survey=survey, size=(width, height), device=device, layer=layer)
    if screenshot is not None:
        path = headless_screenshot(app, screenshot, size=screenshot_size, view=camera, mode=mode, hud=not no_hud)
        print(f"screenshot: {path}")
        return
    run_window(app, title=f"citygen viewer: {tile}")


def export(tile: tyro.conf.Positional[Path], out: Path, what: str = "ortho,dsm,semantics,las,ply,mesh",
           gsd: float = 0.5, bounds: str | None = None, supersample: int = 1, min_acc: float = 0.5,
           points_from: Literal["grid", "views"] = "grid", mesh_method: Literal["heightfield", "tsdf"] = "heightfield",
           voxel_size: float | None = None, view_size: int = 256, data: Path | None = None,
           camera_images: Literal["link", "copy", "none"] = "link", device: str = "cpu",
           no_progress: bool = False, memory_budget_gb: float | None = None) -> None:
    """Export a trained tile's deliverables in its CRS: true orthophoto, DSM and semantic
    GeoTIFFs, LAS/LAZ and PLY point clouds, a PLY + OBJ mesh, and the cameras as
    transforms.json.  Writes OUT/ortho.tif, dsm.tif, semantics.tif, points.las|.laz|.ply,
    mesh.ply, mesh.obj, cameras/transforms.json and OUT/export.json (manifest).

    Args:
        tile: the tile folder (plan.json + block checkpoints).
        out: output folder.
        what: comma-separated: ortho, dsm, semantics, las, laz, ply, mesh, cameras (or all).
        gsd: ground sample distance of the rasters, metres (also the grid point spacing).
        bounds: E0,N0,E1,N1 in the tile's CRS (default: the blocks' cores).
        supersample: rays per cell side for the rasters (the DSM keeps the highest).
        min_acc: opacity below which a ray saw nothing (nodata).
        points_from: grid (one point per ortho cell) or views (rendered oblique views: facades too).
        mesh_method: heightfield (2.5D from the DSM) or tsdf (fusion of rendered depth; needs open3d).
        voxel_size: TSDF voxel size, metres (default: the GSD).
        view_size: side (pixels) of the rendered aerial views used by tsdf and --points-from views
            (5 views: nadir + 4 obliques, every half footprint; a nadir pixel covers about the GSD).
        data: the survey's transforms.json, for cameras (default: the one the tile was trained on).
        camera_images: cameras: link (hard links), copy, or none (poses pointing back at the survey).
        device: cpu or cuda.
        no_progress: no progress bars.
        memory_budget_gb: refuse exports estimated (from --gsd and the extent) to need more
            memory (default: 75% of the RAM available when it starts).
    """
    import json

    from .export.run import ExportOptions, export_tile, parse_what

    check_values([("--gsd", gsd, POSITIVE), ("--supersample", supersample, Range(1, 64)),
                  ("--min-acc", min_acc, UNIT), ("--voxel-size", voxel_size, POSITIVE),
                  ("--view-size", view_size, Range(8, 16384))])
    budget = memory_budget(memory_budget_gb)
    check_out_dir(out, "--out")

    options = ExportOptions(what=parse_what(what), gsd=gsd, supersample=supersample, min_acc=min_acc,
                            points_from=points_from, mesh_method=mesh_method, voxel_size=voxel_size,
                            view_size=view_size, survey=data,
                            camera_images=camera_images, progress=not no_progress)
    manifest = export_tile(tile, out, options, bounds_crs=bounds, device=device, memory_budget_bytes=budget.bytes,
                           memory_budget_source=budget.source)
    print(json.dumps({"out": str(out), "files": manifest["files"], "counts": manifest["counts"],
                      "timings_s": manifest["timings_s"], "survey_check": manifest.get("survey_check")}, indent=2))


def bake_envelope(tile: tyro.conf.Positional[Path], glb: Path | None = None, force: bool = False,
                  device: Literal["cpu", "cuda"] = "cpu", shell: Literal["inner", "outer"] = "inner") -> None:
    """Bake every trained block's envelope (outer and inner shell meshes with the field's colours,
    citygen.render.envelope) into its run folder, for the viewer to fly over and the narrow-band
    renderer, and the viewer's display levels of detail (the inner shell, decimated); blocks whose
    envelope is newer than their checkpoint are reused.  With --glb, also write each block's coloured shell as
    OUT/<block id>.glb (glTF binary, y-up, the CRS, its WKT and the local origin in the scene's
    extras).

    Args:
        tile: the tile folder (plan.json + block checkpoints) or a training run folder.
        glb: folder for the glTF binary files.
        force: bake again even where a current envelope exists.
        device: cpu or cuda.
        shell: the shell written as glTF: inner (where the field turns opaque: the surface the
            viewer shows) or outer (bounds everything the field renders).
    """
    import json

    from .export.envelope import bake_tile_envelopes

    if glb is not None:
        check_out_dir(glb, "--glb")
    report = bake_tile_envelopes(tile, glb, force=force, device=device, shell=shell,
                                 log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report, indent=2))


def edit(tile: tyro.conf.Positional[Path],
         action: tyro.conf.Positional[Literal["add", "list", "undo", "redo", "enable", "disable", "bake"]],
         op: str | None = None, classes: Annotated[str | None, tyro.conf.arg(name="class")] = None,
         polygon: Path | None = None, polygon_crs: str = "tile", box: str | None = None, height: str | None = None,
         instance: str | None = None, invert: bool = False, dz: float | None = None, factor: float | None = None,
         color: str | None = None, hsv: str | None = None, offset: str | None = None, rotate: float = 0.0,
         pivot: str | None = None, asset: str | None = None, source_box: str | None = None,
         anchor: str | None = None, anchor_local: bool = False, no_fill: bool = False, params: str | None = None,
         edit_id: Annotated[str | None, tyro.conf.arg(name="id")] = None, out: Path | None = None,
         steps: int = 500) -> None:
    """Edit a tile non-destructively: its edit stack (TILE/edits.json) is applied by every
    renderer at render time.  Actions: add (an edit: --op and a selection), list, undo, redo,
    enable/disable --id ID, bake --out NEWTILE (a new tile with the edits folded into the weights).
    Selection flags combine by intersection.

    Args:
        tile: the tile folder (or a single training run folder).
        action: add, list, undo, redo, enable, disable or bake.
        op: remove, recolor, raise, scale_height, move, duplicate, insert or lower.
        classes: select semantic class(es), comma-separated (ground, road, building, vegetation, water, vehicle, other).
        polygon: select inside a GeoJSON (Multi)Polygon file (vertical prism).
        polygon_crs: the polygon's coordinates: tile (the tile's projected CRS), lonlat, or local.
        box: select inside a local-frame box X0,Y0,Z0,X1,Y1,Z1 (metres).
        height: select heights H0,H1 above the ground (metres).
        instance: select the connected object of --class under local point X,Y (a click).
        invert: select the complement.
        dz: raise: metres up (negative: down); lower: metres down.
        factor: scale_height: height factor.
        color: recolor: target colour R,G,B in [0, 1] (keeps shading).
        hsv: recolor: HUE_DEG,SATURATION_SCALE,VALUE_SCALE.
        offset: move/duplicate: DX,DY,DZ metres.
        rotate: move/duplicate/insert: rotation about the vertical, degrees.
        pivot: move/duplicate: rotation centre X,Y (local).
        asset: insert: checkpoint path inside the tile folder.
        source_box: insert: region of the asset X0,Y0,Z0,X1,Y1,Z1 (asset frame).
        anchor: insert: where the asset's anchor goes, E,N,H in the tile's CRS (or local with --anchor-local).
        anchor_local: insert: --anchor is in the local frame.
        no_fill: remove/move: do not fill the revealed ground.
        params: extra operation parameters as a JSON object.
        edit_id: add: the new edit's id; enable/disable: which edit.
        out: bake: the new tile's folder.
        steps: bake: distillation steps per block.
    """
    import json

    from .edit.commands import EditFlags, run_edit

    # the operations' own parameters (--dz, --factor, ...) are checked by the edit stack, which
    # owns their ranges and names the flag in its error
    check_values([("--steps", steps, AT_LEAST_ONE)])
    if action == "bake" and out is not None:
        check_out_dir(out, "--out")
    flags = EditFlags(op=op, classes=classes, polygon=polygon, polygon_crs=polygon_crs, box=box, height=height,
                      instance=instance, invert=invert, dz=dz, factor=factor, color=color, hsv=hsv, offset=offset,
                      rotate=rotate, pivot=pivot, asset=asset, source_box=source_box, anchor=anchor,
                      anchor_local=anchor_local, no_fill=no_fill, params=params)
    print(json.dumps(run_edit(tile, action, flags, edit_id=edit_id, out=out, steps=steps), indent=2))


def style(tile: tyro.conf.Positional[Path], reference: Path | None = None, named: str | None = None,
          labels: Path | None = None, classes: str | None = None, method: Literal["stats", "optimize"] = "stats",
          weights: Path | None = None, steps: int = 200, device: str = "cpu") -> None:
    """Restyle a tile from a reference image or a named style (sunset, dawn, noon, night,
    winter, autumn, overcast, sepia, grayscale).  The style is added to the tile's edit
    stack as a restyle edit (undo with `citygen edit TILE undo`); it acts on the 3-D field,
    per semantic class, so all views agree.

    Args:
        tile: the tile folder (or a single training run folder).
        reference: reference image (JPEG/PNG).
        named: a named style instead of a reference.
        labels: class-id label map of the reference (uint8 PNG, 255 = none) for per-class statistics.
        classes: restyle only these classes, comma-separated.
        method: stats (per-class colour statistics, Monge-Kantorovich in Lab) or optimize
            (fine-tune each block's colour network with a style loss).
        weights: optimize: VGG16 conv weights (safetensors, torchvision key layout) for the
            Gram loss; without it, fixed random features (weights-free).
        steps: optimize: steps per block.
        device: cpu or cuda.
    """
    import json

    from .style.apply import add_style

    check_values([("--steps", steps, AT_LEAST_ONE)])
    edit_ = add_style(tile, named=named, reference=reference, labels=labels,
                      classes=[c.strip() for c in classes.split(",")] if classes else None, method=method,
                      weights=weights, steps=steps, device=device)
    print(json.dumps({"added": edit_["id"], "method": edit_["params"]["method"],
                      "report": edit_["params"].get("report")}, indent=2))


# Subcommand name -> function. Each function's docstring is its help text.
def sharpen(run: tyro.conf.Positional[Path], out: Path, steps: int = 1500, alpha_entropy_weight: float = 0.02,
            distortion_weight: float | None = None, data: Path | None = None, threads: int | None = None,
            no_eval: bool = False, no_progress: bool = False, lpips_weights: Path | None = None,
            lr_final: float = 1.0, blocks: str | None = None) -> None:
    """Fine-tune a trained block so that its surfaces are opaque (fewer field samples per pixel
    for the real-time renderer): continues from RUN's last checkpoint into the new run folder OUT
    with a per-sample opacity-entropy loss, then evaluates the held-out views.  RUN may be a tile
    folder (citygen train-tile, citygen demo): every trained block (or --blocks) is sharpened into
    the tile folder OUT, which opens like the source; blocks already sharpened in OUT are skipped.

    Args:
        run: the trained run folder (or a checkpoint), or a tile folder.
        out: the new run folder (a tile: the new tile folder).
        blocks: a tile's block ids to sharpen, comma-separated (default: all trained blocks).
        steps: fine-tune steps (1500 at weight 0.02: DESIGN.md "Towards 1.5 samples per pixel, session 7").
        alpha_entropy_weight: weight of the per-sample opacity entropy.
        distortion_weight: replaces the run's distortion-loss weight when given.
        data: the survey (default: the one the run trained on).
        threads: CPU threads (default: the run's).
        no_eval: skip the held-out evaluation at the end.
        no_progress: no progress bar.
        lpips_weights: LPIPS weights for the evaluation (default: $CITYGEN_LPIPS_WEIGHTS).
        lr_final: the learning rate at the end as a fraction of the run's final one (half a
            cosine down to it; 1: constant, the default: DESIGN.md "Towards 1.5 samples per pixel").
    """
    import json

    from .nets.lpips import resolve_lpips_weights
    from .store.layout import PLAN_FILE
    from .train.sharpen import sharpen_block, sharpen_tile

    check_out_dir(out, "--out")
    options = dict(steps=steps, alpha_entropy_weight=alpha_entropy_weight, distortion_weight=distortion_weight,
                   data=data, threads=threads, evaluate_at_end=not no_eval, progress=not no_progress,
                   lr_final=lr_final)
    if (run / PLAN_FILE).is_file():
        ids = [b.strip() for b in blocks.split(",") if b.strip()] if blocks is not None else None
        if ids is not None and not ids:
            raise CitygenError(None, "sharpen: --blocks names no block")
        tiled = sharpen_tile(run, out, blocks=ids, **options,
                             lpips_weights=None if no_eval else resolve_lpips_weights(lpips_weights))
        print(json.dumps({"out": str(tiled.out), "skipped": tiled.skipped,
                          "sharpened": {b: {"checkpoint": str(r.checkpoint), "from_step": r.start_step, "step": r.step,
                                            "seconds": round(r.seconds, 2), "eval": r.eval["mean"] if r.eval else None}
                                        for b, r in tiled.sharpened.items()}}, indent=2))
        return
    if blocks is not None:
        raise CitygenError(run, "sharpen: --blocks needs a tile folder (with plan.json)")
    result = sharpen_block(run, out, **options,
                           lpips_weights=None if no_eval else resolve_lpips_weights(lpips_weights))
    print(json.dumps({"out": str(result.out), "checkpoint": str(result.checkpoint), "from_step": result.start_step,
                      "step": result.step, "seconds": round(result.seconds, 2),
                      "eval": result.eval["mean"] if result.eval else None}, indent=2))


COMMANDS: dict[str, Callable[..., None]] = {
    "synth": synth,
    "demo": demo,
    "ingest": ingest,
    "triangulate": triangulate,
    "status": status,
    "bench": bench,
    "plan": plan,
    "train": train,
    "train-tile": train_tile,
    "sharpen": sharpen,
    "render": render,
    "view": view,
    "export": export,
    "bake-envelope": bake_envelope,
    "edit": edit,
    "style": style,
}


def entrypoint(argv: list[str] | None = None) -> int:
    try:
        tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="citygen", args=argv,
                                             description="citygen: city-scale neural reconstruction")
    except (SurveyError, CitygenError) as err:
        print(f"citygen: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if err.filename is None:       # not about a path the user gave: a bug, keep the traceback
            raise
        print(f"citygen: error: {os_error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("citygen: interrupted", file=sys.stderr)
        return 130
    return 0


def main() -> None:
    sys.exit(entrypoint())


if __name__ == "__main__":
    main()
