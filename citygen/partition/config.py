"""How a tile is cut into blocks and how images are given to them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CitygenError


@dataclass
class PartitionConfig:
    """Knobs of :func:`citygen.partition.plan_tile`.

    The grid is laid on the ground plane of the tile's projected CRS (the local frame is a
    plain offset of it).  Row ``r`` grows northwards, column ``c`` eastwards.
    """

    #: side of a block's core, metres (used unless ``blocks`` is given).
    block_size_m: float = 1000.0
    #: (rows, cols) override: split the footprint extent into exactly this many blocks (tiny scenes).
    blocks: tuple[int, int] | None = None
    #: overlap margin around each core, metres; neighbouring extended rectangles overlap by 2x this.
    margin_m: float = 50.0
    #: when set, the margin is this fraction of the block size instead of ``margin_m``.
    margin_fraction: float | None = None
    #: snap the grid origin to a multiple of the block size in CRS coordinates, so the grids of
    #: neighbouring tiles (same CRS, same block size) line up.  Only for a fixed block size.
    snap_to_block_size: bool = True
    #: tile bounds (e_min, n_min, e_max, n_max) in the CRS; None = the union of the image footprints.
    bounds_crs: tuple[float, float, float, float] | None = None
    #: most training images one block keeps (the ones seeing most of its core win).
    max_images_per_block: int = 2000
    #: rays are followed at most this far (horizontal metres); rays above the horizon stop here.
    max_ray_distance_m: float = 1500.0
    #: pixel rays per image: a grid of (nx, ny) cells, i.e. (nx+1) x (ny+1) rays incl. the corners.
    footprint_grid: tuple[int, int] = (8, 6)
    #: coverage raster: cells per block side within the core.
    coverage_cells: int = 16
    #: a coverage cell counts as covered when at least this many of the block's images see it.
    coverage_min_views: int = 3
    #: a block is flagged ``low_coverage`` when fewer than this fraction of its cells are covered.
    coverage_min_fraction: float = 0.9
    #: ground fallback when nothing better is known: median camera height minus this.
    flight_height_m: float = 120.0
    #: block z range: ground minimum minus this ...
    z_below_ground_m: float = 20.0
    #: ... up to ground maximum plus this (tallest structure expected).
    z_above_ground_m: float = 250.0

    def __post_init__(self) -> None:
        if not (self.block_size_m > 0 and math.isfinite(self.block_size_m)):
            raise CitygenError(None, f"partition: block_size_m must be > 0, got {self.block_size_m}")
        if self.blocks is not None:
            self.blocks = tuple(int(v) for v in self.blocks)  # type: ignore[assignment]
            if len(self.blocks) != 2 or min(self.blocks) < 1:
                raise CitygenError(None, f"partition: blocks must be (rows, cols) >= 1, got {self.blocks}")
        if not (self.margin_m >= 0 and math.isfinite(self.margin_m)) or (self.margin_fraction is not None and not 0 <= self.margin_fraction < 0.5):
            raise CitygenError(None, "partition: margin must be >= 0 (margin_fraction in [0, 0.5))")
        if self.max_images_per_block < 1:
            raise CitygenError(None, "partition: max_images_per_block must be >= 1")
        if not self.max_ray_distance_m > 0:
            raise CitygenError(None, "partition: max_ray_distance_m must be > 0")
        if len(self.footprint_grid) != 2 or min(self.footprint_grid) < 1:
            raise CitygenError(None, f"partition: footprint_grid must be (nx, ny) >= 1, got {self.footprint_grid}")
        self.footprint_grid = (int(self.footprint_grid[0]), int(self.footprint_grid[1]))
        if self.coverage_cells < 1 or self.coverage_min_views < 1 or not 0 <= self.coverage_min_fraction <= 1:
            raise CitygenError(None, "partition: coverage_cells, coverage_min_views >= 1; fraction in [0, 1]")
        if self.bounds_crs is not None:
            b = tuple(float(v) for v in self.bounds_crs)
            if len(b) != 4 or not (b[2] > b[0] and b[3] > b[1]):
                raise CitygenError(None, f"partition: bounds_crs must be (e_min, n_min, e_max, n_max), got {b}")
            self.bounds_crs = b  # type: ignore[assignment]

    def margin_for(self, block_size: float) -> float:
        """The margin in metres for blocks of side ``block_size``."""
        return self.margin_m if self.margin_fraction is None else self.margin_fraction * block_size
