"""A whole tile: open it for rendering (as trained or as edited), and train it (one block
task per block of ``TILE/plan.json``, run by an executor).

Where a tile's files are (``plan.json``, ``tile_config.json``, ``block_<id>/`` run folders,
``edits.json``, locks) is :mod:`citygen.store.layout`'s, the one owner of the layout and its
version; this module writes ``tile_config.json`` through it (what train_tile resolved: the
training config, the survey path, each block's field box; written before any block starts).

Each block's field covers the plan's box for it (the extended rectangle times the block's
height range), tightened vertically:

* when the survey has depth maps (the synthetic city, lidar-backed surveys), to the heights
  its images actually see inside the extended rectangle (0.5 / 99.5 percentiles of the
  back-projected depth pixels, padded by 10 % of that range plus 2 m) -- the plan's range is
  a generous guess (ground - 20 m to ground + 250 m), and the hash grid's vertical
  resolution and the start-up fog both scale with the box;
* without depth maps, when the survey has an SfM model (``sparse/0`` beside transforms.json,
  as ``citygen ingest`` or ``citygen triangulate`` write it), to the heights of its points
  inside the extended rectangle (the evaluation tenth and poorly triangulated points left out,
  see :func:`citygen.partition.ground.load_box_points`): from their 0.5 percentile up to the
  highest of them, same padding (:func:`citygen.train.data.point_heights`: SfM finds few
  features on flat roofs, and the 99.5 percentile cut the failure survey's 49 m roofs by
  12-43 m), the floor kept a margin below the plan's ground where the plan's ground came from
  data -- on a real survey the camera-derived guess sat 5 m off and a 270 m tall box wasted
  most of its cells on air.  A survey with neither depth maps nor points gets them from the
  coarse pass: ``citygen train-tile`` (like ``train`` and ``plan``) runs ``citygen triangulate``
  on it once, kept in the survey's folder (``--no-coarse-pass`` skips it);
* neither (``--no-coarse-pass``, a pass that failed, or fewer than 16 points in the block):
  the plan's range cut to the one-block
  trainer's guess, ``[g - 0.1 h, g + 0.6 h]`` over the plan's ground ``g`` with ``h`` the
  lowest camera's height above it (:func:`citygen.train.data.flight_heights`): the plan's
  range alone ran up to just under the lenses (a 168 m tall box under a 150 m flight), where
  each block grew floaters in front of every camera;
* always, below the lowest camera that trains the block.  Surveys fly above everything they
  photograph, so nothing is lost, and a box that contained the cameras would spend its hash
  cells and samples on the air around them (and invite floaters in front of the lenses).

**Rays are attributed, not clipped.**  Oblique views see far beyond a block's box; trained on
every pixel of its images, a block would have to explain its neighbours' roofs and the horizon
with haze inside its own box (a 2x2 tile of a survey whose blocks are mostly fields fell from
24 dB to 15 dB held-out that way).  So each pixel trains only the blocks that own what it
shows (:func:`attribute_image`): its ray's surface point -- from the image's depth map, else
a heightfield of the survey's SfM points (``sparse/0``), else the plan's ground (its GeoTIFF,
or its plane) -- decides, and the pixel trains every block whose *extended* rectangle holds
that point (both blocks in an overlap, which the compositor blends).  With ``split_overlaps``
(:func:`train_tile`, ``citygen train-tile --overlap split``; not the default) an overlap pixel
instead trains *one* of the blocks that hold it
(:func:`split_overlaps`): block ``b`` with probability ``w_b / sum w``, ``w`` the compositor's
blend weights at the point (:func:`citygen.render.tile.blend_weights`, the one ramp), drawn
once at attribution time with a seed per image (its name's CRC-32), so the masks, ``pixels.npz``
and the samplers are as before; the blocks' survey shares then sum to 1 instead of 1.36
(failure-like 2x2 tile), and with :func:`block_batch` every pixel gets the one-block trainer's
batch and steps.  Measured on that tile it did not close the gap to one block
(held-out 23.7 / 25.2 dB over two seeds of the weakest block, 25.0 / 25.4 dB without the split;
elsewhere in the views within 0.2 dB, at the seams 0.0-0.3 dB lower; the tiny city with depth
maps gained 0.4-0.7 dB); with the coarse pass's points (boxes and attribution from them) it gained
0.6 / 0.9 dB over both on two seeds at equal rays, 0.1 dB under one block on average.  With a
small step's fixed costs cut (a kept hash-table gradient buffer,
:meth:`citygen.train.optim.HashGridAdam.keep_grad_buffers`, and the occupancy refreshes counted
per ray, :func:`block_config`) its quarter batches still cost 1.19x per ray what "both"'s
third batches do, and at equal CPU time it did not win: failure tile 26.54 / 26.37 dB against
both's 26.12 / 26.95 dB (seeds 0 / 1), the demo 25.5 dB against 25.8 even at equal steps
(DESIGN.md).  So it stays an option; a resumed tile keeps the rule it started with
(:func:`overlap_rule`).  A pixel no block holds
(sky, above the horizon, or ground beyond the tile) trains exactly one block: the one whose
learned background the compositor shows for that ray (:func:`citygen.render.tile.background_owner`,
the block whose core is nearest to where the ray leaves the tile's box, or that the camera
sits over), so the renderer needs no change.  The masks go to each block's run folder
(``pixels.npz``, one bit per pixel at the training resolution) and the block's
:class:`~citygen.train.data.RayDataset` draws only from them (uniform and error-map sampling
alike); images with less than ``MIN_IMAGE_SHARE`` of their pixels in a block leave its
training set.  ``tile_config.json`` records per block the share of its images' pixels it
trains on (``pixel_share``) and the surface source (``attribution``), and for the tile
``"overlap"``: ``"both"`` or ``"split"`` (records without it: both).  ``citygen train`` (one
block) is unchanged: every pixel.

**A block spends its rays in more, smaller steps** (:func:`block_batch`).  Training is limited by
the number of optimizer steps, not by rays: on ``citygen synth --preset failure`` a block of a
2x2 tile learned per step no faster than one block over the whole survey (train PSNR 18.4-19.7 dB
vs 18.75 at step 400), although each of its pixels got three times the rays, so four blocks of
400 steps ended where one block is after ~500 steps -- 3.5 dB and metres of DSM short of one
block of 1600 (the built patch's streets under a haze at roof height), everywhere in the views,
not at the seams nor in background pixels (the failure survey's held-out views have none).
Higher learning rates did not help (x1.73 and x4 on one block: +0.4 / +0.2 dB on its part of
the views, its DSM no better); the same rays in three times the steps did (+2.8 dB there, its
DSM median error 24.8 -> 9.0 m); the whole tile with this rule: 22.6 -> 25.0 dB held-out, DSM
median error 7.9 -> 1.7 m (one block of 1600 steps: 26.0 dB, 1.4 m; see DESIGN.md).  So a block that trains on ``share`` of the survey's training
pixels (``survey_share`` in ``tile_config.json``, overlaps counted in both blocks unless split) draws
``rays_per_batch * share`` rays a step -- per pixel what one block over the survey draws --
over ``steps / share`` steps: the same rays as ``steps`` steps of the full batch, so the same
compute (``steps`` keeps meaning the rays a block may spend), and per pixel the one-block
trainer's batch and step count; its occupancy grid is refreshed on the preset's period in its
own steps, so more often per ray (scaling the period by the batch ratio cost a drone tile 0.6-1
dB, DESIGN.md).  The batch stays
at least ``MIN_BATCH_FRACTION`` of the preset's (at most 4x the steps: a step has costs beyond
its rays, chiefly the dense Adam update of the hash tables, ~25 % of a 256-ray tiny step), then
scaled by the preset's ``tile_batch_scale``: ``drone`` quarters it again and starts its blocks'
grids at ``tile_base_resolution`` 4 (base 4 thinned a ring of too-high surfaces past the
failure-like survey's flight edge; the quarter took that 2x2 tile from 26.48 to 26.98 dB held out
over five seeds, against one block's 26.72, at ~1.6x the tile's CPU time; DESIGN.md, sessions 10
and 11); ``tiny`` (the demo) keeps 1 and its base.  A block over the whole survey (a 1x1 tile) trains
as configured, and ``citygen train`` (one block) is unchanged.

Training is resumable: calling :func:`train_tile` again skips finished blocks and resumes
the others from their last checkpoints (see :func:`citygen.distributed.run_tile`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from survey_io.atomic import atomic_write_json

from .cameras import world_rays
from .config import TrainConfig, apply_overrides, from_dict, load_config, to_dict
from .distributed import (
    BlockTask,
    Executor,
    LocalExecutor,
    RayExecutor,
    TileResult,
    run_tile,
)
from .edit.tile import tile_field_wrapper
from .errors import CitygenError
from .images import load_depth
from .partition import Block, PartitionConfig, TilePlan
from .partition.ground import GroundModel, ground_is_known, load_box_points
from .render.tile import TileRenderer, background_owner, blend_weights
from .store.layout import (
    PIXELS_FILE,
    PLAN_FILE,
    TILE_CONFIG_FILE,
    block_dir,
    read_tile_config,
    stack_path,
    upgraded_tile_config,
)
from .train.block_job import JOB
from .train.data import (
    CAMERA_CLEARANCE_M,
    MIN_HEIGHT_POINTS,
    depth_points,
    flight_heights,
    load_survey,
    padded_heights,
    point_heights,
    robust_heights,
    select_images,
    write_pixel_masks,
)

#: an SfM-derived floor stays at least this far below the plan's ground (when the plan's ground is known).
GROUND_MARGIN_M = 2.0
#: an image trains a block only when at least this share of its pixels is attributed to the block
#: (a sliver trains little, and its appearance code could serve a test view by the nearest-camera rule).
MIN_IMAGE_SHARE = 0.01
#: cell of the heightfield built from SfM points for attribution (metres).
ATTRIBUTION_CELL_M = 10.0
#: a block's batch is at least this fraction of the configured one (:func:`block_batch`).
MIN_BATCH_FRACTION = 0.25


def open_tile(tile_dir: str | Path, *, edited: bool = True, device: str | Any = "cpu",
              max_cached_blocks: int = 8) -> TileRenderer:
    """A renderer over a tile folder (or a single training run folder): its blocks as trained,
    wrapped by the tile's edit stack (``edits.json``) when ``edited`` and the tile has one.

    The renderer receives the fields; opening them as edited is the edit layer's
    (:func:`citygen.edit.tile_field_wrapper`), which is why this lives above both.
    """
    renderer = TileRenderer.open_trained(tile_dir, device=device, max_cached_blocks=max_cached_blocks)
    if edited and stack_path(tile_dir).is_file():
        renderer.field_wrapper = tile_field_wrapper(tile_dir)
    return renderer


def resolve_config(config: TrainConfig | dict | str | Path = "tiny", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A training config from a preset name / YAML path (+ dotted overrides), a dict, or a config;
    overrides go through :func:`citygen.config.apply_overrides` (checked) in every case."""
    if isinstance(config, TrainConfig):
        return apply_overrides(from_dict(to_dict(config)), overrides)
    if isinstance(config, dict):
        return apply_overrides(from_dict(config), overrides)
    return load_config(config, overrides)


def observed_heights(survey, images, rect: tuple[float, float, float, float],
                     stride: int = 8) -> tuple[float, float] | None:
    """Robust (0.5 / 99.5 percentile) height range of the depth-map points of ``images`` that
    fall inside the horizontal rectangle ``rect``; None without depth maps (or points)."""
    if not images or any(im.depth is None for im in images):
        return None
    zs = []
    for im in images:
        pts = depth_points(survey, im, stride)
        inside = (pts[:, 0] >= rect[0]) & (pts[:, 0] <= rect[2]) & (pts[:, 1] >= rect[1]) & (pts[:, 1] <= rect[3])
        zs.append(pts[inside, 2])
    return robust_heights(np.concatenate(zs))


def field_box(block: Block, camera_heights: Sequence[float],
              seen_heights: tuple[float, float] | None = None,
              ground_floor: float | None = None) -> np.ndarray:
    """The (2, 3) box a block's field covers: the plan's box, tightened to the heights the
    images see (when known), its floor at most ``ground_floor`` (when given, inside the plan's
    box) and lowered below the cameras (see the module docstring)."""
    lo, hi = (np.asarray(v, dtype=np.float64) for v in block.aabb)
    if seen_heights is not None:
        z0, z1 = padded_heights(seen_heights)
        plan_lo = lo[2]
        lo[2], hi[2] = max(lo[2], z0), min(hi[2], z1)
        if ground_floor is not None:  # never cut the ground off (the points may miss it, e.g. under trees)
            lo[2] = max(plan_lo, min(lo[2], ground_floor))
    if len(camera_heights):
        top = float(min(camera_heights)) - CAMERA_CLEARANCE_M
        if top > lo[2] + 1.0:  # never invert the box (a plan whose cameras sit below its ground)
            hi[2] = min(hi[2], top)
    if not hi[2] > lo[2]:
        lo[2], hi[2] = block.z_range
    return np.stack([lo, hi])


def attribution_ground(survey, plan: TilePlan) -> tuple[GroundModel, str]:
    """The surface that attributes the pixels of a survey without depth maps, and its name: a
    heightfield of its SfM points (``sparse/0``, see :func:`load_box_points`), else the plan's
    ground (:meth:`GroundModel.from_record`)."""
    points = load_box_points(survey.root)
    if points is not None and len(points) >= MIN_HEIGHT_POINTS:
        return GroundModel.from_points(points, ATTRIBUTION_CELL_M, source="sfm points"), "sfm-points"
    return GroundModel.from_record(plan.ground, plan.georef), "plan ground"


def attribute_image(camera, c2w: np.ndarray, depth: np.ndarray | None, ground: GroundModel | None,
                    extended: np.ndarray, cores: np.ndarray, bounds: np.ndarray,
                    seed: int | None = None) -> np.ndarray:
    """Which blocks each pixel of one image trains (see the module docstring).

    Args:
        camera: the image's camera at the training resolution.
        c2w: its (4, 4) camera-to-world.
        depth: (H, W) z-depth at that resolution (0: nothing there), or None to use ``ground``.
        ground: the surface for images without depth.
        extended, cores: (B, 4) the blocks' extended and core rectangles (x0, y0, x1, y1).
        bounds: (2, 3) the tile's box (the union of the blocks' field boxes).
        seed: split each overlap pixel to one of the blocks that hold its point, drawn with
            this seed by the compositor's blend weights there (:func:`split_overlaps`); None:
            the pixel trains every block that holds its point.

    Returns:
        (H, W, B) bool: pixel (row, col) trains block b.
    """
    h, w = camera.height, camera.width
    v, u = np.mgrid[0:h, 0:w]
    o, d, z_scale = world_rays(camera, c2w, u.reshape(-1) + 0.5, v.reshape(-1) + 0.5)
    if depth is not None:
        z = np.asarray(depth, dtype=np.float64).reshape(-1)
        hit = z > 0
        pts = o + d * (z / z_scale)[:, None]
    else:
        x0, y0 = bounds[0, :2]
        x1, y1 = bounds[1, :2]
        cx, cy = c2w[0, 3], c2w[1, 3]
        # beyond the farthest tile corner a clipped ray's end lies outside every block anyway
        reach = float(np.hypot(max(abs(cx - x0), abs(cx - x1)), max(abs(cy - y0), abs(cy - y1)))) + 1.0
        pts, hit = ground.intersect(o, d, reach)
    ext = np.asarray(extended, dtype=np.float64)
    inside = hit[:, None] & (pts[:, None, 0] >= ext[None, :, 0]) & (pts[:, None, 0] <= ext[None, :, 2]) \
        & (pts[:, None, 1] >= ext[None, :, 1]) & (pts[:, None, 1] <= ext[None, :, 3])
    if seed is not None:
        inside = split_overlaps(inside, pts, extended, cores, np.random.default_rng(seed))
    lost = np.flatnonzero(~inside.any(axis=1))
    if lost.size:
        owner = background_owner(torch.from_numpy(o[lost]).float(), torch.from_numpy(d[lost]).float(), bounds,
                                 torch.as_tensor(np.asarray(cores), dtype=torch.float32)).numpy()
        inside[lost, owner] = True
    return inside.reshape(h, w, len(ext))


def split_overlaps(held: np.ndarray, points: np.ndarray, extended: np.ndarray, cores: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """``held`` (N, B: block b's extended rectangle holds pixel n's surface point) with each
    pixel held by several blocks given to one of them, block b with probability ``w_b / sum w``
    over the holders, ``w`` the compositor's blend weights at the point
    (:func:`citygen.render.tile.blend_weights`, the one ramp): every pixel then trains once
    (the blocks' survey shares sum to 1), and a block learns the overlap at the density the
    compositor shows it (see the module docstring).  Holders whose weights all vanish (a point
    on the outer edges of both margins) share the pixel evenly."""
    many = np.flatnonzero(held.sum(axis=1) > 1)
    if not many.size:
        return held
    ext = np.asarray(extended, dtype=np.float64)
    # the attribution is horizontal (rectangles), so the field boxes' height plays no part
    boxes = np.stack([np.column_stack([ext[:, :2], np.full(len(ext), -np.inf)]),
                      np.column_stack([ext[:, 2:], np.full(len(ext), np.inf)])], axis=1)
    w = blend_weights(torch.from_numpy(np.asarray(points, dtype=np.float64)[many]),
                      torch.from_numpy(np.asarray(cores, dtype=np.float64)), torch.from_numpy(ext),
                      torch.from_numpy(boxes)).numpy() * held[many]
    w = np.where(w.sum(axis=1, keepdims=True) > 0, w, held[many].astype(np.float64))
    cdf = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
    pick = np.minimum((rng.random(len(many))[:, None] >= cdf).sum(axis=1), len(ext) - 1)
    pick = np.where(held[many, pick], pick, np.argmax(w, axis=1))  # rounding at the top of the cdf
    out = held.copy()
    out[many] = False
    out[many, pick] = True
    return out


def block_batch(rays_per_batch: int, steps: int, survey_share: float, scale: float = 1.0) -> tuple[int, int]:
    """(rays per step, steps) of a tile block that trains on ``survey_share`` of the survey's
    training pixels, given the configured ``rays_per_batch`` and ``steps``: the batch scaled by
    the share (between ``MIN_BATCH_FRACTION`` and 1) and, for a block short of the whole survey,
    by ``scale`` (``tile_batch_scale``), the steps raised to spend the same rays (see the module
    docstring)."""
    if not 0 < survey_share < 1:
        return rays_per_batch, steps  # a whole-survey block (or nothing attributed) trains as configured
    fraction = max(MIN_BATCH_FRACTION, survey_share) * scale
    rays = max(1, round(rays_per_batch * fraction))
    return rays, max(1, round(steps * rays_per_batch / rays))


def block_config(cfg: TrainConfig, survey_share: float) -> TrainConfig:
    """``cfg`` with a tile block's batch and steps (:func:`block_batch`) and, for a block short of
    the whole survey, ``tile_base_resolution`` as its grid's base resolution (a copy)."""
    out = from_dict(to_dict(cfg))
    out.rays_per_batch, out.steps = block_batch(cfg.rays_per_batch, cfg.steps, survey_share, cfg.tile_batch_scale)
    if cfg.tile_base_resolution and 0 < survey_share < 1:
        # drone, failure-like 2x2 tile: base 4 (182 m cells) thinned the ring of too-high surfaces
        # past the flight's edge that blocks of base 16 grow and one block does not (DESIGN.md,
        # session 10); one block at base 4 lost 0.85 dB, so it is for tile blocks only
        out.field.base_resolution = cfg.tile_base_resolution
    # the occupancy grid keeps the preset's period and warm-up in steps, so a block of 1/share
    # smaller steps refreshes it 1/share times as often per ray: refreshed only as often per ray
    # (every 61 quarter-sized steps), the failure-like tile fell from 26.12 to 25.52 dB held-out
    # (drone, seed 1), at ~3 % of a quarter step's time saved (DESIGN.md, "Where the tile still
    # trails one block, session 9")
    return out


def make_executor(executor: str | Executor = "local", *, max_parallel: int | None = None,
                  ray_address: str | None = None, max_retries: int = 2) -> Executor:
    """``"local"`` -> :class:`LocalExecutor`, ``"ray"`` -> :class:`RayExecutor`, or the given executor."""
    if not isinstance(executor, str):
        return executor
    if executor == "local":
        return LocalExecutor(max_parallel=max_parallel, max_retries=max_retries)
    if executor == "ray":
        return RayExecutor(address=ray_address, max_retries=max_retries)
    raise CitygenError(None, f"unknown executor {executor!r} (known: local, ray)")


def tile_tasks(tile_dir: str | Path, data: str | Path, cfg: TrainConfig,
               blocks: Sequence[str] | None = None,
               coarse_pass: Callable[[], object] | None = None,
               split_overlaps: bool = False) -> tuple[list[BlockTask], dict[str, Any]]:
    """The block tasks of a tile and the tile config record (see the module docstring).

    ``coarse_pass`` (``citygen train-tile``'s, see :func:`citygen.cli.train_tile`) runs once the
    plan and the survey are known to match, before the survey's points are read: a tile planned
    on another survey stays a one-line error, not one after a minute of triangulation.

    Blocks without training images are left out (listed under ``"skipped"`` in the record):
    there is nothing to train them on, and the renderer treats them as empty.
    """
    tile_dir = Path(tile_dir)
    plan = TilePlan.load(tile_dir / PLAN_FILE)
    data = Path(data).resolve()
    survey = load_survey(data)
    by_name = {im.name: im for im in survey.images}
    chosen = [b for b in plan.blocks if blocks is None or b.id in blocks]
    if blocks is not None:
        unknown = sorted(set(blocks) - {b.id for b in plan.blocks})
        if unknown:
            raise CitygenError(tile_dir / PLAN_FILE, f"no blocks {unknown} in the plan")
    for b in plan.blocks:
        missing = [n for n in b.images if n not in by_name]
        if missing:
            raise CitygenError(data, f"block {b.id}: the plan's images {missing[:3]} are not in this survey "
                                     "(was the tile planned on another survey?)")
    if coarse_pass is not None:
        coarse_pass()
    tasks, record_blocks, skipped = [], {}, []
    # SfM points only where depth maps are missing: depth stays the first source
    has_depth = all(im.depth is not None for im in survey.images)
    sfm = None if has_depth else load_box_points(survey.root)
    z_below = float(plan.config.get("z_below_ground_m", PartitionConfig.z_below_ground_m))
    test = set(survey.test_names)
    chosen_ids = {b.id for b in chosen}
    # every block with training images is rendered, so the tile's box (where a ray's background
    # block is decided) spans all of them, also when training only some
    active = []
    for b in plan.blocks:
        names = [n for n in b.images if n not in test]
        if not names:
            if b.id in chosen_ids:
                skipped.append(b.id)
            continue
        images = [by_name[n] for n in names]
        seen, source, floor = observed_heights(survey, images, b.extended), "depth", None
        if seen is None and sfm is not None:
            seen, source = point_heights(sfm, b.extended), "sfm-points"
            if ground_is_known(plan.ground):  # the plan's z range starts z_below under its ground estimate
                floor = b.z_range[0] + z_below - GROUND_MARGIN_M
        box = field_box(b, [im.c2w[2, 3] for im in images], seen, ground_floor=floor)
        if seen is None:  # the one-block trainer's rule (scene_box), inside the plan's range
            source = "plan"
            z0, z1 = flight_heights(b.z_range[0] + z_below, min(im.c2w[2, 3] for im in images))
            if z1 > z0:
                box[0, 2], box[1, 2] = max(box[0, 2], z0), min(box[1, 2], z1)
        active.append((b, names, box, source))
    shares = _attribute(survey, plan, cfg, active, [b.id for b in chosen], tile_dir, split_overlaps)
    for b, names, box, source in active:
        if b.id not in chosen_ids:
            continue
        kept, share, survey_share, attribution = shares[b.id]
        block_cfg = block_config(cfg, survey_share)
        kwargs = {"config": to_dict(block_cfg), "data": str(data), "image_names": kept,
                  "aabb": box.tolist(),
                  "pixels": str(block_dir(tile_dir, b.id) / PIXELS_FILE)}
        tasks.append(BlockTask(b.id, str(block_dir(tile_dir, b.id)), JOB, kwargs))
        record_blocks[b.id] = {"dir": block_dir(tile_dir, b.id).name, "aabb": box.tolist(), "n_images": len(kept),
                               "box_source": source, "pixel_share": round(share, 4),
                               "survey_share": round(survey_share, 4), "rays_per_batch": block_cfg.rays_per_batch,
                               "steps": block_cfg.steps, "attribution": attribution,
                               "images_left_out": len(names) - len(kept)}
    record = {"kind": "citygen.tile_config", "version": 1, "data": str(data), "train": to_dict(cfg),
              "blocks": record_blocks, "skipped": skipped,
              "overlap": "split" if split_overlaps else "both"}
    return tasks, record


def _attribute(survey, plan: TilePlan, cfg: TrainConfig, active: list, chosen: list[str],
               tile_dir: Path, split: bool = False) -> dict[str, tuple[list[str], float, float, str]]:
    """Attribute the pixels of the chosen blocks' images (:func:`attribute_image`) and write each
    chosen block's masks (``PIXELS_FILE``); per block: the images kept, the share of their pixels
    it trains on, its share of all the survey's training pixels, and the surface source."""
    if not active:
        return {}
    by_name = {im.name: im for im in survey.images}
    extended = np.array([b.extended for b, *_ in active], dtype=np.float64)
    cores = np.array([b.core for b, *_ in active], dtype=np.float64)
    boxes = np.stack([box for *_, box, _ in active])
    bounds = np.stack([boxes[:, 0].min(0), boxes[:, 1].max(0)])
    has_depth = all(im.depth is not None for im in survey.images)
    ground, attribution = (None, "depth") if has_depth else attribution_ground(survey, plan)
    column = {b.id: k for k, (b, *_) in enumerate(active)}
    wanted: dict[str, list[str]] = {}
    for b, names, *_ in active:
        if b.id in chosen:
            for n in names:
                wanted.setdefault(n, []).append(b.id)
    masks: dict[str, dict[str, tuple[np.ndarray, tuple[int, int]]]] = {bid: {} for bid in chosen}  # packed bits
    for name, bids in wanted.items():
        im = by_name[name]
        cam = survey.camera_of(im)
        if cfg.downscale > 1:
            cam = cam.scaled(1.0 / cfg.downscale)
        depth = load_depth(im.depth, (cam.width, cam.height)) if has_depth else None
        # one seed per image (its name): a split is the same in every run and on every machine
        seed = zlib.crc32(name.encode()) if split else None
        owned = attribute_image(cam, im.c2w, depth, ground, extended, cores, bounds, seed=seed)
        for bid in bids:
            masks[bid][name] = np.packbits(owned[..., column[bid]].reshape(-1)), owned.shape[:2]
    # every training image of the survey at the training resolution: what one block would train on
    survey_pixels = 0
    for im in select_images(survey, None):
        cam = survey.camera_of(im)
        if cfg.downscale > 1:
            cam = cam.scaled(1.0 / cfg.downscale)
        survey_pixels += cam.width * cam.height
    shares = {}
    for b, names, *_ in active:
        if b.id not in chosen:
            continue
        per = {n: np.unpackbits(bits, count=hw[0] * hw[1]).astype(bool).reshape(hw) for n, (bits, hw) in masks[b.id].items()}
        kept = [n for n in names if per[n].mean() >= MIN_IMAGE_SHARE]
        if not kept:  # keep the image that sees the most of the block rather than none
            kept = [max(names, key=lambda n: per[n].mean())]
        total = sum(per[n].size for n in kept)
        owned = sum(int(per[n].sum()) for n in kept)
        share = owned / max(total, 1)
        write_pixel_masks(block_dir(tile_dir, b.id) / PIXELS_FILE, kept, [per[n] for n in kept])
        shares[b.id] = (kept, share, owned / max(survey_pixels, 1), attribution)
    return shares


def overlap_rule(earlier: dict[str, Any] | None, split_overlaps: bool | None, where: Path | None = None) -> str:
    """``"split"`` or ``"both"``: the overlap rule a (new or resumed) tile trains with.

    ``earlier`` is the tile's ``tile_config.json`` (None or empty: a new tile), ``split_overlaps``
    what the caller asks (None: a resumed tile keeps its rule -- records written before the split
    existed, without ``"overlap"``, trained both -- and a new tile trains both: the split did not
    win at equal CPU time, see the module docstring).  A resumed block must
    keep the pixels it started on, so asking a resumed tile for the other rule raises
    :class:`CitygenError` (``where``: the record's path) before any mask is rewritten."""
    before = earlier.get("overlap", "both") if earlier else None
    if split_overlaps is None:
        return before or "both"
    overlap = "split" if split_overlaps else "both"
    if before is not None and before != overlap:
        raise CitygenError(where, f"the tile was trained with overlap pixels {before!r}, this run asks for {overlap!r}: "
                                  f"resume with --overlap {before} (or without --overlap), or train into a new folder")
    return overlap


def train_tile(tile_dir: str | Path, data: str | Path, config: TrainConfig | dict | str | Path = "tiny",
               executor: str | Executor = "local", *, overrides: dict[str, Any] | None = None,
               max_parallel: int | None = None, ray_address: str | None = None, max_retries: int = 2,
               blocks: Sequence[str] | None = None, coarse_pass: Callable[[], object] | None = None,
               split_overlaps: bool | None = None) -> TileResult:
    """Train every block of the tile planned in ``tile_dir/plan.json``.

    Args:
        tile_dir: the tile folder (holds ``plan.json``; gets ``block_<id>/`` folders).
        data: the survey's ``transforms.json`` the tile was planned on.
        config: a preset name or YAML path, a config dict, or a :class:`TrainConfig`.
        executor: ``"local"``, ``"ray"`` or any :class:`~citygen.distributed.Executor`.
        overrides: dotted config overrides, e.g. ``{"steps": 500}``.
        max_parallel: local executor: blocks at once (default: one per GPU, or 1 on CPU).
        ray_address: Ray executor: the cluster to join (default: a new local instance).
        max_retries: retries per block after a failed attempt.
        blocks: train only these block ids (default: all).
        coarse_pass: run before the survey's points are read (see :func:`tile_tasks`).
        split_overlaps: train each overlap pixel in one block drawn by the blend weights
            (:func:`split_overlaps`; True) or in every block that holds it (False); None: a
            resumed tile keeps the rule it started with (a record without one: both), a new
            tile trains both (see the module docstring).  Asking a resumed tile for the other rule
            is refused.

    Returns:
        the :class:`~citygen.distributed.TileResult` (call ``raise_for_failures()`` to insist).
    """
    tile_dir = Path(tile_dir)
    cfg = resolve_config(config, overrides)
    earlier = read_tile_config(tile_dir)
    overlap = overlap_rule(earlier, split_overlaps, tile_dir / TILE_CONFIG_FILE)
    # Per-block evaluation would score a block's field on whole views it covers only part of;
    # the tile is evaluated as a whole by `citygen render` (citygen.render.tile).
    cfg.eval_at_end = False
    tasks, record = tile_tasks(tile_dir, data, cfg, blocks, coarse_pass, overlap == "split")
    if not tasks:
        raise CitygenError(tile_dir / PLAN_FILE, "no block of the plan has training images")
    if earlier and blocks is not None:  # training a subset: keep the other blocks' entries
        record["blocks"] = {**earlier.get("blocks", {}), **record["blocks"]}
    # written in the current layout (a tile of an older layout is upgraded here)
    atomic_write_json(tile_dir / TILE_CONFIG_FILE, upgraded_tile_config(record))
    return run_tile(tasks, make_executor(executor, max_parallel=max_parallel, ray_address=ray_address,
                                         max_retries=max_retries), tile_dir)


__all__ = ["ATTRIBUTION_CELL_M", "CAMERA_CLEARANCE_M", "GROUND_MARGIN_M", "MIN_BATCH_FRACTION", "MIN_IMAGE_SHARE",
           "attribute_image", "block_batch", "block_config",
           "attribution_ground", "PLAN_FILE", "TILE_CONFIG_FILE", "block_dir", "field_box", "make_executor",
           "open_tile", "overlap_rule", "read_tile_config", "resolve_config", "split_overlaps", "tile_tasks", "train_tile"]
