"""The bad-input corpus: every reader refuses bad data with one line naming the file and the problem.

Each case builds a bad input in ``tmp_path`` and returns ``(action, offending_path)``; the test
asserts that ``action()`` raises :class:`SurveyError` / :class:`CitygenError` whose message is a
single line containing the offending path and the case's problem text.  CLI cases check that
``citygen ...`` exits 2 with a single stderr line, and that writers lose nothing already written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image, TiffImagePlugin

from citygen.errors import CitygenError
from survey_io import Camera, Georef, Survey, SurveyError, SurveyImage, read_transforms, write_transforms
from survey_io.blocks_exchange import read_blocks_exchange
from survey_io.colmap import read_colmap, write_colmap

GEOREF = Georef("EPSG:32633", (500000.0, 5000000.0, 100.0))
CASES: list = []
# rasterio warns before read_geotiff refuses a TIFF without georeferencing; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def case(problem: str):
    """Register a builder ``fn(tmp_path) -> (action, offending_path)`` whose error must contain ``problem``."""
    def register(fn: Callable[[Path], tuple[Callable[[], object], Path]]):
        CASES.append(pytest.param(fn, problem, id=fn.__name__.removeprefix("case_")))
        return fn
    return register


# -- transforms.json -----------------------------------------------------------------------
def _good_meta() -> dict:
    nadir = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 80.0], [0.0, 0.0, 0.0, 1.0]]
    return {"w": 64, "h": 48, "fl_x": 50.0, "fl_y": 50.0, "cx": 32.0, "cy": 24.0, "camera_model": "PINHOLE",
            "georef": GEOREF.to_dict(),
            "frames": [{"file_path": "images/a.png", "transform_matrix": nadir},
                       {"file_path": "images/b.png", "transform_matrix": [r[:] for r in nadir]}]}


def _transforms(tmp_path: Path, edit: Callable[[dict], None], text: str | None = None):
    path = tmp_path / "transforms.json"
    meta = _good_meta()
    edit(meta)
    path.write_text(text if text is not None else json.dumps(meta))
    return (lambda: read_transforms(path)), path


def _set_matrix(meta: dict, value) -> None:
    meta["frames"][1]["transform_matrix"] = value


@case("not valid JSON")
def case_transforms_malformed_json(tmp_path):
    return _transforms(tmp_path, lambda m: None, text='{"frames": [{"file_path": "a.png",')


@case("file not found")
def case_transforms_missing_file(tmp_path):
    path = tmp_path / "nope" / "transforms.json"
    return (lambda: read_transforms(path)), path


@case("expected an object with a 'frames' list")
def case_transforms_frames_not_a_list(tmp_path):
    return _transforms(tmp_path, lambda m: m.update(frames={"a": 1}))


@case("'frames' is empty")
def case_transforms_empty_frames(tmp_path):
    return _transforms(tmp_path, lambda m: m.update(frames=[]))


@case("contains NaN or inf")
def case_transforms_nan_pose(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][1]["transform_matrix"][0].__setitem__(3, float("nan")))


@case("contains NaN or inf")
def case_transforms_inf_pose(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][1]["transform_matrix"][2].__setitem__(2, float("inf")))


@case("is not rigid")
def case_transforms_scaled_pose(tmp_path):
    return _transforms(tmp_path, lambda m: _set_matrix(m, (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()))


@case("is not rigid")
def case_transforms_sheared_pose(tmp_path):
    shear = np.eye(4)
    shear[0, 1] = 0.3
    return _transforms(tmp_path, lambda m: _set_matrix(m, shear.tolist()))


@case("is not rigid")
def case_transforms_mirrored_pose(tmp_path):
    return _transforms(tmp_path, lambda m: _set_matrix(m, np.diag([-1.0, 1.0, 1.0, 1.0]).tolist()))


@case("must be 4x4 (or 3x4), got shape (3, 3)")
def case_transforms_wrong_matrix_shape(tmp_path):
    return _transforms(tmp_path, lambda m: _set_matrix(m, np.eye(3).tolist()))


@case("transform_matrix is not numeric")
def case_transforms_ragged_matrix(tmp_path):
    return _transforms(tmp_path, lambda m: _set_matrix(m, [[1, 0, 0, 0], [0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))


@case("has last row")
def case_transforms_projective_last_row(tmp_path):
    bad = np.eye(4)
    bad[3, 2] = 0.5
    return _transforms(tmp_path, lambda m: _set_matrix(m, bad.tolist()))


@case("escapes the dataset folder")
def case_transforms_file_path_dotdot(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][1].update(file_path="../../etc/passwd"))


@case("escapes the dataset folder")
def case_transforms_file_path_absolute(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][1].update(file_path="/etc/passwd"))


@case("escapes the dataset folder")
def case_transforms_semantics_path_escapes(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][0].update(semantics_file_path="../labels/a.png"))


@case("unknown CRS 'EPSG:999999'")
def case_transforms_unknown_crs(tmp_path):
    return _transforms(tmp_path, lambda m: m["georef"].update(crs="EPSG:999999"))


@case("is not projected")
def case_transforms_geographic_crs(tmp_path):
    return _transforms(tmp_path, lambda m: m["georef"].update(crs="EPSG:4326"))


@case("georef needs 'crs' and 'origin'")
def case_transforms_georef_without_origin(tmp_path):
    return _transforms(tmp_path, lambda m: m["georef"].pop("origin"))


@case("no 'georef' in the file and none given")
def case_transforms_no_georef(tmp_path):
    return _transforms(tmp_path, lambda m: m.pop("georef"))


@case("test_filenames names images that are not in 'frames'")
def case_transforms_test_filenames_missing_frames(tmp_path):
    return _transforms(tmp_path, lambda m: m.update(test_filenames=["images/a.png", "images/zzz.png"]))


@case("duplicate image name 'images/a.png'")
def case_transforms_duplicate_image_names(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][1].update(file_path="images/a.png"))


@case("positive focal length")
def case_transforms_negative_focal(tmp_path):
    return _transforms(tmp_path, lambda m: m["frames"][1].update(fl_x=-50.0))


@case("camera size must be positive")
def case_transforms_zero_width(tmp_path):
    return _transforms(tmp_path, lambda m: m.update(w=0))


@case("missing intrinsics ['fl_x', 'fl_y']")
def case_transforms_missing_focal(tmp_path):
    return _transforms(tmp_path, lambda m: (m.pop("fl_x"), m.pop("fl_y")))


@case("unknown camera_model 'EQUIRECTANGULAR'")
def case_transforms_unknown_camera_model(tmp_path):
    return _transforms(tmp_path, lambda m: m.update(camera_model="EQUIRECTANGULAR"))


# -- COLMAP --------------------------------------------------------------------------------
def _colmap_model(tmp_path: Path, text: bool) -> Path:
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])
    c2w[:3, 3] = [0.0, 0.0, 50.0]
    survey = Survey(tmp_path, [Camera(64, 48, 50.0, 50.0, 32.0, 24.0)],
                    [SurveyImage("a.png", 0, c2w), SurveyImage("b.png", 0, c2w.copy())], GEOREF)
    return write_colmap(survey, tmp_path / "sparse", text=text, points=(np.zeros((3, 3)), np.zeros((3, 3), np.uint8)))


@case("truncated COLMAP binary file")
def case_colmap_truncated_images_bin(tmp_path):
    model = _colmap_model(tmp_path, text=False)
    data = (model / "images.bin").read_bytes()
    (model / "images.bin").write_bytes(data[:40])
    return (lambda: read_colmap(model, tmp_path)), model / "images.bin"


@case("truncated COLMAP binary file")
def case_colmap_truncated_points_bin(tmp_path):
    model = _colmap_model(tmp_path, text=False)
    data = (model / "points3D.bin").read_bytes()
    (model / "points3D.bin").write_bytes(data[:-3])
    return (lambda: read_colmap(model, tmp_path)), model / "points3D.bin"


@case("uses COLMAP camera model FULL_OPENCV, which citygen does not support")
def case_colmap_unsupported_camera_model(tmp_path):
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera.create_from_model_name(1, "FULL_OPENCV", 50.0, 64, 48))
    rec.add_image_with_trivial_frame(pycolmap.Image(name="a.png", camera_id=1, image_id=1),
                                     pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3)))
    model = tmp_path / "sparse"
    model.mkdir()
    rec.write_text(str(model))
    return (lambda: read_colmap(model, tmp_path, georef=GEOREF)), model / "cameras.txt"


@case("unknown COLMAP camera model 'PANORAMIC'")
def case_colmap_unknown_model_name(tmp_path):
    model = _colmap_model(tmp_path, text=True)
    (model / "cameras.txt").write_text("1 PANORAMIC 64 48 50 32 24\n")
    return (lambda: read_colmap(model, tmp_path)), model / "cameras.txt"


@case("takes 4 parameters, got 2")
def case_colmap_wrong_param_count(tmp_path):
    model = _colmap_model(tmp_path, text=True)
    (model / "cameras.txt").write_text("# comment\n1 PINHOLE 64 48 50 50\n")
    return (lambda: read_colmap(model, tmp_path)), model / "cameras.txt"


@case("has no POINTS2D line")
def case_colmap_truncated_images_txt(tmp_path):
    model = _colmap_model(tmp_path, text=True)
    lines = [ln for ln in (model / "images.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    (model / "images.txt").write_text(lines[0] + "\n")
    return (lambda: read_colmap(model, tmp_path)), model / "images.txt"


@case("has no georeferencing")
def case_colmap_without_georef(tmp_path):
    model = _colmap_model(tmp_path, text=True)
    (model / "georef.json").unlink()
    return (lambda: read_colmap(model, tmp_path)), model


@case("not valid JSON")
def case_colmap_corrupt_georef_sidecar(tmp_path):
    model = _colmap_model(tmp_path, text=False)
    (model / "georef.json").write_text("{\"crs\": ")
    return (lambda: read_colmap(model, tmp_path)), model / "georef.json"


# -- BlocksExchange --------------------------------------------------------------------------
_BLOCK = """<?xml version="1.0" encoding="utf-8"?>
<BlocksExchange version="2.1">
  <SpatialReferenceSystems><SRS><Id>0</Id><Definition>{srs}</Definition></SRS></SpatialReferenceSystems>
  <Block><SRSId>0</SRSId><Photogroups><Photogroup>
    <ImageDimensions><Width>64</Width><Height>48</Height></ImageDimensions>
    <FocalLengthPixels>50</FocalLengthPixels>
    <Photo><Id>0</Id><ImagePath>a.png</ImagePath>{pose}</Photo>
  </Photogroup></Photogroups></Block>
</BlocksExchange>
"""
_POSE = ("<Pose><Rotation><Omega>180</Omega><Phi>0</Phi><Kappa>0</Kappa></Rotation>"
         "<Center><x>500010</x><y>5000020</y><z>180</z></Center></Pose>")


def _block(tmp_path: Path, text: str):
    path = tmp_path / "block.xml"
    path.write_text(text)
    return (lambda: read_blocks_exchange(path)), path


@case("not valid XML")
def case_blocks_exchange_malformed_xml(tmp_path):
    return _block(tmp_path, _BLOCK.format(srs="EPSG:32633", pose=_POSE)[:300])


@case("missing <Pose>")
def case_blocks_exchange_missing_pose(tmp_path):
    return _block(tmp_path, _BLOCK.format(srs="EPSG:32633", pose=""))


@case("unknown or unsupported spatial reference system 'EPSG:999999'")
def case_blocks_exchange_unknown_srs(tmp_path):
    return _block(tmp_path, _BLOCK.format(srs="EPSG:999999", pose=_POSE))


@case("cannot transform from 'GCS_Mars_2000' to 'EPSG:4978'")
def case_blocks_exchange_srs_on_another_planet(tmp_path):
    return _block(tmp_path, _BLOCK.format(srs="Mars2000", pose=_POSE))


# -- GeoTIFF ----------------------------------------------------------------------------------
@case("not a readable GeoTIFF")
def case_geotiff_corrupt(tmp_path):
    from survey_io.geotiff import read_geotiff

    path = tmp_path / "dsm.tif"
    path.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    return (lambda: read_geotiff(path)), path


@case("GeoTIFF has no CRS")
def case_geotiff_without_crs(tmp_path):
    from survey_io.geotiff import read_geotiff

    path = tmp_path / "plain.tif"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return (lambda: read_geotiff(path)), path


# -- drone folders ----------------------------------------------------------------------------
def _jpeg(path: Path, lat: float | None = 47.0, lon: float = 8.0, size=(64, 48), seed: int = 0) -> Path:
    """A JPEG with DJI make/model, a focal length and (unless lat is None) EXIF GPS."""
    Q = TiffImagePlugin.IFDRational
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "DJI", "FC6310"
    exif.get_ifd(0x8769).update({0x920A: Q(880, 100), 0xA405: 24})
    if lat is not None:
        def dms(v):
            d, m = int(v), int((v - int(v)) * 60)
            return (Q(d, 1), Q(m, 1), Q(round(((v - d) * 60 - m) * 60 * 1000), 1000))
        exif.get_ifd(0x8825).update({1: "N", 2: dms(lat), 3: "E", 4: dms(lon), 5: b"\x00", 6: Q(100, 1)})
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, exif=exif, quality=90)
    return path


def _drone(folder: Path):
    from survey_io.drone import read_drone_folder

    return lambda: read_drone_folder(folder)


@case("no JPEG")
def case_drone_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing")
    return _drone(tmp_path), tmp_path


@case("not a folder")
def case_drone_missing_folder(tmp_path):
    return _drone(tmp_path / "nope"), tmp_path / "nope"


@case("truncated")
def case_drone_truncated_jpeg(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    bad = _jpeg(tmp_path / "b.jpg", lon=8.0001, size=(256, 192), seed=1)
    bad.write_bytes(bad.read_bytes()[:-2000])
    return _drone(tmp_path), bad


@case("GPS")
def case_drone_jpeg_without_gps(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    return _drone(tmp_path), _jpeg(tmp_path / "b.jpg", lat=None)


@case("mixed image sizes")
def case_drone_mixed_image_sizes(tmp_path):
    _jpeg(tmp_path / "a.jpg", size=(64, 48))
    return _drone(tmp_path), _jpeg(tmp_path / "b.jpg", lon=8.0001, size=(48, 64))


@case("duplicate image name")
def case_drone_duplicate_names(tmp_path):
    _jpeg(tmp_path / "IMG_7.jpg")
    _jpeg(tmp_path / "IMG_7.JPEG", lon=8.0001)
    return _drone(tmp_path), tmp_path / "IMG_7"


# -- the test --------------------------------------------------------------------------------
@pytest.mark.parametrize("build,problem", CASES)
def test_bad_input_is_refused_naming_file_and_problem(tmp_path, build, problem):
    action, offending = build(tmp_path)
    with pytest.raises((SurveyError, CitygenError)) as err:
        action()
    message = str(err.value)
    assert "\n" not in message
    assert str(offending) in message
    assert problem in message


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


# -- the command line --------------------------------------------------------------------------
def _cli(argv: list[str], capsys) -> str:
    from citygen.cli import entrypoint

    assert entrypoint(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_cli_plan_with_malformed_transforms(tmp_path, capsys):
    path = tmp_path / "bad" / "transforms.json"
    path.parent.mkdir()
    path.write_text('{"frames": [')
    line = _cli(["plan", "--data", str(path), "--out", str(tmp_path / "plan")], capsys)
    assert str(path) in line and "not valid JSON" in line
    assert not (tmp_path / "plan" / "plan.json").exists()


def test_cli_plan_with_nan_pose(tmp_path, capsys):
    _, path = _transforms(tmp_path, lambda m: m["frames"][0]["transform_matrix"][1].__setitem__(1, float("nan")))
    line = _cli(["plan", "--data", str(path), "--out", str(tmp_path / "plan")], capsys)
    assert str(path) in line and "NaN or inf" in line


def test_cli_ingest_empty_folder(tmp_path, capsys):
    empty = tmp_path / "flight"
    empty.mkdir()
    line = _cli(["ingest", str(empty), "--out", str(tmp_path / "out")], capsys)
    assert str(empty) in line and "no JPEG" in line
    assert not (tmp_path / "out" / "transforms.json").exists()


def test_cli_status_missing_tile(tmp_path, capsys):
    line = _cli(["status", str(tmp_path / "no_tile")], capsys)
    assert str(tmp_path / "no_tile") in line and "not a folder" in line


# -- writers lose nothing already written --------------------------------------------------------
def _valid_survey(root: Path) -> Survey:
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])
    return Survey(root, [Camera(64, 48, 50.0, 50.0, 32.0, 24.0)], [SurveyImage("a.png", 0, c2w)], GEOREF)


@pytest.mark.parametrize("breakage,problem", [
    (lambda s: s.images[0].c2w.__setitem__((0, 0), np.nan), "NaN or inf"),
    (lambda s: s.images[0].c2w.__setitem__((0, 0), 3.0), "not rigid"),
    (lambda s: s.images.append(SurveyImage("a.png", 0, np.eye(4))), "duplicate image name"),
    (lambda s: s.images.append(SurveyImage("../x.png", 0, np.eye(4))), "escapes the dataset folder"),
    (lambda s: setattr(s, "test_names", ["missing.png"]), "held-out names not in the survey"),
], ids=["nan", "scaled", "duplicate", "escape", "test-names"])
def test_write_transforms_keeps_old_file_on_invalid_survey(tmp_path, breakage, problem):
    path = write_transforms(_valid_survey(tmp_path), tmp_path / "transforms.json")
    before = path.read_bytes()
    bad = _valid_survey(tmp_path)
    breakage(bad)
    with pytest.raises(SurveyError, match=problem) as err:
        write_transforms(bad, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transforms.json"]  # no temp files left behind


def test_write_colmap_keeps_old_model_when_a_camera_cannot_be_written(tmp_path):
    model = write_colmap(_valid_survey(tmp_path), tmp_path / "sparse", text=True)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    bad = _valid_survey(tmp_path)
    bad.cameras[0] = Camera(64, 48, 50.0, 51.0, 32.0, 24.0, "SIMPLE_PINHOLE")
    with pytest.raises(SurveyError, match="one focal length"):
        write_colmap(bad, model, text=True)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
