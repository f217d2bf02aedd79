"""Cut a tile into blocks and give each block the images that see it.

Rules (the "why" behind :func:`plan_tile`):

* The grid is laid on the ground plane of the tile's projected CRS.  With a fixed block
  size its origin is snapped to a multiple of the block size *in CRS coordinates*, so two
  tiles in the same CRS with the same block size share grid lines and their blocks can be
  stitched or swapped.  With a ``blocks=(rows, cols)`` override (tiny scenes) the extent is
  divided exactly and nothing is snapped.
* The grid covers the union of the images' ground footprints (or ``config.bounds_crs``).
* An image joins a block when its footprint meets the block's *extended* rectangle (core
  plus margin): a block trains its margin too, so that the renderer can blend neighbours
  there.  Visibility decides, not the camera position: an oblique view lands in the blocks
  it looks at.
* A block keeps at most ``max_images_per_block`` training images: the ones whose footprint
  covers most of its *core* (ties broken by name, so plans are reproducible).  Held-out
  (test) images are listed per block, uncapped, for evaluation.
* Coverage: the core is rasterised into ``coverage_cells``^2 cells and each cell counts the
  kept images whose footprint contains its centre; a block where fewer than
  ``coverage_min_fraction`` of the cells are seen by ``coverage_min_views`` images or more is
  flagged ``low_coverage``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from survey_io import Survey

from ..errors import CitygenError
from .config import PartitionConfig
from .ground import GroundModel, estimate_ground
from .plan import Block, Grid, TilePlan, block_id
from .visibility import (
    Footprints,
    area_in_rects,
    compute_footprints,
    polygons_meet_rects,
)

_PAIR_CHUNK = 65536
_CELL_CHUNK = 262144
_EPS = 1e-9


def plan_tile(survey: Survey, config: PartitionConfig | None = None,
              ground: GroundModel | float | None = None, footprints: Footprints | None = None) -> TilePlan:
    """Partition ``survey``'s tile into blocks and assign images to them.

    Args:
        survey: posed images in the tile's local frame.
        config: grid, overlap, caps and coverage rules.
        ground: the surface footprints are cut at: a :class:`GroundModel`, a plane height
            (local metres), or None for :func:`estimate_ground`'s automatic estimate.
        footprints: precomputed footprints of ``survey.images`` (else computed here).
    """
    config = config or PartitionConfig()
    if ground is None:
        ground = estimate_ground(survey, config)
    elif not isinstance(ground, GroundModel):
        ground = GroundModel.plane(float(ground), source="given height")
    cam_z = float(np.median([im.c2w[2, 3] for im in survey.images]))
    if ground.is_plane and ground.height >= cam_z:
        raise CitygenError(survey.root, f"ground height {ground.height:.1f} m ({ground.source}) is not below the "
                                        f"cameras (median height {cam_z:.1f} m); give the ground height explicitly")
    fp = footprints
    if fp is None:
        fp = compute_footprints(survey, ground, config.footprint_grid, config.max_ray_distance_m)
    elif fp.names != [im.name for im in survey.images]:
        raise CitygenError(survey.root, "the given footprints are not those of the survey's images (in order)")
    if not fp.valid.any():
        raise CitygenError(survey.root, "no image sees the ground (every view ray points above the horizon)")

    grid = make_grid(fp, survey, config)
    margin = config.margin_for(min(grid.block_size))
    n_blocks = grid.rows * grid.cols
    cores = np.array([grid.core(r, c) for r in range(grid.rows) for c in range(grid.cols)])
    extended = cores + np.array([-margin, -margin, margin, margin])

    img_idx, blk_idx = candidate_pairs(fp, grid, margin)
    score = np.zeros(len(img_idx))
    for s in range(0, len(img_idx), _PAIR_CHUNK):
        i, b = img_idx[s:s + _PAIR_CHUNK], blk_idx[s:s + _PAIR_CHUNK]
        score[s:s + _PAIR_CHUNK] = area_in_rects(fp.quad_centres[i], fp.quad_areas[i], cores[b])
    # a quad centre inside the core settles it; the exact polygon test is for the rest
    meets = score > 0
    unsure = np.flatnonzero(~meets)
    for s in range(0, len(unsure), _PAIR_CHUNK):
        u = unsure[s:s + _PAIR_CHUNK]
        meets[u] = polygons_meet_rects(fp.polygons[img_idx[u]], extended[blk_idx[u]])
    img_idx, blk_idx, score = img_idx[meets], blk_idx[meets], score[meets]

    # cap: per block, training images by core area seen (descending), then by name
    test_set = set(survey.test_names)
    is_test = np.array([name in test_set for name in fp.names], dtype=bool)
    name_rank = np.empty(len(fp.names), dtype=np.int64)
    name_rank[np.argsort(np.array(fp.names, dtype=object), kind="stable")] = np.arange(len(fp.names))
    order = np.lexsort((name_rank[img_idx], -score, blk_idx))
    img_idx, blk_idx, score = img_idx[order], blk_idx[order], score[order]
    train = ~is_test[img_idx]
    rank_in_block = _rank_within_groups(blk_idx, train)
    kept = train & (rank_in_block < config.max_images_per_block)

    views = coverage_counts(fp, grid, config.coverage_cells, img_idx[kept], blk_idx[kept])

    blocks: list[Block] = []
    starts = np.searchsorted(blk_idx, np.arange(n_blocks + 1))
    n = config.coverage_cells
    for k in range(n_blocks):
        r, c = divmod(k, grid.cols)
        sl = slice(starts[k], starts[k + 1])
        imgs, is_kept, is_train = img_idx[sl], kept[sl], train[sl]
        cell_views = views[r * n:(r + 1) * n, c * n:(c + 1) * n]
        covered = float(np.mean(cell_views >= config.coverage_min_views))
        lo, hi = ground.height_range(tuple(extended[k]))
        blocks.append(Block(
            id=block_id(r, c), row=r, col=c, core=tuple(cores[k]), extended=tuple(extended[k]),
            z_range=(lo - config.z_below_ground_m, hi + config.z_above_ground_m),
            images=[fp.names[i] for i in imgs[is_kept]],
            test_images=sorted(fp.names[i] for i in imgs[~is_train]),
            coverage={
                "n_candidates": int(is_train.sum()), "n_dropped_by_cap": int(is_train.sum() - is_kept.sum()),
                "cells_per_side": n, "min_views": config.coverage_min_views,
                "covered_fraction": covered, "views_min": int(cell_views.min()),
                "views_median": float(np.median(cell_views)), "views_max": int(cell_views.max()),
                "low_coverage": covered < config.coverage_min_fraction,
            }))

    placed = np.zeros(len(fp.names), dtype=bool)
    placed[img_idx[kept | ~train]] = True
    plan = TilePlan(georef=survey.georef, grid=grid, margin_m=margin, blocks=blocks, ground=ground.describe(),
                    config=json.loads(json.dumps(dataclasses.asdict(config))), n_images=len(fp.names),
                    unassigned_images=[fp.names[i] for i in np.flatnonzero(~placed)], view_counts=views)
    return plan


def make_grid(fp: Footprints, survey: Survey, config: PartitionConfig) -> Grid:
    """The block grid covering the footprints (or ``config.bounds_crs``); see the module doc."""
    ox, oy = survey.georef.origin[:2]
    if config.bounds_crs is not None:
        e0, n0, e1, n1 = config.bounds_crs
        x0, y0, x1, y1 = e0 - ox, n0 - oy, e1 - ox, n1 - oy
    else:
        boxes = fp.bboxes[fp.valid]
        x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
        x1, y1 = boxes[:, 2].max(), boxes[:, 3].max()
    if config.blocks is not None:
        rows, cols = config.blocks
        return Grid(origin=(float(x0), float(y0)), block_size=((x1 - x0) / cols, (y1 - y0) / rows),
                    rows=rows, cols=cols, snapped=False)
    b = config.block_size_m
    if config.snap_to_block_size:
        # snap in CRS coordinates; the tiny tolerance keeps exact multiples from growing a block
        e_lo = math.floor((x0 + ox) / b + _EPS) * b
        n_lo = math.floor((y0 + oy) / b + _EPS) * b
        cols = max(1, math.ceil((x1 + ox - e_lo) / b - _EPS))
        rows = max(1, math.ceil((y1 + oy - n_lo) / b - _EPS))
        return Grid(origin=(e_lo - ox, n_lo - oy), block_size=(b, b), rows=rows, cols=cols, snapped=True)
    cols = max(1, math.ceil((x1 - x0) / b - _EPS))
    rows = max(1, math.ceil((y1 - y0) / b - _EPS))
    return Grid(origin=(float(x0), float(y0)), block_size=(b, b), rows=rows, cols=cols, snapped=False)


def _candidate_ranges(fp: Footprints, grid: Grid, margin: float):
    """Per valid image: the first block column and row its bounding box meets and how many."""
    valid = np.flatnonzero(fp.valid)
    box = fp.bboxes[valid]
    sx, sy = grid.block_size
    gx, gy = grid.origin
    c0 = np.clip(np.floor((box[:, 0] - margin - gx) / sx), 0, grid.cols - 1).astype(np.int64)
    c1 = np.clip(np.ceil((box[:, 2] + margin - gx) / sx) - 1, 0, grid.cols - 1).astype(np.int64)
    r0 = np.clip(np.floor((box[:, 1] - margin - gy) / sy), 0, grid.rows - 1).astype(np.int64)
    r1 = np.clip(np.ceil((box[:, 3] + margin - gy) / sy) - 1, 0, grid.rows - 1).astype(np.int64)
    # boxes wholly outside the grid get an empty range
    outside = ((box[:, 2] + margin <= gx) | (box[:, 0] - margin >= gx + grid.cols * sx)
               | (box[:, 3] + margin <= gy) | (box[:, 1] - margin >= gy + grid.rows * sy))
    nc = np.where(outside, 0, c1 - c0 + 1)
    nr = np.where(outside, 0, r1 - r0 + 1)
    return valid, c0, r0, nc, nr


def candidate_counts(fp: Footprints, grid: Grid, margin: float) -> np.ndarray:
    """How many candidate blocks each valid image has (:func:`candidate_pairs` without making them)."""
    _, _, _, nc, nr = _candidate_ranges(fp, grid, margin)
    return nc * nr


def candidate_pairs(fp: Footprints, grid: Grid, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(image, block) pairs whose footprint bounding box overlaps the block's extended rectangle."""
    valid, c0, r0, nc, nr = _candidate_ranges(fp, grid, margin)
    owner, k = _expand(nc * nr)
    col = c0[owner] + k % nc[owner]
    row = r0[owner] + k // nc[owner]
    return valid[owner], row * grid.cols + col


def coverage_counts(fp: Footprints, grid: Grid, cells: int, img_idx: np.ndarray, blk_idx: np.ndarray) -> np.ndarray:
    """(rows*cells, cols*cells) counts, per coverage cell of the grid (row 0 south), of the given
    (image, block) pairs whose footprint contains the cell centre; each pair counts only within
    its block's core.

    Scanline rasterisation, exact for any simple polygon: along each cell row, the polygon's
    edge crossings sorted by x pair up into inside spans (the even-odd rule), and each span
    adds 1 to the cells whose centres it covers (through a difference array).
    """
    csx, csy = grid.block_size[0] / cells, grid.block_size[1] / cells
    gx, gy = grid.origin
    box = fp.bboxes[img_idx]
    br, bc = np.divmod(blk_idx, grid.cols)
    # the cell rows of the pair's block whose centres may lie in the footprint's bounding box
    j0 = np.clip(np.ceil((box[:, 1] - gy) / csy - 0.5), br * cells, (br + 1) * cells).astype(np.int64)
    j1 = np.clip(np.floor((box[:, 3] - gy) / csy - 0.5) + 1, br * cells, (br + 1) * cells).astype(np.int64)
    width = grid.cols * cells + 1
    diff = np.zeros(grid.rows * cells * width, dtype=np.int64)
    owner, k = _expand(np.maximum(j1 - j0, 0))
    for s in range(0, len(owner), _CELL_CHUNK):
        o = owner[s:s + _CELL_CHUNK]
        row = j0[o] + k[s:s + _CELL_CHUNK]
        y = gy + (row + 0.5) * csy
        poly = fp.polygons[img_idx[o]]
        x0, y0 = poly[..., 0], poly[..., 1]
        x1, y1 = np.roll(x0, -1, axis=1), np.roll(y0, -1, axis=1)
        straddles = (y0 > y[:, None]) != (y1 > y[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = np.where(straddles, x0 + (y[:, None] - y0) * (x1 - x0) / (y1 - y0), np.inf)
        xc.sort(axis=1)
        lo_col, hi_col = bc[o] * cells, (bc[o] + 1) * cells
        for m in range(0, xc.shape[1] - 1, 2):
            start, end = xc[:, m], xc[:, m + 1]
            span = np.isfinite(end)
            if not span.any():
                break
            i_start = np.clip(np.ceil((start[span] - gx) / csx - 0.5), lo_col[span], hi_col[span]).astype(np.int64)
            i_end = np.clip(np.ceil((end[span] - gx) / csx - 0.5), lo_col[span], hi_col[span]).astype(np.int64)
            keep = i_end > i_start
            flat_row = row[span][keep] * width
            diff += np.bincount(flat_row + i_start[keep], minlength=diff.size)
            diff -= np.bincount(flat_row + i_end[keep], minlength=diff.size)
    return np.cumsum(diff.reshape(grid.rows * cells, width), axis=1)[:, :-1]


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``counts[i]`` items per owner ``i``: (owner of each item, its index within the owner)."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(len(owner)) - starts[owner]


def _rank_within_groups(groups: np.ndarray, member: np.ndarray) -> np.ndarray:
    """For rows sorted by ``groups``: the rank of each ``member`` row among the members of its group."""
    csum = np.cumsum(member) - member
    first = np.searchsorted(groups, groups)          # first row of each row's group
    return csum - csum[first]
