"""citygen.export against an analytic scene: flat ground coloured by position, one 20 m box
building, a hole with no surface; rasters, point clouds, meshes and cameras are checked
against the closed-form scene after a round trip through their files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from citygen.errors import CitygenError
from citygen.export import (
    ExportOptions,
    OrthoGrid,
    aerial_views,
    compare_to_ground_truth,
    export_cameras,
    export_scene,
    heightfield_mesh,
    points_from_ortho,
    points_from_views,
    render_ortho,
    tsdf_mesh,
    write_dsm,
    write_las,
    write_mesh,
    write_ortho,
    write_points_ply,
    write_semantics,
)
from citygen.export.points import laz_available
from survey_io import CLASSES, Georef
from survey_io.geotiff import write_geotiff

ORIGIN = (500_000.0, 4_000_000.0, 12.5)
GEOREF = Georef("EPSG:32651", ORIGIN)
BOX_LO, BOX_HI = np.array([-6.3, -4.1, 0.0]), np.array([5.2, 6.6, 20.0])   # footprint not on cell edges
HOLE_X = 16.0      # no surface where x + y / 2 > HOLE_X (acc 0): nodata, with a slanted edge
ROAD_Y = (-13.0, -10.0)
ROOF_RGB, WALL_RGB = np.array([0.8, 0.3, 0.2]), np.array([0.6, 0.6, 0.6])


def ground_rgb(x, y):
    return np.stack([0.5 + 0.4 * np.sin(x / 3.0), 0.5 + 0.4 * np.cos(y / 4.0), np.full_like(x, 0.25)], -1)


def surface_at(x, y):
    """Closed form seen from straight above: (height, rgb, class id, valid)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    inside = (x > BOX_LO[0]) & (x < BOX_HI[0]) & (y > BOX_LO[1]) & (y < BOX_HI[1])
    valid = inside | (x + 0.5 * y < HOLE_X)
    z = np.where(inside, BOX_HI[2], 0.0)
    rgb = np.where(inside[..., None], ROOF_RGB, ground_rgb(x, y))
    road = (y > ROAD_Y[0]) & (y < ROAD_Y[1])
    cls = np.where(inside, CLASSES.index("building"), np.where(road, CLASSES.index("road"), CLASSES.index("ground")))
    return z, rgb, cls, valid


class BoxCity:
    """A RaySource with exact ray casting (float64 inside)."""

    georef = GEOREF
    classes = CLASSES
    bounds = np.array([[-20.0, -15.0, 0.0], [20.0, 15.0, 25.0]])

    def __init__(self):
        self.n_rays = 0

    def render_rays(self, origins, dirs, appearance=None):
        o, d = origins.double().numpy(), dirs.double().numpy()
        self.n_rays += len(o)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_g = np.where(d[:, 2] < 0, -o[:, 2] / d[:, 2], np.inf)
            t0, t1 = (BOX_LO - o) / d, (BOX_HI - o) / d
        tn, tf = np.nanmax(np.minimum(t0, t1), axis=1), np.nanmin(np.maximum(t0, t1), axis=1)
        box = (tf >= tn) & (tn > 0)
        pg = o + t_g[:, None] * d
        ground = np.isfinite(t_g) & (pg[:, 0] + 0.5 * pg[:, 1] < HOLE_X) & ~(box & (tn < t_g))
        t = np.where(box & ~ground, tn, np.where(ground, t_g, 0.0))
        p = o + t[:, None] * d
        roof = box & ~ground & (np.abs(p[:, 2] - BOX_HI[2]) < 1e-6)
        rgb = np.where(ground[:, None], ground_rgb(pg[:, 0], pg[:, 1]), np.where(roof[:, None], ROOF_RGB, WALL_RGB))
        road = (p[:, 1] > ROAD_Y[0]) & (p[:, 1] < ROAD_Y[1])
        cls = np.where(ground, np.where(road, 1, 0), 2)
        acc = (box | ground).astype(float)
        logits = np.full((len(o), len(CLASSES)), -5.0)
        logits[np.arange(len(o)), cls] = 5.0
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)
        return {"rgb": f(rgb * acc[:, None]), "distance": f(t), "acc": f(acc), "semantics": f(logits)}


@pytest.fixture(scope="module")
def scene():
    return BoxCity()


@pytest.fixture(scope="module")
def maps(scene):
    return render_ortho(scene, 0.5, progress=False, chunk=1000)


def read_ply(path: Path):
    """A minimal binary-little-endian PLY reader: (comments, vertex structured array, faces or None)."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    types = {"double": "<f8", "float": "<f4", "uchar": "u1", "int": "<i4"}
    comments, fields, counts, element = [], {}, {}, None
    for line in header[2:-1]:
        parts = line.split()
        if parts[0] == "comment":
            comments.append(line[len("comment "):])
        elif parts[0] == "element":
            element = parts[1]
            counts[element] = int(parts[2])
            fields[element] = []
        elif parts[0] == "property" and parts[1] != "list":
            fields[element].append((parts[2], types[parts[1]]))
    verts = np.frombuffer(raw, dtype=fields["vertex"], count=counts["vertex"], offset=end)
    faces = None
    if "face" in counts:
        rec = np.frombuffer(raw, dtype=[("n", "u1"), ("v", "<i4", (3,))], count=counts["face"],
                            offset=end + verts.nbytes)
        assert np.all(rec["n"] == 3)
        faces = rec["v"]
    return comments, verts, faces


# ------------------------------------------------------------------------------------------ rasters


def test_rasters_georeferenced_and_equal_to_the_scene(maps, tmp_path):
    import rasterio
    from affine import Affine

    paths = write_ortho(maps, tmp_path / "o.tif"), write_dsm(maps, tmp_path / "d.tif"), \
        write_semantics(maps, tmp_path / "s.tif")
    expected_transform = Affine(0.5, 0, ORIGIN[0] - 20.0, 0, -0.5, ORIGIN[1] + 15.0)
    arrays = []
    for p in paths:
        with rasterio.open(p) as src:
            assert src.crs.to_epsg() == 32651
            assert src.transform.almost_equals(expected_transform, precision=1e-9)
            assert (src.width, src.height) == (80, 60)
            arrays.append((src.read(), src.nodata))
    (ortho, _), (dsm, dsm_nodata), (sem, sem_nodata) = arrays
    # Expected values at the cell centres computed from the file's own transform.
    cols, rows = np.meshgrid(np.arange(80) + 0.5, np.arange(60) + 0.5)
    e, n = ORIGIN[0] - 20.0 + 0.5 * cols, ORIGIN[1] + 15.0 - 0.5 * rows
    z, rgb, cls, valid = surface_at(e - ORIGIN[0], n - ORIGIN[1])
    assert 0 < (~valid).sum() < valid.size and dsm_nodata == -9999 and sem_nodata == 255
    np.testing.assert_allclose(dsm[0][valid], z[valid] + ORIGIN[2], atol=1e-3)
    assert np.all(dsm[0][~valid] == -9999)
    assert np.abs(ortho[:3].transpose(1, 2, 0)[valid].astype(int) - np.rint(rgb[valid] * 255)).max() <= 1
    assert np.all(ortho[3][valid] == 255) and np.all(ortho[3][~valid] == 0)
    np.testing.assert_array_equal(sem[0][valid], cls[valid])
    assert np.all(sem[0][~valid] == 255)
    assert {0, 1, 2} <= set(np.unique(sem[0][valid]))


def test_grid_covers_partial_cells_and_supersampled_dsm_takes_the_top(scene):
    rect = (-8.0, -6.0, 7.0, 8.0)                      # 15 x 14 m at 0.7 m: partial last cells
    grid = OrthoGrid.covering(rect, 0.7)
    assert (grid.width, grid.height) == (22, 20)
    m = render_ortho(scene, 0.7, rect, supersample=3, progress=False, chunk=500)
    xs, ys = grid.cell_centers()
    u = (np.arange(3) + 0.5) / 3 - 0.5
    sub = [surface_at(xs + a * 0.7, ys - b * 0.7)[0] for a in u for b in u]
    np.testing.assert_allclose(m.height, np.max(sub, axis=0), atol=1e-3)
    # cells straddling the roof edge: the DSM is the roof, the colour a mix
    edge = (np.max(sub, axis=0) == 20.0) & (np.min(sub, axis=0) == 0.0)
    assert edge.sum() > 10


def test_bad_raster_requests(scene):
    with pytest.raises(CitygenError, match="ground sample distance"):
        render_ortho(scene, 0.0, progress=False)
    with pytest.raises(CitygenError, match="x_max > x_min"):
        render_ortho(scene, 1.0, (5.0, 0.0, 5.0, 1.0), progress=False)


def test_compare_to_ground_truth_on_aligned_and_finer_grids(tmp_path):
    rng = np.random.default_rng(0)
    gt_origin = (ORIGIN[0] - 10.0, ORIGIN[1] + 10.0)
    cols, rows = np.meshgrid(np.arange(20) + 0.5, np.arange(20) + 0.5)
    plane = lambda e, n: 30.0 + 0.1 * (e - gt_origin[0]) - 0.05 * (n - gt_origin[1])
    gt = plane(gt_origin[0] + cols, gt_origin[1] - rows)
    write_geotiff(tmp_path / "gt_dsm.tif", gt, crs=GEOREF, origin_xy=gt_origin, gsd=1.0, dtype="float32")
    gt_rgb = rng.integers(10, 240, (20, 20, 3)).astype(np.uint8)
    write_geotiff(tmp_path / "gt_ortho.tif", gt_rgb, crs=GEOREF, origin_xy=gt_origin, gsd=1.0)

    # same grid: known errors, one nodata cell
    err = rng.normal(0, 0.3, gt.shape)
    pred = (gt + err).astype(np.float32)
    pred[0, 0] = -9999
    write_geotiff(tmp_path / "dsm.tif", pred, crs=GEOREF, origin_xy=gt_origin, gsd=1.0, nodata=-9999)
    rgba = np.concatenate([gt_rgb + 4, np.full((20, 20, 1), 255, np.uint8)], -1)
    rgba[5, 5, 3] = 0
    write_geotiff(tmp_path / "ortho.tif", rgba, crs=GEOREF, origin_xy=gt_origin, gsd=1.0)
    res = compare_to_ground_truth(tmp_path / "dsm.tif", tmp_path / "gt_dsm.tif", tmp_path / "ortho.tif",
                                  tmp_path / "gt_ortho.tif")
    e = (pred.astype(np.float64) - gt.astype(np.float32))[1:].ravel().tolist() + \
        (pred.astype(np.float64) - gt.astype(np.float32))[0, 1:].tolist()
    assert res["dsm"]["n_cells"] == 399
    assert res["dsm"]["rmse_m"] == pytest.approx(np.sqrt(np.mean(np.square(e))), rel=1e-5)
    assert res["dsm"]["median_abs_m"] == pytest.approx(np.median(np.abs(e)), rel=1e-5)
    assert res["ortho"]["n_cells"] == 399
    assert res["ortho"]["psnr_db"] == pytest.approx(10 * np.log10(255**2 / 16.0), rel=1e-9)

    # class rasters: 4 of 400 cells wrong (class 1 -> 2), one nodata
    gt_sem = np.where(np.arange(20)[None, :] < 10, 1, 2).repeat(20, 0).astype(np.uint8)
    pred_sem = gt_sem.copy()
    pred_sem[0, :4] = 2
    pred_sem[19, 19] = 255
    write_geotiff(tmp_path / "gt_sem.tif", gt_sem, crs=GEOREF, origin_xy=gt_origin, gsd=1.0, nodata=255)
    write_geotiff(tmp_path / "sem.tif", pred_sem, crs=GEOREF, origin_xy=gt_origin, gsd=1.0, nodata=255)
    sem = compare_to_ground_truth(tmp_path / "dsm.tif", tmp_path / "gt_dsm.tif", tmp_path / "ortho.tif",
                                  tmp_path / "gt_ortho.tif", tmp_path / "sem.tif", tmp_path / "gt_sem.tif")["semantics"]
    assert sem["n_cells"] == 399 and sem["accuracy"] == pytest.approx(395 / 399)
    assert sem["iou"] == {1: pytest.approx(196 / 200), 2: pytest.approx(199 / 203)}
    assert sem["miou"] == pytest.approx((196 / 200 + 199 / 203) / 2)

    # a finer export (0.5 m) shifted by a quarter cell: its centres fall on the truth's centres
    fo = (gt_origin[0] - 0.25, gt_origin[1] + 0.25)
    fc, fr = np.meshgrid(np.arange(41) + 0.5, np.arange(41) + 0.5)
    fine = plane(fo[0] + 0.5 * fc, fo[1] - 0.5 * fr).astype(np.float32)
    write_geotiff(tmp_path / "fine.tif", fine, crs=GEOREF, origin_xy=fo, gsd=0.5, nodata=-9999)
    res = compare_to_ground_truth(tmp_path / "fine.tif", tmp_path / "gt_dsm.tif", tmp_path / "ortho.tif",
                                  tmp_path / "gt_ortho.tif")
    assert res["dsm"]["n_cells"] == 400 and res["dsm"]["rmse_m"] < 1e-4


# ------------------------------------------------------------------------------------------ points


def test_las_laz_and_ply_round_trip(maps, tmp_path):
    import laspy

    cloud = points_from_ortho(maps)
    assert len(cloud) == int(maps.valid.sum())
    z, rgb, cls, _ = surface_at(cloud.xyz[:, 0], cloud.xyz[:, 1])
    np.testing.assert_allclose(cloud.xyz[:, 2], z, atol=1e-3)
    assert np.abs(cloud.rgb.astype(int) - np.rint(rgb * 255)).max() <= 1
    np.testing.assert_array_equal(cloud.classes, cls)
    asprs = np.array([2, 11, 6])[cls]   # ground 2, road 11, building 6

    outs = [write_las(cloud, tmp_path / "p.las")]
    if laz_available():
        outs.append(write_las(cloud, tmp_path / "p.laz"))
    for path in outs:
        las = laspy.read(path)
        assert las.header.version.minor == 4 and las.header.point_format.id == 7
        assert las.header.parse_crs().to_epsg() == 32651
        xyz = np.stack([las.x, las.y, las.z], 1)
        np.testing.assert_allclose(xyz, cloud.xyz + np.asarray(ORIGIN), atol=0.0006, rtol=0)
        np.testing.assert_array_equal(np.asarray(las.classification), asprs)
        np.testing.assert_array_equal(np.asarray(las.user_data), cls)
        np.testing.assert_array_equal(np.asarray(las.red), cloud.rgb[:, 0].astype(np.uint16) * 257)
    if laz_available():
        assert (tmp_path / "p.laz").stat().st_size < (tmp_path / "p.las").stat().st_size

    comments, v, faces = read_ply(write_points_ply(cloud, tmp_path / "p.ply"))
    assert faces is None and "crs EPSG:32651" in comments
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), cloud.xyz + np.asarray(ORIGIN))
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), cloud.rgb)
    np.testing.assert_array_equal(v["class"], cls)


def test_point_file_errors(maps, tmp_path, monkeypatch):
    cloud = points_from_ortho(maps, stride=4)
    with pytest.raises(CitygenError, match=r"\.las or \.laz"):
        write_las(cloud, tmp_path / "p.txt")
    monkeypatch.setattr("citygen.export.points.laz_available", lambda: False)
    with pytest.raises(CitygenError, match="pip install lazrs"):
        write_las(cloud, tmp_path / "p.laz")
    assert not (tmp_path / "p.laz").exists()


def test_points_from_oblique_views_lie_on_the_surface_and_see_facades(scene):
    bounds = scene.bounds.copy()
    views = aerial_views(bounds, gsd=0.5, image_size=48)
    cloud = points_from_views(scene, views, stride=2, progress=False)
    p = cloud.xyz
    on_ground = np.abs(p[:, 2]) < 1e-3
    d_box = np.max(np.maximum(BOX_LO - p, p - BOX_HI), axis=1)   # 0 on the box's surface
    assert np.all(on_ground | (np.abs(d_box) < 1e-3))
    facade = ~on_ground & (p[:, 2] > 0.5) & (p[:, 2] < 19.5)
    assert facade.sum() > 50
    np.testing.assert_array_equal(cloud.classes[facade], CLASSES.index("building"))


# ------------------------------------------------------------------------------------------ meshes


def test_heightfield_mesh_is_the_dsm_surface_and_round_trips(maps, tmp_path):
    mesh = heightfield_mesh(maps)
    v = maps.valid
    full = v[:-1, :-1] & v[:-1, 1:] & v[1:, :-1] & v[1:, 1:]
    three = (v[:-1, :-1].astype(int) + v[:-1, 1:] + v[1:, :-1] + v[1:, 1:]) == 3
    assert three.sum() > 0    # the slanted edge of the hole: quads with one corner missing
    assert len(mesh.vertices) == v.sum() and len(mesh.faces) == 2 * full.sum() + three.sum()
    z, rgb, cls, _ = surface_at(mesh.vertices[:, 0], mesh.vertices[:, 1])
    np.testing.assert_allclose(mesh.vertices[:, 2], z, atol=1e-3)
    assert np.abs(mesh.colors.astype(int) - np.rint(rgb * 255)).max() <= 1
    assert np.all(mesh.face_normals()[:, 2] > 0)          # every triangle faces up
    comments, pv, faces = read_ply(write_mesh(mesh, tmp_path / "m.ply"))
    assert "origin 500000.000000 4000000.000000 12.500000" in comments
    np.testing.assert_allclose(np.stack([pv["x"], pv["y"], pv["z"]], 1), mesh.vertices, atol=1e-4)
    np.testing.assert_array_equal(faces, mesh.faces)
    np.testing.assert_array_equal(pv["class"], cls)
    lines = (tmp_path / "m.obj").read_text().splitlines() if write_mesh(mesh, tmp_path / "m.obj") else []
    vl = np.array([l.split()[1:] for l in lines if l.startswith("v ")], float)
    fl = np.array([l.split()[1:] for l in lines if l.startswith("f ")], int)
    np.testing.assert_allclose(vl[:, :3], mesh.vertices, atol=1e-3)
    np.testing.assert_allclose(vl[:, 3:], mesh.colors / 255.0, atol=1e-3)
    np.testing.assert_array_equal(fl - 1, mesh.faces)
    with pytest.raises(CitygenError, match=r"\.ply or \.obj"):
        write_mesh(mesh, tmp_path / "m.stl")


def test_tsdf_mesh_without_open3d_is_a_clear_error(scene, monkeypatch):
    monkeypatch.setitem(sys.modules, "open3d", None)
    with pytest.raises(CitygenError, match="needs open3d"):
        tsdf_mesh(scene, [], 0.5, progress=False)


def test_tsdf_mesh_lies_on_the_scene(scene, tmp_path):
    pytest.importorskip("open3d", reason="the mesh extra (open3d) is not installed")
    views = aerial_views(scene.bounds, gsd=0.4, image_size=64)
    mesh = tsdf_mesh(scene, views, voxel_size=0.5, progress=False)
    p = mesh.vertices
    d_box = np.max(np.maximum(BOX_LO - p, p - BOX_HI), axis=1)
    near = (np.abs(p[:, 2]) < 0.5) | (np.abs(d_box) < 0.5)
    assert near.mean() > 0.99
    roof = (np.abs(p[:, 2] - 20) < 0.5) & np.all((p[:, :2] > BOX_LO[:2] + 1) & (p[:, :2] < BOX_HI[:2] - 1), axis=1)
    assert roof.sum() > 20
    np.testing.assert_allclose(mesh.colors[roof].mean(0) / 255, ROOF_RGB, atol=0.05)
    import open3d as o3d

    back = o3d.io.read_triangle_mesh(str(write_mesh(mesh, tmp_path / "t.ply")))
    assert len(back.triangles) == len(mesh.faces)
    np.testing.assert_allclose(np.asarray(back.vertices), mesh.vertices, atol=1e-3)


# ------------------------------------------------------------------------------------------ cameras


def test_export_cameras_round_trips_the_survey(tmp_path):
    from boxscene import make_box_survey

    from survey_io import read_transforms

    survey = read_transforms(make_box_survey(tmp_path / "data", n_train=6, n_test=2, width=16, height=12))
    out = export_cameras(survey, tmp_path / "export" / "cameras", georef=survey.georef)
    back = read_transforms(out)
    assert [im.name for im in back.images] == [im.name for im in survey.images]
    assert back.test_names == survey.test_names and back.georef == survey.georef
    for a, b in zip(back.images, survey.images):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)
        assert back.image_path(a).read_bytes() == survey.image_path(b).read_bytes()
    assert back.cameras == survey.cameras

    # poses only: paths lead back into the dataset
    out = export_cameras(survey, tmp_path / "poses", images="none", rect=(-100.0, 0.0, 100.0, 100.0))
    meta = json.loads(out.read_text())
    kept = [im for im in survey.images if im.c2w[1, 3] >= 0]
    assert 0 < len(meta["frames"]) == len(kept) < len(survey.images)
    for frame, im in zip(meta["frames"], kept):
        assert (out.parent / frame["file_path"]).resolve() == survey.image_path(im).resolve()
        np.testing.assert_allclose(np.array(frame["transform_matrix"]) @ np.diag([1.0, -1, -1, 1]), im.c2w)

    other = Georef("EPSG:32633", (1.0, 2.0, 3.0))
    with pytest.raises(CitygenError, match="not the tile's"):
        export_cameras(survey, tmp_path / "x", georef=other)


# ------------------------------------------------------------------------------------------ whole export


class TowerField(torch.nn.Module):
    """An opaque ground slab z <= 0 and a tower, as a field the real TileRenderer volume-renders."""

    def __init__(self, aabb, tower_lo, tower_hi):
        super().__init__()
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32))
        self.n_classes, self.occupancy = len(CLASSES), None
        self.background_semantics = torch.zeros(self.n_classes)
        self.lo, self.hi = torch.tensor(tower_lo), torch.tensor(tower_hi)

    def forward(self, x, dirs, appearance, ray_index=None, with_semantics=True):
        tower = torch.all((x >= self.lo) & (x <= self.hi), dim=-1)
        solid = (x[:, 2] <= 0.0) | tower
        rgb = torch.where(tower[:, None], torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.2, 0.6, 0.3]))
        labels = torch.where(tower, CLASSES.index("building"), CLASSES.index("ground"))
        out = {"sigma": torch.where(solid, 500.0, 0.0), "rgb": rgb}
        if with_semantics:
            out["semantics"] = 5.0 * torch.nn.functional.one_hot(labels, self.n_classes).float()
        return out

    def background(self, dirs):
        return torch.full((len(dirs), 3), 0.5)


def tower_tile():
    from citygen.config import RenderConfig
    from citygen.partition import Block, Grid, TilePlan
    from citygen.render.tile import BlockSource, TileRenderer

    grid = Grid(origin=(0.0, 0.0), block_size=(10.0, 10.0), rows=1, cols=2)
    blocks, sources = [], []
    for c in range(2):
        core = grid.core(0, c)
        ext = (core[0] - 2, core[1] - 2, core[2] + 2, core[3] + 2)
        blocks.append(Block(id=f"b_r0_c{c}", row=0, col=c, core=core, extended=ext, z_range=(-1.0, 8.0)))
        field = TowerField([[ext[0], ext[1], -1.0], [ext[2], ext[3], 8.0]], (7.2, 3.1, -1.0), (12.6, 6.3, 6.0))
        sources.append(BlockSource(blocks[-1].id, core, ext, field.aabb.numpy().astype(np.float64),
                                   (lambda f=field: f)))
    plan = TilePlan(georef=GEOREF, grid=grid, margin_m=2.0, blocks=blocks)
    return TileRenderer(plan, sources, classes=CLASSES, render_config=RenderConfig(step_size=0.05))


def test_export_scene_through_the_tile_renderer(tmp_path):
    import rasterio

    from citygen.export.run import core_rect

    renderer = tower_tile()
    rect = core_rect(renderer)
    assert rect == (0.0, 0.0, 20.0, 10.0)
    options = ExportOptions(what=("ortho", "dsm", "semantics", "las", "ply", "mesh"), gsd=0.5, rect=rect,
                            progress=False)
    manifest = export_scene(renderer, tmp_path, options)
    assert json.loads((tmp_path / "export.json").read_text()) == json.loads(json.dumps(manifest))
    assert set(manifest["files"]) == {"ortho", "dsm", "semantics", "las", "ply", "mesh_ply", "mesh_obj"}
    assert all((tmp_path / f).is_file() for f in manifest["files"].values())
    assert manifest["asprs_classification"]["building"] == 6
    with rasterio.open(tmp_path / "dsm.tif") as src:
        dsm = src.read(1)
        cols, rows = np.meshgrid(np.arange(src.width) + 0.5, np.arange(src.height) + 0.5)
        e, n = src.transform.c + 0.5 * cols, src.transform.f - 0.5 * rows
    x, y = e - ORIGIN[0], n - ORIGIN[1]
    tower = (x > 7.2) & (x < 12.6) & (y > 3.1) & (y < 6.3)
    # the volume renderer's expected depth is within a marching step of the surface
    np.testing.assert_allclose(dsm, np.where(tower, 6.0, 0.0) + ORIGIN[2], atol=0.06)
    with rasterio.open(tmp_path / "semantics.tif") as src:
        np.testing.assert_array_equal(src.read(1), np.where(tower, 2, 0))


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    from citygen.cli import entrypoint
    from citygen.export.run import parse_bounds, parse_what

    assert parse_bounds("500010,3999995,500020.5,4000015", ORIGIN) == (10.0, -5.0, 20.5, 15.0)
    with pytest.raises(CitygenError, match="4 comma-separated"):
        parse_bounds("1,2,3", ORIGIN)
    with pytest.raises(CitygenError, match="E1 > E0"):
        parse_bounds("5,0,4,1", ORIGIN)
    assert parse_what("ortho, DSM,las") == ("ortho", "dsm", "las") and "laz" not in parse_what("all")

    assert entrypoint(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "plan file not found" in capsys.readouterr().err
    assert entrypoint(["export", str(tmp_path), "--out", str(tmp_path / "o"), "--what", "ortho,gif"]) == 2
    assert "unknown export ['gif']" in capsys.readouterr().err
    assert entrypoint(["export", str(tmp_path), "--out", str(tmp_path / "o"), "--gsd", "0"]) == 2
    assert "--gsd must be > 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ synthetic city


class SyntheticCityOracle:
    """The synthetic city's exact ray caster behind the RaySource API (vertical rays only):
    what a perfectly trained field would render."""

    def __init__(self, root: Path, config, seed: int):
        from survey_io import read_transforms
        from survey_io.synthetic import build_city
        from survey_io.synthetic.raycast import SceneGeometry

        self.geo = SceneGeometry(build_city(config, seed))
        self.georef = read_transforms(root / "transforms.json").georef
        self.classes = CLASSES
        h = config.area_m / 2
        top = self.geo.terrain_hi + float(np.max(self.geo.corners[:, 2])) + 5.0
        self.bounds = np.array([[-h, -h, self.geo.terrain_lo - 1.0], [h, h, top]])

    def render_rays(self, origins, dirs, appearance=None):
        from survey_io.synthetic.raycast import ParallelRays, cast
        from survey_io.synthetic.shading import shade, surfaces

        assert torch.all(dirs == torch.tensor([0.0, 0.0, -1.0]))
        rays = ParallelRays(origins.double().numpy() @ self.geo.city.plan_rotation, np.array([0.0, 0.0, -1.0]))
        hits = cast(self.geo, rays)
        surf = surfaces(self.geo, hits, rays.origins(slice(None)), rays.dirs)
        hit = np.isfinite(hits.t)
        logits = np.zeros((len(hit), len(CLASSES)))
        logits[hit, surf.cls[hit]] = 10.0
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)
        return {"rgb": f(shade(self.geo, surf, hits.kind)), "distance": f(np.where(hit, hits.t, 0.0)),
                "acc": f(hit), "semantics": f(logits)}


def test_exports_of_a_perfect_field_match_the_synthetic_ground_truth(tmp_path):
    from dataclasses import replace

    from survey_io.synthetic import PRESETS, make_survey

    cfg = replace(PRESETS["tiny"], area_m=60.0, altitude_m=50.0, width=16, height=12, oblique_headings=(),
                  render_images=False, antialias=False, ortho_gsd_m=1.0, max_building_height_m=20.0)
    make_survey(tmp_path / "city", cfg, seed=1, progress=False, workers=1)
    oracle = SyntheticCityOracle(tmp_path / "city", cfg, seed=1)
    gt = tmp_path / "city"
    results = {}
    aligned_grid = None
    # aligned; one cell east (georeferenced as such); one cell east but labelled as aligned
    for name, shift, mislabel in (("aligned", 0.0, False), ("shifted", 1.0, False), ("wrong", 1.0, True)):
        rect = (-30.0 + shift, -30.0, 30.0 + shift, 30.0)
        m = render_ortho(oracle, 1.0, rect, progress=False)
        assert m.valid.all()
        aligned_grid = aligned_grid or m.grid
        if mislabel:
            m = replace(m, grid=aligned_grid)
        write_dsm(m, tmp_path / f"{name}_dsm.tif")
        write_ortho(m, tmp_path / f"{name}_ortho.tif")
        write_semantics(m, tmp_path / f"{name}_sem.tif")
        results[name] = compare_to_ground_truth(tmp_path / f"{name}_dsm.tif", gt / "dsm.tif",
                                                tmp_path / f"{name}_ortho.tif", gt / "ortho.tif",
                                                tmp_path / f"{name}_sem.tif", gt / "ortho_semantics.tif")
    a, s, w = results["aligned"], results["shifted"], results["wrong"]
    assert a["dsm"]["coverage"] == 1.0 and a["dsm"]["rmse_m"] < 1e-3
    assert a["ortho"]["psnr_db"] > 50.0
    assert a["semantics"]["accuracy"] == 1.0 and a["semantics"]["miou"] == 1.0 and len(a["semantics"]["iou"]) >= 3
    assert s["semantics"]["accuracy"] == 1.0 and w["semantics"]["accuracy"] < 0.99
    assert s["dsm"]["coverage"] == pytest.approx(59 / 60) and s["dsm"]["rmse_m"] < 1e-3
    assert s["ortho"]["psnr_db"] > 50.0
    assert w["dsm"]["rmse_m"] > 0.5 and w["ortho"]["psnr_db"] < a["ortho"]["psnr_db"] - 20


def test_export_scene_views_and_tsdf_stay_in_the_rect(scene, tmp_path):
    pytest.importorskip("open3d", reason="the mesh extra (open3d) is not installed")
    import laspy

    rect = (-10.0, -8.0, 10.0, 9.0)
    options = ExportOptions(what=("las", "mesh"), gsd=0.5, rect=rect, points_from="views", mesh_method="tsdf",
                            mesh_formats=("ply",), view_size=48, progress=False)
    manifest = export_scene(scene, tmp_path, options)
    assert set(manifest["files"]) == {"las", "mesh_ply"} and manifest["counts"]["views"] == 20
    las = laspy.read(tmp_path / "points.las")
    x, y = np.asarray(las.x) - ORIGIN[0], np.asarray(las.y) - ORIGIN[1]
    assert len(x) == manifest["counts"]["points"] > 300
    assert x.min() >= rect[0] - 1e-3 and x.max() <= rect[2] + 1e-3
    assert y.min() >= rect[1] - 1e-3 and y.max() <= rect[3] + 1e-3
    _, v, faces = read_ply(tmp_path / "mesh.ply")
    assert len(faces) == manifest["counts"]["mesh_faces"] > 1000
    assert v["x"].min() >= rect[0] and v["x"].max() <= rect[2] and v["y"].min() >= rect[1] and v["y"].max() <= rect[3]
