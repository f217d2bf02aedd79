"""The export's block-ordered rendering: each block's field is loaded about once, however many
row bands and windows the raster has, within the export's memory estimate, and the rasters are
the ones an unlimited field cache renders.  Expectations come from the tile's geometry (which
blocks' rectangles the raster meets), not from the code under test."""

from __future__ import annotations

import numpy as np
import pytest
from test_tile import SlabField

from citygen.config import RenderConfig
from citygen.errors import CitygenError
from citygen.export.raster import render_ortho
from citygen.export.run import MIN_FIELD_CACHE, ExportOptions, export_memory, export_scene
from citygen.partition import Block, Grid, TilePlan
from citygen.render.tile import BlockSource, TileRenderer
from survey_io import Georef

ROWS, COLS, SIZE, MARGIN = 2, 3, 10.0, 2.0
RECT = (0.0, 0.0, COLS * SIZE, ROWS * SIZE)
FIELD_BYTES = 10**6


def six_block_renderer(max_cached_blocks: int = 8) -> TileRenderer:
    """A 2 x 3 tile of 10 m blocks (2 m margins), each an opaque slab of its own colour."""
    grid = Grid(origin=(0.0, 0.0), block_size=(SIZE, SIZE), rows=ROWS, cols=COLS)
    blocks, sources = [], []
    for r in range(ROWS):
        for c in range(COLS):
            core = grid.core(r, c)
            ext = (core[0] - MARGIN, core[1] - MARGIN, core[2] + MARGIN, core[3] + MARGIN)
            b = Block(id=f"b_r{r}_c{c}", row=r, col=c, core=core, extended=ext, z_range=(-1.0, 5.0))
            blocks.append(b)
            # boxes of different heights: the samples of a ray must not depend on which boxes
            # the other rays of its chunk meet (the block order groups rays differently)
            aabb = [[ext[0], ext[1], -1.0], [ext[2], ext[3], 4.0 + 0.37 * (r * COLS + c)]]
            color = ((r + 1) / ROWS, (c + 1) / COLS, 0.5)
            field = SlabField(aabb, color, label=c % 3, top=1.0 + 0.5 * (r * COLS + c))
            sources.append(BlockSource(b.id, core, ext, np.asarray(aabb), (lambda f=field: f),
                                       nbytes=FIELD_BYTES, load_nbytes=2 * FIELD_BYTES))
    plan = TilePlan(georef=Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)), grid=grid, margin_m=MARGIN,
                    blocks=blocks)
    return TileRenderer(plan, sources, classes=("ground", "road", "building"),
                        render_config=RenderConfig(step_size=0.25, segment_samples=32, min_transmittance=1e-4,
                                                   chunk_rays=2048),
                        max_cached_blocks=max_cached_blocks)


def blocks_meeting(rect) -> int:
    """Blocks whose extended rectangle meets ``rect`` (by hand from the layout above)."""
    n = 0
    for r in range(ROWS):
        for c in range(COLS):
            x0, y0, x1, y1 = c * SIZE - MARGIN, r * SIZE - MARGIN, (c + 1) * SIZE + MARGIN, (r + 1) * SIZE + MARGIN
            n += x0 <= rect[2] and x1 >= rect[0] and y0 <= rect[3] and y1 >= rect[1]
    return n


class RowBands:
    """The renderer without its block rectangles: the export renders it in row bands across
    the whole width, as it did before block-ordered strips."""

    def __init__(self, renderer: TileRenderer):
        self.r = renderer
        self.georef, self.classes, self.bounds = renderer.georef, renderer.classes, renderer.bounds

    def render_rays(self, origins, dirs, appearance=None):
        return self.r.render_rays(origins, dirs, appearance)


def test_strips_load_each_block_once_and_render_what_an_unlimited_cache_renders():
    assert blocks_meeting(RECT) == 6
    # rays of every band in the old order span all three block columns: with 4 fields cached
    # the middle band (two block rows) reloads them chunk after chunk
    rows = six_block_renderer(MIN_FIELD_CACHE)
    old = render_ortho(RowBands(rows), 0.2, RECT, progress=False, chunk=3000)
    assert rows.field_loads > 2 * 6
    strips = six_block_renderer(MIN_FIELD_CACHE)
    new = render_ortho(strips, 0.2, RECT, progress=False, chunk=3000)
    assert strips.field_loads == 6
    unlimited = six_block_renderer(100)
    ref = render_ortho(RowBands(unlimited), 0.2, RECT, progress=False, chunk=3000)
    assert unlimited.field_loads == 6
    assert ref.valid.all()
    for maps in (old, new):
        # uint8 colour: 1 level for a float at a rounding boundary (a different summation order)
        np.testing.assert_allclose(maps.rgb.astype(int), ref.rgb.astype(int), atol=1)
        assert np.mean(maps.rgb != ref.rgb) < 0.01
        np.testing.assert_array_equal(maps.semantics, ref.semantics)
        # heights to 0.1 mm: the geometric blend's log/exp turns a different summation order of
        # the blend weights (other blocks in the chunk) into up to 2e-5 m
        np.testing.assert_allclose(maps.height, ref.height, atol=1e-4)
    # the slabs' tops: each block's core shows its own height (away from the blends)
    assert new.height[25, 25] == pytest.approx(1.0 + 0.5 * 3, abs=0.13)   # row 0 is north: block r1 c0


def test_export_sizes_the_cache_to_a_window_within_the_memory_budget(tmp_path):
    # 300 x 200 cells at 0.1 m: two windows of at most 256 x 256 cells; the first meets all six
    # blocks' rectangles (x up to 25.6 m), the second (x 25.6-30 m) the two of column 2
    options = ExportOptions(what=("ortho", "dsm"), gsd=0.1, rect=RECT, progress=False, window_cells=256 * 256)
    others = sum(export_memory(options, RECT).values())
    renderer = six_block_renderer()
    m = export_scene(renderer, tmp_path / "big", options, memory_budget_bytes=others + 100 * FIELD_BYTES)
    # strips (x edges of the rectangles at -2, 8, 12, 18, 22, 32 m) meet one block column, or two
    # where columns overlap: at most 2 x 2 blocks at once, and in serpentine order four cached
    # fields load each of the six once (the second window, x 25.6-30 m, finds column 2 cached)
    assert m["field_cache"]["blocks"] == 4 and m["field_cache"]["loads"] == blocks_meeting(RECT)
    assert m["field_cache"]["bytes"] == 4 * FIELD_BYTES + 2 * FIELD_BYTES
    assert renderer.max_cached_blocks == 8                     # restored after the export
    assert renderer.field_loads == 6
    # not even the fewest fields a ray can need: refused before anything is written
    with pytest.raises(CitygenError, match="fields .*raise --memory-budget-gb"):
        export_scene(six_block_renderer(), tmp_path / "refused", options,
                     memory_budget_bytes=others + (MIN_FIELD_CACHE + 1) * FIELD_BYTES)
    assert not (tmp_path / "refused").exists()
