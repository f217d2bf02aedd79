"""Write a synthetic drone survey of the procedural city: the project's ground truth.

``make_survey(out, config, seed)`` writes into ``out``::

    images/00000.jpg ...      RGB, JPEG (quality config.jpeg_quality, 4:4:4), EXIF GPS + DJI XMP (see .exif)
    depth/00000.npy ...       float32 (H, W), metres along the optical axis (z), 0 where nothing was hit
                              (not with ``write_depth=False``: real surveys have no depth maps)
    semantics/00000.png ...   uint8 (H, W) class ids (survey_io.semantics.CLASSES), 255 where nothing was hit
    transforms.json           nerfstudio, exact poses, georef, depth/semantics paths, test_filenames
    dsm.tif                   float32, highest surface height per cell (max over the cell's centre and its
                              4 anti-aliasing samples; the centre only without antialias)
    dtm.tif                   float32, bare surface at the cell centre (terrain, or water surface)
    ortho.tif                 uint8 RGB true orthophoto (orthographic nadir, same shading as the images)
    ortho_semantics.tif       uint8 class id at the cell centre
    scene.json                the city: buildings, trees, vehicles, roads, water, bounds, sun, files
    preview.png               contact sheet (a nadir and an oblique image, the ortho, the semantic ortho)

GeoTIFFs are north-up in the georef's CRS (EPSG:32651 by default) over the survey area,
heights in the CRS's vertical (WGS84 ellipsoidal metres = local z + georef origin height).
With ``render_images=False`` only scene.json, transforms.json (poses of images that are not
written) and, if ``render_rasters``, the GeoTIFFs are produced: a flight plan for large areas.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path, atomic_write_bytes, atomic_write_json
from ..geotiff import write_geotiff
from ..nerfstudio import write_transforms
from ..semantics import CLASS_COLORS, CLASSES
from ..survey import Survey, SurveyImage
from .city import City, generate_city
from .exif import image_metadata
from .flight import camera_for, plan_poses, survey_georef, test_split
from .raycast import SceneGeometry
from .shading import render_ortho, render_view


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic survey: the city's size, the flight, the renderer.

    Attributes:
        area_m: side of the square survey area, centred on the georef origin (local ENU).
        altitude_m: flight height above the take-off point (the origin, ground height 0).
        width, height: image size in pixels.
        focal_35mm: 35 mm-equivalent focal length (on a 36 mm wide frame).
        front_overlap, side_overlap: nadir grid overlaps on flat ground.
        oblique_headings: headings (degrees from grid north) of the oblique passes; () for none.
        oblique_off_nadir_deg: tilt of the oblique camera away from nadir.
        oblique_spacing_factor: oblique target grid spacing relative to the nadir grid.
        test_every: every n-th image is held out (transforms.json test_filenames).
        antialias: 4 rotated-grid samples per pixel for RGB (depth/semantics: the pixel centre).
        shadows: exact hard sun shadows.
        render_images: False writes transforms.json + scene.json only (a flight plan).
        render_rasters: write the DSM / DTM / ortho GeoTIFFs.
        ortho_gsd_m: cell size of the GeoTIFFs.
        max_building_height_m: cap on building heights.
        lon, lat, ground_height_m: where the origin is (ground_height_m is WGS84 ellipsoidal).
        sun_azimuth_deg, sun_elevation_deg: sun direction (azimuth clockwise from grid north).
        jpeg_quality: JPEG quality of the images.
        built_area_m: side of the built patch (a square centred on the origin): buildings, trees
            and vehicles only there, fields crossed by roads elsewhere; None: built everywhere.
        write_depth: write depth maps (and list them in transforms.json).
    """

    area_m: float = 300.0
    altitude_m: float = 110.0
    width: int = 320
    height: int = 240
    focal_35mm: float = 24.0
    front_overlap: float = 0.65
    side_overlap: float = 0.5
    oblique_headings: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    oblique_off_nadir_deg: float = 38.0
    oblique_spacing_factor: float = 3.0
    test_every: int = 8
    antialias: bool = True
    shadows: bool = True
    render_images: bool = True
    render_rasters: bool = True
    ortho_gsd_m: float = 0.5
    max_building_height_m: float = 45.0
    lon: float = 121.47
    lat: float = 31.23
    ground_height_m: float = 14.0
    sun_azimuth_deg: float = 150.0
    sun_elevation_deg: float = 58.0
    jpeg_quality: int = 95
    max_images: int | None = None  # keep only the first n planned images (tests)
    built_area_m: float | None = None
    write_depth: bool = True


PRESETS: dict[str, SyntheticConfig] = {
    # ~64 images at 320x240 over 300 m x 300 m: the CPU demo and the tests' default data
    "tiny": SyntheticConfig(),
    # a few seconds on one CPU core: nadir images at 64x48 over 120 m x 120 m, coarse rasters
    # (smoke runs such as `scripts/gpu-check --cpu-smoke`, not for training quality)
    "smoke": SyntheticConfig(area_m=120.0, altitude_m=60.0, width=64, height=48, oblique_headings=(),
                             max_building_height_m=20.0, antialias=False, ortho_gsd_m=2.0, test_every=4),
    # ~200 images at 640x480 over 500 m x 500 m
    "small": SyntheticConfig(area_m=500.0, altitude_m=130.0, width=640, height=480, front_overlap=0.75,
                             side_overlap=0.6, oblique_spacing_factor=2.2, max_building_height_m=60.0),
    # 1 km^2 and 9 km^2 flight plans (cameras only; render with render_images=True if you have hours)
    "district": SyntheticConfig(area_m=1000.0, altitude_m=150.0, width=1600, height=1200, front_overlap=0.75,
                                side_overlap=0.65, render_images=False, ortho_gsd_m=1.0, max_building_height_m=90.0),
    # the failure an outside tester reported (2x2 tile far worse than one block): a 300 m built patch
    # in a 600 m flight, 54 nadir + 48 oblique (45 deg off nadir) images at 400x300, no depth maps;
    # planned as a 2x2 tile, each block is mostly fields and its oblique views see far beyond it
    "failure": SyntheticConfig(area_m=600.0, altitude_m=150.0, width=400, height=300, front_overlap=0.5,
                               side_overlap=0.4, oblique_off_nadir_deg=45.0, oblique_spacing_factor=2.0,
                               built_area_m=300.0, write_depth=False, antialias=False, ortho_gsd_m=1.0),
    "city": SyntheticConfig(area_m=3000.0, altitude_m=150.0, width=4000, height=3000, front_overlap=0.75,
                            side_overlap=0.65, render_images=False, render_rasters=False,
                            max_building_height_m=120.0),
}


def plan_flight(config: SyntheticConfig, seed: int = 0, root: str | Path = "synthetic-flight") -> Survey:
    """The survey ``make_survey`` would render (names, poses, camera, georef, test split), no files."""
    cam = camera_for(config.width, config.height, config.focal_35mm)
    h = config.area_m / 2.0
    poses = plan_poses((-h, -h, h, h), config.altitude_m, cam, front_overlap=config.front_overlap,
                       side_overlap=config.side_overlap, oblique_headings=config.oblique_headings,
                       oblique_off_nadir_deg=config.oblique_off_nadir_deg,
                       oblique_spacing_factor=config.oblique_spacing_factor)
    if config.max_images is not None:
        poses = poses[: config.max_images]
    root = Path(root)
    images = []
    for i, p in enumerate(poses):
        stem = f"{i:05d}"
        images.append(SurveyImage(name=f"images/{stem}.jpg", camera=0, c2w=p.c2w,
                                  semantics=root / "semantics" / f"{stem}.png" if config.render_images else None,
                                  depth=root / "depth" / f"{stem}.npy" if config.render_images and config.write_depth else None))
    georef = survey_georef(config.lon, config.lat, config.ground_height_m)
    return Survey(root=root, cameras=[cam], images=images, georef=georef,
                  test_names=test_split([im.name for im in images], config.test_every))


def build_city(config: SyntheticConfig, seed: int = 0) -> City:
    """The procedural city of ``make_survey(out, config, seed)``."""
    georef = survey_georef(config.lon, config.lat, config.ground_height_m)
    return generate_city(seed, config.area_m / 2.0, georef, sun_azimuth_deg=config.sun_azimuth_deg,
                         sun_elevation_deg=config.sun_elevation_deg, max_height=config.max_building_height_m,
                         built_half=None if config.built_area_m is None else config.built_area_m / 2.0)


def make_survey(out: str | Path, config: SyntheticConfig | None = None, seed: int = 0,
                progress: bool = True, workers: int | None = None) -> Survey:
    """Generate the city for ``seed``, fly ``config`` over it and write the survey into ``out``.

    Deterministic: the same (config, seed) writes the same bytes, whatever ``workers`` is.
    ``workers`` > 1 renders images in that many processes (default: min(2, CPU count)); each
    rebuilds the city from (config, seed), so nothing large crosses process boundaries.
    Returns the written survey (as :func:`survey_io.read_transforms` would read it back).
    """
    config = config or PRESETS["tiny"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    city = build_city(config, seed)
    geo = SceneGeometry(city)
    survey = plan_flight(config, seed, root=out)
    _write_scene_json(out / "scene.json", city, config, seed)
    if config.render_images:
        n = len(survey.images)
        workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
        report = _progress(progress, n)
        if workers == 1 or n < 8:
            _CACHE[(config, seed)] = (geo, survey)
            for i in range(n):
                _render_image(out, config, seed, i)
                report(i + 1)
        else:
            chunks = [list(range(k, min(n, k + 4))) for k in range(0, n, 4)]
            done = 0
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for fut in cf.as_completed([pool.submit(_render_images, out, config, seed, c) for c in chunks]):
                    done += fut.result()
                    report(done)
    write_transforms(survey, out / "transforms.json")
    if config.render_rasters:
        h = config.area_m / 2.0
        ortho = render_ortho(geo, -h, -h, h, h, config.ortho_gsd_m, antialias=config.antialias,
                             shadows=config.shadows)
        oz = survey.georef.origin
        tiff = dict(crs=survey.georef.crs, origin_xy=(oz[0] - h, oz[1] + h), gsd=config.ortho_gsd_m)
        write_geotiff(out / "dsm.tif", ortho.dsm.astype(np.float64) + oz[2], dtype="float32", **tiff)
        write_geotiff(out / "dtm.tif", ortho.dtm.astype(np.float64) + oz[2], dtype="float32", **tiff)
        write_geotiff(out / "ortho.tif", ortho.rgb, **tiff)
        write_geotiff(out / "ortho_semantics.tif", ortho.semantics, nodata=255, **tiff)
        if config.render_images:
            _write_preview(out / "preview.png", survey, ortho.rgb, ortho.semantics)
    if progress:
        print(f"synthetic survey: {len(survey.images)} images -> {out} in {time.perf_counter() - t0:.1f} s")
    return survey


# per-process cache of (SceneGeometry, planned Survey) for image rendering
_CACHE: dict = {}


def _render_images(out: Path, config: SyntheticConfig, seed: int, indices: list[int]) -> int:
    for i in indices:
        _render_image(out, config, seed, i)
    return len(indices)


def _render_image(out: Path, config: SyntheticConfig, seed: int, i: int) -> None:
    """Render image ``i`` of the survey and write its JPEG, depth and semantics files."""
    if (config, seed) not in _CACHE:
        _CACHE.clear()
        _CACHE[(config, seed)] = (SceneGeometry(build_city(config, seed)), plan_flight(config, seed, root=out))
    geo, survey = _CACHE[(config, seed)]
    im, cam = survey.images[i], survey.cameras[0]
    view = render_view(geo, im.c2w, cam.K, cam.width, cam.height, antialias=config.antialias, shadows=config.shadows)
    _write_image(out / im.name, view.rgb, im.c2w, cam, survey.georef, i, config.jpeg_quality)
    if im.depth is not None:
        with atomic_path(out / Path(im.depth).relative_to(survey.root), suffix=".npy") as tmp:
            np.save(tmp, view.depth)
    _write_png(out / Path(im.semantics).relative_to(survey.root), view.semantics)


# ----------------------------------------------------------------------------------------------
def _progress(enabled: bool, total: int):
    if not enabled:
        return lambda i: None
    start = time.perf_counter()

    def report(i):
        if i == total or i % 10 == 0:
            print(f"  rendered {i}/{total} images ({time.perf_counter() - start:.1f} s)", flush=True)
    return report


def _write_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _write_image(path: Path, rgb: np.ndarray, c2w, cam, georef, index: int, quality: int) -> None:
    exif, xmp, _ = image_metadata(c2w, cam, georef, index)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0, exif=exif, xmp=xmp)
    atomic_write_bytes(path, buf.getvalue())


def _write_preview(path: Path, survey: Survey, ortho_rgb: np.ndarray, ortho_sem: np.ndarray) -> None:
    """2x2 contact sheet: first nadir image, an oblique image, the ortho, the semantic ortho."""
    tile_w, tile_h = 480, 360
    nadir = survey.images[len(survey.images) // 4]
    oblique = next((im for im in survey.images if im.c2w[2, 2] > -0.99), survey.images[-1])
    palette = np.array(list(CLASS_COLORS) + [(0, 0, 0)] * (256 - len(CLASS_COLORS)), np.uint8)
    tiles = [Image.open(survey.image_path(nadir)), Image.open(survey.image_path(oblique)),
             Image.fromarray(ortho_rgb), Image.fromarray(palette[ortho_sem])]
    sheet = Image.new("RGB", (2 * tile_w, 2 * tile_h), (255, 255, 255))
    for k, tile in enumerate(tiles):
        tile = tile.convert("RGB")
        scale = min(tile_w / tile.width, tile_h / tile.height)
        tile = tile.resize((round(tile.width * scale), round(tile.height * scale)),
                           Image.NEAREST if k == 3 else Image.BILINEAR)
        sheet.paste(tile, ((k % 2) * tile_w + (tile_w - tile.width) // 2, (k // 2) * tile_h + (tile_h - tile.height) // 2))
    _write_png_image(path, sheet)


def _write_png_image(path: Path, img) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _write_scene_json(path: Path, city: City, config: SyntheticConfig, seed: int) -> None:
    """The city in local ENU metres (+ CRS footprints), so tests and edits can use the ground truth."""
    g = city.georef
    origin = np.asarray(g.origin)
    R = city.plan_rotation

    def rect_enu(x0, y0, x1, y1):
        pts = np.array([[x0, y0, 0], [x1, y0, 0], [x1, y1, 0], [x0, y1, 0]], float) @ R.T
        return pts[:, :2]

    h = city.half_extent
    in_area = lambda pts: bool(np.any((np.abs(pts[:, 0]) <= h) & (np.abs(pts[:, 1]) <= h)))
    buildings = []
    for b in city.buildings:
        parts = []
        for p in b["parts"]:
            fp = rect_enu(*p["footprint"])
            part = {k: v for k, v in p.items() if k != "footprint"}
            part.update(footprint_plan=[float(v) for v in p["footprint"]], footprint_local=fp.round(4).tolist(),
                        footprint_crs=(fp + origin[:2]).round(4).tolist(), in_area=in_area(fp))
            parts.append(part)
        buildings.append(dict(b, parts=parts, in_area=any(p["in_area"] for p in parts)))
    bx = city.boxes
    veh = np.nonzero(bx.cls == 5)[0]
    vehicles = [dict(footprint_local=rect_enu(bx.lo[k, 0], bx.lo[k, 1], bx.hi[k, 0], bx.hi[k, 1]).round(4).tolist(),
                     bottom_z=float(bx.lo[k, 2]), top_z=float(bx.hi[k, 2])) for k in veh]
    e = city.ellipsoids
    trees = [dict(center_local=(c @ R.T).round(4).tolist(), radii=r.round(4).tolist()) for c, r in zip(e.center, e.radii)]
    roads = []
    p = city.plan_half
    for axis, (cs, hws) in enumerate(((city.road_x, city.road_x_halfwidth), (city.road_y, city.road_y_halfwidth))):
        for c, hw in zip(cs, hws):
            a = np.array([[c, -p, 0], [c, p, 0]]) if axis == 0 else np.array([[-p, c, 0], [p, c, 0]])
            roads.append(dict(centreline_local=(a @ R.T)[:, :2].round(4).tolist(), halfwidth=float(hw),
                              sidewalk=float(city.sidewalk)))
    xs = np.linspace(-p, p, 101)
    river_line = np.stack([xs, city.river_centre_y(xs), np.zeros_like(xs)], 1) @ R.T
    zlo, _ = city.terrain_bounds()
    top = float(max(bx.hi[:, 2].max(initial=0.0), (e.center[:, 2] + e.radii[:, 2]).max(initial=0.0)))
    scene = {
        "format": "citygen-synthetic-scene/1",
        "seed": seed,
        "config": asdict(config),
        "georef": g.to_dict(),
        "heights": "local z in metres; add georef.origin[2] for WGS84 ellipsoidal heights (EPSG:4979)",
        "bounds": {"local_min": [-h, -h, round(min(zlo, city.water_level), 4)], "local_max": [h, h, round(top, 4)],
                   "crs_min": (origin + [-h, -h, min(zlo, city.water_level)]).round(4).tolist(),
                   "crs_max": (origin + [h, h, top]).round(4).tolist()},
        "plan_angle_deg": float(np.degrees(city.plan_angle)),
        "sun": {"azimuth_deg": config.sun_azimuth_deg, "elevation_deg": config.sun_elevation_deg,
                "direction_local": city.sun_dir.round(8).tolist(), "note": "azimuth clockwise from grid north (+Y)"},
        "terrain": {**city.terrain_params, "plan_half": city.plan_half, "river": city.river,
                    "water_level_z": city.water_level},
        "water": {"level_z": city.water_level, "river_centreline_local": river_line[:, :2].round(3).tolist(),
                  "bank_halfwidth": city.river["bank_halfwidth"]},
        "classes": list(CLASSES),
        "buildings": buildings,
        "trees": trees,
        "vehicles": vehicles,
        "roads": roads,
        "files": {"dsm": "dsm.tif", "dtm": "dtm.tif", "ortho": "ortho.tif", "ortho_semantics": "ortho_semantics.tif",
                  "transforms": "transforms.json", "preview": "preview.png"},
    }
    atomic_write_json(path, _jsonable(scene))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


__all__ = ["PRESETS", "SyntheticConfig", "build_city", "make_survey", "plan_flight"]
