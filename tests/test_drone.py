"""Drone folder reader: EXIF GPS / focal length, DJI XMP, prior poses, and its input checks."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pyproj
import pytest
from _paths import CALITERRA
from PIL import Image, TiffImagePlugin

from survey_io import SurveyError
from survey_io.drone import read_drone_folder
from survey_io.exif import gimbal_to_c2w_rotation, parse_dji_xmp, read_image_metadata
from survey_io.georef import Georef

REAL = CALITERRA

Q = TiffImagePlugin.IFDRational

# Central meridian of UTM zone 14 is -99: there grid north is true north.
LON0, LAT0 = -99.0, 30.0


def _dms(value: float) -> tuple:
    """Degrees -> EXIF (d, m, s) rationals, seconds to 1e-6 (as cameras write them)."""
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    s = round(((value - d) * 60 - m) * 60 * 1_000_000)
    return (Q(d, 1), Q(m, 1), Q(s, 1_000_000))


def _dms_value(dms: tuple) -> float:
    return float(dms[0]) + float(dms[1]) / 60 + float(dms[2]) / 3600


def dji_xmp(attributes: dict[str, float] | None = None, elements: dict[str, float] | None = None) -> bytes:
    attrs = " ".join(f'drone-dji:{k}="{v:+.6f}"' for k, v in (attributes or {}).items())
    elems = "".join(f"<drone-dji:{k}>{v}</drone-dji:{k}>" for k, v in (elements or {}).items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/" {attrs}>{elems}'
        "</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
    ).encode()


def make_jpeg(path: Path, lat: float | None, lon: float | None, alt: float = 100.0, *, size=(64, 48),
              make="DJI", model="FC6310", focal_mm=8.8, f35: int | None = 24, fp_res: float | None = None,
              xmp: bytes | None = None, alt_ref: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    ifd = exif.get_ifd(0x8769)
    if focal_mm is not None:
        ifd[0x920A] = Q(round(focal_mm * 100), 100)
    if f35 is not None:
        ifd[0xA405] = f35
    if fp_res is not None:
        ifd[0xA20E], ifd[0xA210] = Q(round(fp_res * 1000), 1000), 2
    if lat is not None:
        gps = exif.get_ifd(0x8825)
        gps.update({1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon),
                    5: bytes([alt_ref]), 6: Q(round(abs(alt) * 1000), 1000)})
    kwargs = {"xmp": xmp} if xmp is not None else {}
    im.save(path, exif=exif, quality=90, **kwargs)
    return path


# -- EXIF / XMP parsing -----------------------------------------------------------------
def test_gps_refs_rationals_and_below_sea_level(tmp_path):
    p = make_jpeg(tmp_path / "a.jpg", -33.856789, -151.215123, alt=12.345, alt_ref=1)
    m = read_image_metadata(p)
    assert m.lat == pytest.approx(-_dms_value(_dms(-33.856789)), abs=1e-12)
    assert m.lon == pytest.approx(-_dms_value(_dms(-151.215123)), abs=1e-12)
    assert m.lat == pytest.approx(-33.856789, abs=1e-8) and m.lon == pytest.approx(-151.215123, abs=1e-8)
    assert m.alt == pytest.approx(-12.345)
    assert (m.make, m.model, m.width, m.height) == ("DJI", "FC6310", 64, 48)


def test_focal_length_sources(tmp_path):
    # 35 mm equivalent: 36 mm maps onto the long side.
    m = read_image_metadata(make_jpeg(tmp_path / "a.jpg", 10, 10, f35=24))
    assert (m.focal_px, m.focal_source) == (pytest.approx(24 / 36 * 64), "35mm_equivalent")
    # Focal plane resolution (pixels per inch) wins: it is the physical pixel pitch.
    m = read_image_metadata(make_jpeg(tmp_path / "b.jpg", 10, 10, focal_mm=4.5, f35=24, fp_res=250.0))
    assert m.focal_px == pytest.approx(4.5 * 250.0 / 25.4, rel=1e-9) and m.focal_source == "focal_plane_resolution"
    # Neither: the sensor table (FC6310: 13.2 mm wide).
    m = read_image_metadata(make_jpeg(tmp_path / "c.jpg", 10, 10, focal_mm=8.8, f35=None))
    assert m.focal_px == pytest.approx(8.8 / 13.2 * 64) and m.focal_source == "sensor_table"
    m = read_image_metadata(make_jpeg(tmp_path / "d.jpg", 10, 10, make="Acme", model="X", f35=None))
    assert m.focal_px is None


def test_dji_xmp_attribute_and_element_forms(tmp_path):
    fields = {"GimbalPitchDegree": -45.5, "GimbalYawDegree": -120.25, "GimbalRollDegree": 0.5,
              "FlightYawDegree": 33.0, "RelativeAltitude": 80.1, "AbsoluteAltitude": 250.7}
    assert parse_dji_xmp(dji_xmp(attributes=fields)) == pytest.approx(fields)
    assert parse_dji_xmp(dji_xmp(elements=fields)) == pytest.approx(fields)
    # Not well-formed XML (seen in the wild): the tolerant fallback still reads the fields.
    broken = dji_xmp(attributes=fields).replace(b"</rdf:RDF>", b"")
    assert parse_dji_xmp(broken) == pytest.approx(fields)
    m = read_image_metadata(make_jpeg(tmp_path / "a.jpg", 10, 10, xmp=dji_xmp(elements=fields)))
    assert m.dji == pytest.approx(fields) and m.has_gimbal


def test_gimbal_rotation_convention():
    # Nadir, heading north: looking down, image top to the north, image right to the east.
    R = gimbal_to_c2w_rotation(0.0, -90.0, 0.0)
    np.testing.assert_allclose(R, [[1, 0, 0], [0, -1, 0], [0, 0, -1]], atol=1e-12)
    # Horizontal, heading east: looking east, image down is world down, image right is south.
    R = gimbal_to_c2w_rotation(90.0, 0.0, 0.0)
    np.testing.assert_allclose(R[:, 2], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(R[:, 1], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(R[:, 0], [0, -1, 0], atol=1e-12)
    # Positive roll lowers the image's right side.
    R = gimbal_to_c2w_rotation(0.0, 0.0, 10.0)
    assert R[2, 0] < 0 and math.isclose(R[2, 0], -math.sin(math.radians(10)), abs_tol=1e-12)
    for angles in [(37.0, -63.0, 4.0), (-170.0, -10.0, -2.0)]:
        R = gimbal_to_c2w_rotation(*angles)
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)


# -- the folder reader -------------------------------------------------------------------
def _grid_heading_of_true_north(lon: float, lat: float, crs: str) -> float:
    """Independent of the reader: project a point a little north and measure its grid bearing."""
    t = pyproj.Transformer.from_crs("EPSG:4979", crs, always_xy=True)
    e0, n0 = t.transform(lon, lat)
    e1, n1 = t.transform(lon, lat + 1e-4)
    return math.degrees(math.atan2(e1 - e0, n1 - n0))


def test_poses_from_gps_and_gimbal(tmp_path):
    georef = Georef.from_lonlat(LON0 + 2.5, LAT0, 200.0)  # off the central meridian: grid north != true north
    shots = [(LAT0 + 0.0001 * i, LON0 + 2.5 + 0.00005 * i, 300.0 + i, (-90.0 + 10 * i, 30.0 * i - 60.0, i - 1.0))
             for i in range(4)]
    for i, (lat, lon, alt, (pitch, yaw, roll)) in enumerate(shots):
        xmp = dji_xmp(attributes={"GimbalPitchDegree": pitch, "GimbalYawDegree": yaw, "GimbalRollDegree": roll})
        make_jpeg(tmp_path / f"DJI_{i:04d}.JPG", lat, lon, alt, xmp=xmp, seed=i)
    survey = read_drone_folder(tmp_path, georef=georef)
    assert [im.name for im in survey.images] == [f"DJI_{i:04d}.JPG" for i in range(4)]
    assert len(survey.cameras) == 1 and survey.cameras[0].fl_x == pytest.approx(24 / 36 * 64)
    to_crs = pyproj.Transformer.from_crs("EPSG:4979", georef.crs, always_xy=True)
    convergence = _grid_heading_of_true_north(LON0 + 2.5, LAT0, georef.crs)
    assert abs(convergence) > 1.0  # the test would not see a missing correction otherwise
    for im, (lat, lon, alt, (pitch, yaw, roll)) in zip(survey.images, shots):
        e, n, h = to_crs.transform(_dms_value(_dms(lon)) * np.sign(lon), _dms_value(_dms(lat)), alt)
        expected = np.array([e, n, h]) - np.array(georef.origin)
        np.testing.assert_allclose(im.c2w[:3, 3], expected, atol=1e-6)
        np.testing.assert_allclose(im.gps, expected, atol=1e-6)
        assert im.pose_is_prior
        # Orientation: the gimbal angles with the compass yaw turned into a grid heading.
        R_expected = gimbal_to_c2w_rotation(yaw + convergence, pitch, roll)
        angle = math.degrees(math.acos(np.clip((np.trace(R_expected.T @ im.c2w[:3, :3]) - 1) / 2, -1, 1)))
        assert angle < 0.01


def test_nadir_prior_heading_follows_flight(tmp_path):
    # No XMP: nadir, with the top of the image along the flight direction (here due east, then north).
    path = [(LAT0, LON0), (LAT0, LON0 + 0.0002), (LAT0, LON0 + 0.0004), (LAT0 + 0.0002, LON0 + 0.0004),
            (LAT0 + 0.0004, LON0 + 0.0004)]
    for i, (lat, lon) in enumerate(path):
        make_jpeg(tmp_path / f"IMG_{i}.jpg", lat, lon, 120.0, seed=i)
    survey = read_drone_folder(tmp_path)
    ups = [-im.c2w[:3, 1] for im in survey.images]  # image "up" in the world
    for im in survey.images:
        np.testing.assert_allclose(im.c2w[:3, 2], [0, 0, -1], atol=1e-12)
    assert ups[0] == pytest.approx([1, 0, 0], abs=1e-2)
    assert ups[4] == pytest.approx([0, 1, 0], abs=1e-2)
    # Auto georef: the UTM zone of the data, origin at the mean position, height 0 without DJI altitudes.
    assert survey.georef.crs == "EPSG:32614"
    gps = np.stack([im.gps for im in survey.images])
    np.testing.assert_allclose(gps[:, :2].mean(axis=0), [0, 0], atol=1e-6)
    np.testing.assert_allclose(gps[:, 2], 120.0, atol=1e-9)


def test_auto_georef_height_is_takeoff_altitude(tmp_path):
    for i in range(3):
        xmp = dji_xmp(attributes={"GimbalPitchDegree": -90, "GimbalYawDegree": 0,
                                  "AbsoluteAltitude": 350.0 + i, "RelativeAltitude": 100.0 + i})
        make_jpeg(tmp_path / f"DJI_{i}.JPG", 47.0 + 1e-4 * i, 8.0, 350.0 + i, xmp=xmp, seed=i)
    survey = read_drone_folder(tmp_path)
    assert survey.georef.crs == "EPSG:32632"
    assert survey.georef.origin[2] == pytest.approx(250.0)
    np.testing.assert_allclose([im.gps[2] for im in survey.images], [100.0, 101.0, 102.0], atol=1e-9)


def test_images_subfolder_and_real_caliterra_positions():
    """The real set: positions against the CSV read from the original files by another tool."""
    if not REAL.is_dir():
        pytest.fail(f"real data set missing at {REAL}")
    survey = read_drone_folder(REAL)  # the JPEGs are in REAL/images
    assert len(survey.images) == 40 and survey.root == REAL / "images"
    assert survey.georef.crs == "EPSG:32614"
    cam = survey.cameras[0]
    assert len(survey.cameras) == 1 and (cam.width, cam.height) == (1000, 750)
    # FocalLength 4.5 mm over a 6.197 mm wide sensor (FocalPlaneXResolution), 1000 px.
    assert cam.fl_x == pytest.approx(4.5 / (1000 / 4098.360655737705 * 25.4) * 1000, rel=1e-6)
    with open(REAL / "exif_gps_original.csv") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    for im in survey.images:
        r = rows[im.name]
        expected = survey.georef.lonlat_to_local(np.array([float(r["lon"]), float(r["lat"]), float(r["gps_alt_m"])]))
        np.testing.assert_allclose(im.gps, expected, atol=1e-3)
        np.testing.assert_allclose(im.c2w[:3, 2], [0, 0, -1], atol=1e-12)  # no gimbal data: nadir prior


# -- bad input ---------------------------------------------------------------------------
def _error(folder) -> SurveyError:
    with pytest.raises(SurveyError) as info:
        read_drone_folder(folder)
    assert "\n" not in str(info.value)
    return info.value


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    err = _error(tmp_path)
    assert err.path == tmp_path and "no JPEG" in err.reason
    assert "not a folder" in _error(tmp_path / "missing").reason


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_jpeg_names_the_file(tmp_path, cut):
    make_jpeg(tmp_path / "ok.jpg", 10, 10, seed=1)
    p = make_jpeg(tmp_path / "bad.jpg", 10, 10, size=(256, 192), seed=2)
    data = p.read_bytes()
    p.write_bytes(data[:int(len(data) * cut)])
    err = _error(tmp_path)
    assert err.path == p and "truncated" in err.reason


def test_garbage_file_names_the_file(tmp_path):
    make_jpeg(tmp_path / "ok.jpg", 10, 10)
    (tmp_path / "x.jpeg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    assert _error(tmp_path).path == tmp_path / "x.jpeg"


def test_missing_gps_names_the_file(tmp_path):
    make_jpeg(tmp_path / "a.jpg", 10, 10)
    p = make_jpeg(tmp_path / "b.jpg", None, None)
    err = _error(tmp_path)
    assert err.path == p and "GPS" in err.reason


def test_non_finite_gps_names_the_file(tmp_path):
    p = tmp_path / "a.jpg"
    make_jpeg(p, 10, 10)
    with Image.open(p) as im:
        exif = im.getexif()
        exif.get_ifd(0x8825)[6] = Q(5, 0)  # altitude 5/0
        im.save(tmp_path / "b.jpg", exif=exif)
    p.unlink()
    err = _error(tmp_path)
    assert err.path == tmp_path / "b.jpg" and "not finite" in err.reason


def test_mixed_sizes_within_one_camera(tmp_path):
    make_jpeg(tmp_path / "a.jpg", 10, 10, size=(64, 48))
    p = make_jpeg(tmp_path / "b.jpg", 10, 10.0001, size=(48, 64))
    err = _error(tmp_path)
    assert err.path == p and "mixed image sizes" in err.reason
    # A different camera model may have its own size.
    p.unlink()
    make_jpeg(tmp_path / "b.jpg", 10, 10.0001, size=(48, 64), model="FC220")
    assert len(read_drone_folder(tmp_path).cameras) == 2


def test_duplicate_names_by_case_or_extension(tmp_path):
    make_jpeg(tmp_path / "IMG_1.jpg", 10, 10)
    make_jpeg(tmp_path / "IMG_1.JPEG", 10, 10.0001)
    err = _error(tmp_path)
    assert "duplicate image name" in err.reason and "IMG_1" in str(err)


# -- the synthetic city (ground truth poses from its transforms.json) ---------------------------
def test_synthetic_city_priors_match_ground_truth(tmp_path):
    """The tiny preset's flight, rendered at 64x48 (same 4:3 frame, so the same poses) to stay fast."""
    from dataclasses import replace

    from survey_io.nerfstudio import read_transforms
    from survey_io.synthetic import PRESETS, make_survey

    config = replace(PRESETS["tiny"], width=64, height=48, antialias=False, shadows=False, render_rasters=False)
    make_survey(tmp_path / "city", config, seed=0, progress=False)
    truth = read_transforms(tmp_path / "city" / "transforms.json")
    image_dirs = {Path(im.name).parent for im in truth.images}
    assert len(image_dirs) == 1
    image_dir = truth.root / image_dirs.pop()
    prior = read_drone_folder(image_dir, georef=truth.georef)
    by_name = {Path(im.name).name: im for im in truth.images}
    assert sorted(by_name) == sorted(im.name for im in prior.images)
    for im in prior.images:
        gt = by_name[im.name]
        np.testing.assert_allclose(im.c2w[:3, 3], gt.c2w[:3, 3], atol=1e-3)
        cos = (np.trace(gt.c2w[:3, :3].T @ im.c2w[:3, :3]) - 1) / 2
        assert math.degrees(math.acos(np.clip(cos, -1, 1))) < 0.1, im.name
    truth_cam, prior_cam = truth.cameras[0], prior.cameras[0]
    assert len(prior.cameras) == 1 and prior_cam.fl_x == pytest.approx(truth_cam.fl_x, rel=1e-6)
    assert (prior_cam.cx, prior_cam.cy) == pytest.approx((truth_cam.cx, truth_cam.cy), abs=1e-5)
    # Without a georef: same UTM zone, origin height at the take-off point (the truth's origin).
    auto = read_drone_folder(image_dir)
    assert auto.georef.crs == truth.georef.crs
    assert auto.georef.origin[2] == pytest.approx(truth.georef.origin[2], abs=1e-3)
