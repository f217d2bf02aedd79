"""Exports that never hold a whole raster: rasters rendered window by window and written as Cloud
Optimized GeoTIFFs, point clouds written in chunks.  Checked against the closed-form box city of
test_export (not against the one-shot code path, which shares the windowed one), with rio-cogeo's
validator for the COG layout and laspy for the LAS/LAZ files."""

from __future__ import annotations

import tracemalloc

import laspy
import numpy as np
import pytest
import rasterio
from test_export import GEOREF, ORIGIN, BoxCity, read_ply, surface_at

from citygen.errors import CitygenError
from citygen.export import ExportOptions, PointCloud, export_scene
from citygen.export.points import las_writer, laz_available
from citygen.export.raster import OrthoGrid
from survey_io import CLASSES

cog_validate = pytest.importorskip("rio_cogeo.cogeo").cog_validate

#: 65,536 cells: the smallest window (256 x 256), so a few hundred cells a side make many windows.
SMALL_WINDOW = 256 * 256


def closed_form(grid: OrthoGrid):
    xs, ys = grid.cell_centers()
    z, rgb, cls, valid = surface_at(xs, ys)
    # cell centres within a hair of the slanted hole edge may go either way in float32
    sure = np.abs(xs + 0.5 * ys - 16.0) > 1e-3
    return xs, ys, z, rgb, cls, valid, sure


def test_windows_tile_the_grid_exactly_once():
    grid = OrthoGrid(0.0, 0.0, 1.0, width=700, height=530)
    seen = np.zeros((530, 700), int)
    for w in grid.windows(SMALL_WINDOW):
        assert w.width * w.height <= SMALL_WINDOW
        assert w.row_off % 256 == 0 and w.col_off % 256 == 0   # whole staging tiles
        seen[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width] += 1
        xs, _ = w.cell_centers()
        assert xs[0, 0] == (w.col_off + 0.5) * 1.0
    assert np.all(seen == 1)
    # a wide grid: full-width bands when they fit
    assert [(w.height, w.width) for w in OrthoGrid(0, 0, 1.0, 300, 600).windows(300 * 512)] == [(512, 300), (88, 300)]


def test_windowed_cogs_are_valid_and_equal_the_closed_form(tmp_path):
    scene = BoxCity()
    out = tmp_path / "e"
    manifest = export_scene(scene, out, ExportOptions(what=("ortho", "dsm", "semantics"), gsd=0.05, progress=False,
                                                      window_cells=SMALL_WINDOW, chunk=20_000))
    grid = OrthoGrid.covering((-20.0, -15.0, 20.0, 15.0), 0.05)
    assert (grid.width, grid.height) == (800, 600)          # 4 x 3 windows of 256 x 256 (edges smaller)
    assert scene.n_rays == 800 * 600                        # each cell rendered once
    assert sorted(manifest["files"]) == ["dsm", "ortho", "semantics"]
    assert sorted(p.name for p in out.iterdir()) == ["dsm.tif", "export.json", "ortho.tif", "semantics.tif"]

    xs, ys, z, rgb, cls, valid, sure = closed_form(grid)
    for name in ("ortho", "dsm", "semantics"):
        ok, errors, warnings = cog_validate(str(out / f"{name}.tif"), strict=True, quiet=True)
        assert ok and not errors and not warnings, (name, errors, warnings)
        with rasterio.open(out / f"{name}.tif") as src:
            assert (src.width, src.height) == (800, 600) and src.crs.to_epsg() == 32651
            assert src.block_shapes[0] == (512, 512) and src.overviews(1) == [2]
            assert src.transform.almost_equals(rasterio.Affine(0.05, 0, ORIGIN[0] - 20, 0, -0.05, ORIGIN[1] + 15))
    with rasterio.open(out / "dsm.tif") as src:
        dsm, nodata = src.read(1), src.nodata
        dsm_half = src.read(1, out_shape=(300, 400))        # the first overview
    with rasterio.open(out / "ortho.tif") as src:
        ortho = np.moveaxis(src.read(), 0, -1)
    with rasterio.open(out / "semantics.tif") as src:
        sem = src.read(1)
    assert nodata == -9999
    assert np.array_equal(dsm[sure], np.where(valid, z + ORIGIN[2], -9999.0).astype(np.float32)[sure])
    assert np.array_equal(ortho[..., 3][sure], np.where(valid, 255, 0)[sure])
    expect_rgb = np.rint(rgb * 255)
    assert np.abs(ortho[..., :3][sure & valid].astype(int) - expect_rgb[sure & valid]).max() <= 1
    assert np.array_equal(sem[sure], np.where(valid, cls, 255)[sure])

    # overviews average the valid heights of each 2 x 2 block (nodata left out), computed here in numpy
    blocks = np.where(dsm == nodata, np.nan, dsm.astype(np.float64)).reshape(300, 2, 400, 2)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="Mean of empty slice"):
        mean = np.nanmean(blocks, axis=(1, 3))
    have = np.isfinite(mean)
    assert np.array_equal(dsm_half == nodata, ~have)
    assert np.abs(dsm_half[have] - mean[have]).max() < 1e-4


def test_export_streams_grid_points_to_las_laz_and_ply(tmp_path):
    what = ("dsm", "las", "ply") + (("laz",) if laz_available() else ())
    out = tmp_path / "e"
    export_scene(BoxCity(), out, ExportOptions(what=what, gsd=0.1, progress=False, window_cells=SMALL_WINDOW))
    grid = OrthoGrid.covering((-20.0, -15.0, 20.0, 15.0), 0.1)   # 400 x 300: 2 x 2 windows
    xs, ys, z, _, cls, valid, _ = closed_form(grid)
    expect = np.stack([xs[valid] + ORIGIN[0], ys[valid] + ORIGIN[1], z[valid] + ORIGIN[2]], 1)
    order = np.lexsort((expect[:, 1], expect[:, 0]))
    asprs = {"ground": 2, "road": 11, "building": 6}
    for name in [f"points.{k}" for k in ("las", "laz") if k in what]:
        las = laspy.read(out / name)
        got = np.stack([las.x, las.y, las.z], 1)
        # the slanted hole edge may add or drop a cell centre that lies on it
        assert abs(len(got) - len(expect)) <= 2
        if len(got) == len(expect):
            got_order = np.lexsort((got[:, 1], got[:, 0]))
            assert np.abs(got[got_order] - expect[order]).max() <= 0.0005 + 1e-9
        assert las.header.point_count == len(got)
        assert np.allclose(las.header.mins, got.min(0)) and np.allclose(las.header.maxs, got.max(0))
        user = np.asarray(las.user_data)
        assert set(np.unique(user)) <= {0, 1, 2}
        for cid in (0, 1, 2):
            assert np.all(np.asarray(las.classification)[user == cid] == asprs[CLASSES[cid]])
        assert abs(int((user == 2).sum()) - int((cls[valid] == 2).sum())) == 0
    _, verts, _ = read_ply(out / "points.ply")
    assert abs(len(verts) - len(expect)) <= 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]   # no staging file left


def test_all_nodata_streamed_export_writes_nothing(tmp_path):
    out = tmp_path / "e"
    with pytest.raises(CitygenError, match="all nodata"):
        export_scene(BoxCity(), out, ExportOptions(what=("ortho", "dsm", "las", "ply"), gsd=0.05, progress=False,
                                                   rect=(17.0, 5.0, 19.0, 8.0)))
    assert not out.exists()


def test_chunked_las_equals_the_points_and_fails_whole(tmp_path):
    rng = np.random.default_rng(3)
    n = 10_000
    xyz = np.stack([rng.uniform(-500, 500, n), rng.uniform(-300, 300, n), rng.uniform(0, 60, n)], 1)
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    classes = rng.choice(np.array([0, 1, 2, 6, 255], np.uint8), n)   # ground, road, building, other, none
    cloud = lambda sl: PointCloud(xyz=xyz[sl], rgb=rgb[sl], classes=classes[sl], georef=GEOREF,  # noqa: E731
                                  class_names=CLASSES)
    suffixes = (".las", ".laz") if laz_available() else (".las",)
    for suffix in suffixes:
        path = tmp_path / f"p{suffix}"
        with las_writer(path, GEOREF, CLASSES, offsets=np.floor(np.array(ORIGIN) - 1000)) as sink:
            for sl in (slice(0, 3000), slice(3000, 3000), slice(3000, 7777), slice(7777, n)):  # one empty
                sink.write(cloud(sl))
        las = laspy.read(path)
        assert las.header.point_count == n and (suffix == ".laz") == las.header.are_points_compressed
        got = np.stack([las.x, las.y, las.z], 1)
        want = xyz + np.array(ORIGIN)
        assert np.abs(got - want).max() <= 0.0005 + 1e-9
        assert np.array_equal(np.stack([las.red, las.green, las.blue], 1), rgb.astype(np.uint16) * 257)
        assert np.array_equal(np.asarray(las.user_data), classes)
        # ASPRS: ground 2, road 11, building 6, "other" unclassified 1, no class 0
        lut = {0: 2, 1: 11, 2: 6, 6: 1, 255: 0}
        assert np.array_equal(np.asarray(las.classification), np.vectorize(lut.get)(classes))
        assert las.header.parse_crs().to_epsg() == 32651

    # a failure half-way, or no point at all, leaves no file and no temp file
    with pytest.raises(RuntimeError, match="boom"), las_writer(tmp_path / "q.las", GEOREF, CLASSES, ORIGIN) as sink:
        sink.write(cloud(slice(0, 100)))
        raise RuntimeError("boom")
    with pytest.raises(CitygenError, match="no points"), las_writer(tmp_path / "r.laz" if laz_available() else
                                                                    tmp_path / "r.las", GEOREF, CLASSES, ORIGIN):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"p{s}" for s in suffixes)


def test_export_memory_does_not_grow_with_the_raster(tmp_path):
    """numpy's allocations (tracemalloc sees them) peak at one window's worth: a raster with 4x
    the cells peaks at 1.13x the small one's (measured), where whole arrays (window_cells=1e9)
    peak at 2.3x (a fixed ~20 MB of ray chunks comes on top of both)."""
    peaks = {}
    for gsd in (0.1, 0.05):                                  # 120,000 and 480,000 cells
        tracemalloc.start()
        export_scene(BoxCity(), tmp_path / str(gsd), ExportOptions(what=("ortho", "dsm", "semantics", "las"), gsd=gsd,
                                                                   progress=False, window_cells=SMALL_WINDOW))
        peaks[gsd] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[0.05] < 1.5 * peaks[0.1], peaks


def test_cog_writer_windows_in_any_order_and_failures_leave_nothing(tmp_path):
    from survey_io import SurveyError
    from survey_io.geotiff import cog_writer, north_up_transform, read_geotiff

    rng = np.random.default_rng(5)
    full = rng.normal(50.0, 10.0, (700, 600)).astype(np.float32)
    args = dict(width=600, height=700, bands=1, dtype="float32", crs=GEOREF, nodata=-9999.0,
                transform=north_up_transform((ORIGIN[0], ORIGIN[1]), 0.5))
    with cog_writer(tmp_path / "a.tif", **args) as dst:
        for r0, c0 in ((512, 256), (0, 0), (256, 512), (0, 256), (512, 0), (256, 0), (0, 512), (256, 256),
                       (512, 512)):
            dst.write(full[r0:r0 + 256, c0:c0 + 256], r0, c0)
    assert np.array_equal(read_geotiff(tmp_path / "a.tif").array, full)
    assert cog_validate(str(tmp_path / "a.tif"), strict=True, quiet=True)[0]

    with pytest.raises(SurveyError, match=r"b\.tif.*does not fit the 700x600x1 raster"), \
            cog_writer(tmp_path / "b.tif", **args) as dst:
        dst.write(full[:10, :10], 695, 0)
    with pytest.raises(KeyboardInterrupt), cog_writer(tmp_path / "c.tif", **args) as dst:
        dst.write(full[:256, :256], 0, 0)
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]
