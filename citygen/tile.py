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
  as ``citygen ingest`` writes it), to the heights of its points inside the extended rectangle
  (same percentiles and padding; the evaluation tenth and poorly triangulated points left out,
  see :func:`citygen.partition.ground.load_box_points`), the floor kept a margin below the
  plan's ground where the plan's ground came from data -- on a real survey the camera-derived
  guess sat 5 m off and a 270 m tall box wasted most of its cells on air;
* neither (or fewer than 16 points in the block): the plan's range;
* always, below the lowest camera that trains the block.  Surveys fly above everything they
  photograph, so nothing is lost, and a box that contained the cameras would spend its hash
  cells and samples on the air around them (and invite floaters in front of the lenses).

Training is resumable: calling :func:`train_tile` again skips finished blocks and resumes
the others from their last checkpoints (see :func:`citygen.distributed.run_tile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from survey_io.atomic import atomic_write_json

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
from .partition import Block, PartitionConfig, TilePlan
from .partition.ground import ground_is_known, load_box_points
from .render.tile import TileRenderer
from .store.layout import PLAN_FILE, TILE_CONFIG_FILE, block_dir, read_tile_config, stack_path, upgraded_tile_config
from .train.block_job import JOB
from .train.data import CAMERA_CLEARANCE_M, depth_points, load_survey, padded_heights, point_heights, robust_heights

#: an SfM-derived floor stays at least this far below the plan's ground (when the plan's ground is known).
GROUND_MARGIN_M = 2.0


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
               blocks: Sequence[str] | None = None) -> tuple[list[BlockTask], dict[str, Any]]:
    """The block tasks of a tile and the tile config record (see the module docstring).

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
    tasks, record_blocks, skipped = [], {}, []
    # SfM points only where depth maps are missing: depth stays the first source
    sfm = None if all(im.depth is not None for im in survey.images) else load_box_points(survey.root)
    z_below = float(plan.config.get("z_below_ground_m", PartitionConfig.z_below_ground_m))
    for b in chosen:
        missing = [n for n in b.images if n not in by_name]
        if missing:
            raise CitygenError(data, f"block {b.id}: the plan's images {missing[:3]} are not in this survey "
                                     "(was the tile planned on another survey?)")
        names = [n for n in b.images if n not in set(survey.test_names)]
        if not names:
            skipped.append(b.id)
            continue
        images = [by_name[n] for n in names]
        seen, source, floor = observed_heights(survey, images, b.extended), "depth", None
        if seen is None and sfm is not None:
            seen, source = point_heights(sfm, b.extended), "sfm-points"
            if ground_is_known(plan.ground):  # the plan's z range starts z_below under its ground estimate
                floor = b.z_range[0] + z_below - GROUND_MARGIN_M
        if seen is None:
            source = "plan"
        box = field_box(b, [im.c2w[2, 3] for im in images], seen, ground_floor=floor)
        kwargs = {"config": to_dict(cfg), "data": str(data), "image_names": names, "aabb": box.tolist()}
        tasks.append(BlockTask(b.id, str(block_dir(tile_dir, b.id)), JOB, kwargs))
        record_blocks[b.id] = {"dir": block_dir(tile_dir, b.id).name, "aabb": box.tolist(), "n_images": len(names),
                               "box_source": source}
    record = {"kind": "citygen.tile_config", "version": 1, "data": str(data), "train": to_dict(cfg),
              "blocks": record_blocks, "skipped": skipped}
    return tasks, record


def train_tile(tile_dir: str | Path, data: str | Path, config: TrainConfig | dict | str | Path = "tiny",
               executor: str | Executor = "local", *, overrides: dict[str, Any] | None = None,
               max_parallel: int | None = None, ray_address: str | None = None, max_retries: int = 2,
               blocks: Sequence[str] | None = None) -> TileResult:
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

    Returns:
        the :class:`~citygen.distributed.TileResult` (call ``raise_for_failures()`` to insist).
    """
    tile_dir = Path(tile_dir)
    cfg = resolve_config(config, overrides)
    # Per-block evaluation would score a block's field on whole views it covers only part of;
    # the tile is evaluated as a whole by `citygen render` (citygen.render.tile).
    cfg.eval_at_end = False
    tasks, record = tile_tasks(tile_dir, data, cfg, blocks)
    if not tasks:
        raise CitygenError(tile_dir / PLAN_FILE, "no block of the plan has training images")
    earlier = read_tile_config(tile_dir)
    if earlier and blocks is not None:  # training a subset: keep the other blocks' entries
        record["blocks"] = {**earlier.get("blocks", {}), **record["blocks"]}
    # written in the current layout (a tile of an older layout is upgraded here)
    atomic_write_json(tile_dir / TILE_CONFIG_FILE, upgraded_tile_config(record))
    return run_tile(tasks, make_executor(executor, max_parallel=max_parallel, ray_address=ray_address,
                                         max_retries=max_retries), tile_dir)


__all__ = ["CAMERA_CLEARANCE_M", "GROUND_MARGIN_M", "PLAN_FILE", "TILE_CONFIG_FILE", "block_dir", "field_box", "make_executor",
           "open_tile", "read_tile_config", "resolve_config", "tile_tasks", "train_tile"]
