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
def _jpeg(path: Path, lat: float | None = 47.0, lon: float = 8.0, size=(64, 48), seed: int = 0,
          lat_ref: str = "N", alt: int = 100, xmp: bytes | None = None) -> Path:
    """A JPEG with DJI make/model, a focal length, (unless lat is None) EXIF GPS and optional XMP."""
    Q = TiffImagePlugin.IFDRational
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "DJI", "FC6310"
    exif.get_ifd(0x8769).update({0x920A: Q(880, 100), 0xA405: 24})
    if lat is not None:
        def dms(v):
            d, m = int(v), int((v - int(v)) * 60)
            return (Q(d, 1), Q(m, 1), Q(round(((v - d) * 60 - m) * 60 * 1000), 1000))
        exif.get_ifd(0x8825).update({1: lat_ref, 2: dms(lat), 3: "E", 4: dms(lon), 5: b"\x00", 6: Q(alt, 1)})
    extra = {} if xmp is None else {"xmp": xmp}
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, exif=exif, quality=90,
                                                                                     **extra)
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


@case("empty file (0 bytes)")
def case_drone_zero_byte_jpeg(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"")
    return _drone(tmp_path), bad


@case("not a JPEG file")
def case_drone_png_named_jpg(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    bad = tmp_path / "b.jpg"
    Image.new("RGB", (64, 48)).save(bad, format="PNG")
    return _drone(tmp_path), bad


@case("GPS position (95.0, 8.0) is out of range")
def case_drone_gps_latitude_out_of_range(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    return _drone(tmp_path), _jpeg(tmp_path / "b.jpg", lat=95.0)


@case("GPS altitude 1e+07 m is not plausible")
def case_drone_gps_absurd_altitude(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    return _drone(tmp_path), _jpeg(tmp_path / "b.jpg", lon=8.0001, alt=10_000_000)


@case("km from the survey's median position")
def case_drone_gps_wrong_hemisphere(tmp_path):
    # Independent expectation: 47 N vs 47 S is ~10,400 km of northing, far beyond one flight area.
    _jpeg(tmp_path / "a.jpg")
    _jpeg(tmp_path / "b.jpg", lon=8.0001)
    return _drone(tmp_path), _jpeg(tmp_path / "c.jpg", lon=8.0002, lat_ref="S")


_DJI_XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/" '
            'drone-dji:GimbalPitchDegree="{pitch}" drone-dji:GimbalYawDegree="0"/></rdf:RDF></x:xmpmeta>')


@case("XMP packet declares a DTD or entities")
def case_drone_xmp_entity_expansion(tmp_path):
    # A bare rdf:RDF packet (no x:xmpmeta wrapper) is parsed whole, DTD included.
    rdf = _DJI_XMP.format(pitch="&b;").removeprefix('<x:xmpmeta xmlns:x="adobe:ns:meta/">').removesuffix("</x:xmpmeta>")
    bomb = '<?xml version="1.0"?><!DOCTYPE rdf:RDF [<!ENTITY a "-90"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>' + rdf
    _jpeg(tmp_path / "a.jpg")
    return _drone(tmp_path), _jpeg(tmp_path / "b.jpg", lon=8.0001, xmp=bomb.encode())


@case("DJI XMP field GimbalPitchDegree is not finite")
def case_drone_xmp_nan_gimbal(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    return _drone(tmp_path), _jpeg(tmp_path / "b.jpg", lon=8.0001, xmp=_DJI_XMP.format(pitch="nan").encode())


# -- image files against the survey ------------------------------------------------------------
def _survey_with_images(tmp_path: Path, edit: Callable[[dict], None] = lambda m: None,
                        sizes=((64, 48), (64, 48))):
    """transforms.json (two 64x48 cameras' frames) plus its two images at ``sizes``; the action
    checks the image files the way planning and training do."""
    (tmp_path / "images").mkdir()
    for name, size in zip(("a.png", "b.png"), sizes):
        Image.new("RGB", size).save(tmp_path / "images" / name)
    _, path = _transforms(tmp_path, edit)
    return (lambda: read_transforms(path).check_image_files()), path


@case("image is 32x24 pixels, but the survey says 64x48 (w, h)")
def case_images_smaller_than_w_h(tmp_path):
    action, _ = _survey_with_images(tmp_path, sizes=((64, 48), (32, 24)))
    return action, tmp_path / "images" / "b.png"


@case("image is 64x48 pixels, but the survey says 48x64 (w, h)")
def case_images_disagree_with_per_frame_w_h(tmp_path):
    action, _ = _survey_with_images(tmp_path, lambda m: m["frames"][0].update(w=48, h=64, cx=24.0, cy=32.0))
    return action, tmp_path / "images" / "a.png"


@case("image file not found")
def case_images_missing_file(tmp_path):
    action, _ = _survey_with_images(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    return action, tmp_path / "images" / "b.png"


@case("not an image file")
def case_images_not_an_image(tmp_path):
    action, _ = _survey_with_images(tmp_path)
    (tmp_path / "images" / "a.png").write_text("<html>404 not found</html>")
    return action, tmp_path / "images" / "a.png"


@case("image file is empty (0 bytes)")
def case_images_zero_bytes(tmp_path):
    action, _ = _survey_with_images(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"")
    return action, tmp_path / "images" / "b.png"


@case("camera intrinsics must be finite")
def case_transforms_nan_principal_point(tmp_path):
    return _transforms(tmp_path, lambda m: m.update(cx=float("nan")))


@case("georef needs 'crs' and 'origin' (3 numbers)")
def case_transforms_georef_origin_not_numbers(tmp_path):
    return _transforms(tmp_path, lambda m: m["georef"].update(origin=["east", "north", "up"]))


# -- COLMAP, more ------------------------------------------------------------------------------
@case("truncated COLMAP binary file: ends inside the track of point record 0")
def case_colmap_track_length_beyond_file(tmp_path):
    import struct

    model = _colmap_model(tmp_path, text=False)
    data = bytearray((model / "points3D.bin").read_bytes())
    # count Q, then point 0: id Q, xyz 3d, rgb 3B, error d -> its track length Q sits at byte 51
    struct.pack_into("<Q", data, 8 + struct.calcsize("<Q3d3Bd"), 1 << 40)
    (model / "points3D.bin").write_bytes(bytes(data))
    return (lambda: read_colmap(model, tmp_path)), model / "points3D.bin"


@case("camera 1 has unknown COLMAP camera model id 99")
def case_colmap_unknown_model_id_bin(tmp_path):
    import struct

    model = _colmap_model(tmp_path, text=False)
    data = bytearray((model / "cameras.bin").read_bytes())
    struct.pack_into("<i", data, 8 + 4, 99)  # count Q, camera_id i, then model_id i
    (model / "cameras.bin").write_bytes(bytes(data))
    return (lambda: read_colmap(model, tmp_path)), model / "cameras.bin"


@case("5 unexpected bytes after the last record")
def case_colmap_trailing_garbage_bin(tmp_path):
    model = _colmap_model(tmp_path, text=False)
    with open(model / "images.bin", "ab") as f:
        f.write(b"\x00junk")
    return (lambda: read_colmap(model, tmp_path)), model / "images.bin"


@case("incomplete COLMAP model: missing points3D.bin")
def case_colmap_missing_points_file(tmp_path):
    model = _colmap_model(tmp_path, text=False)
    (model / "points3D.bin").unlink()
    return (lambda: read_colmap(model, tmp_path)), model


@case("pose value 'abc' is not a number")
def case_colmap_text_pose_not_numeric(tmp_path):
    model = _colmap_model(tmp_path, text=True)
    lines = (model / "images.txt").read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    tok = lines[first].split()
    tok[2] = "abc"
    lines[first] = " ".join(tok)
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    return (lambda: read_colmap(model, tmp_path)), model / "images.txt"


@case("truncated COLMAP binary file")
def case_colmap_truncated_points_for_ground(tmp_path):
    """The sparse points citygen plan reads for ground height 'auto' (pycolmap alone allocated GBs)."""
    from citygen.partition.ground import load_sparse_points

    model = _colmap_model(tmp_path, text=False)
    data = (model / "points3D.bin").read_bytes()
    (model / "points3D.bin").write_bytes(data[:30])
    return (lambda: load_sparse_points(model)), model / "points3D.bin"


@case("unknown CRS 'EPSG:999999'")
def case_colmap_georef_sidecar_unknown_crs(tmp_path):
    model = _colmap_model(tmp_path, text=True)
    (model / "georef.json").write_text(json.dumps({"crs": "EPSG:999999", "origin": [0, 0, 0]}))
    return (lambda: read_colmap(model, tmp_path)), model / "georef.json"


# -- BlocksExchange, more -----------------------------------------------------------------------
_XML_DECL = '<?xml version="1.0" encoding="utf-8"?>\n'


@case("BlocksExchange XML declares a DTD or entities")
def case_blocks_exchange_entity_bomb(tmp_path):
    lol = "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10))
    doc = _BLOCK.format(srs="&l9;", pose=_POSE).replace(
        _XML_DECL, _XML_DECL + f'<!DOCTYPE BlocksExchange [<!ENTITY l0 "lol">{lol}]>\n')
    return _block(tmp_path, doc)


@case("BlocksExchange XML declares a DTD or entities")
def case_blocks_exchange_external_entity(tmp_path):
    doc = _BLOCK.format(srs="EPSG:32633", pose=_POSE).replace("<ImagePath>a.png", "<ImagePath>&secret;").replace(
        _XML_DECL, _XML_DECL + '<!DOCTYPE BlocksExchange [<!ENTITY secret SYSTEM "file:///etc/passwd">]>\n')
    return _block(tmp_path, doc)


@case("root element is <Project>, expected <BlocksExchange>")
def case_blocks_exchange_wrong_root(tmp_path):
    return _block(tmp_path, _XML_DECL + "<Project><Block/></Project>\n")


@case("<FocalLengthPixels> is not a number ('fifty')")
def case_blocks_exchange_focal_not_a_number(tmp_path):
    doc = _BLOCK.format(srs="EPSG:32633", pose=_POSE).replace(">50<", ">fifty<")
    return _block(tmp_path, doc)


# -- GeoTIFF, more ------------------------------------------------------------------------------
@case("GeoTIFF has a CRS but no georeferencing transform")
def case_geotiff_crs_without_transform(tmp_path):
    import rasterio

    from survey_io.geotiff import read_geotiff

    path = tmp_path / "dsm.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32",
                       crs="EPSG:32633") as dst:
        dst.write(np.zeros((1, 8, 8), np.float32))
    return (lambda: read_geotiff(path)), path


@case("not a readable GeoTIFF")
def case_geotiff_zero_bytes(tmp_path):
    from survey_io.geotiff import read_geotiff

    path = tmp_path / "dtm.tif"
    path.write_bytes(b"")
    return (lambda: read_geotiff(path)), path


@case("differs from the survey's EPSG:32633")
def case_ground_geotiff_in_another_crs(tmp_path):
    from citygen.partition.ground import GroundModel
    from survey_io.geotiff import north_up_transform, write_geotiff

    path = write_geotiff(tmp_path / "dsm.tif", np.zeros((8, 8), np.float32), crs="EPSG:32632",
                         transform=north_up_transform((500000.0, 5000008.0), 1.0))
    return (lambda: GroundModel.from_geotiff(path, GEOREF)), path


# -- checkpoints ----------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path, edit_tensors: Callable[[dict], None] = lambda t: None,
                edit_meta: Callable[[dict], None] = lambda m: None) -> Path:
    """A tiny real field checkpoint (fresh weights, no training) in ``tmp_path/run/checkpoints``;
    returns its sidecar.  The edits break it before it is written."""
    import torch

    from citygen.config import load_config, to_dict
    from citygen.store.checkpoint import save_checkpoint
    from citygen.store.field import build_field

    cfg = load_config("tiny", {"field.n_levels": 2, "field.log2_hashmap_size": 8, "field.max_resolution": 16,
                               "field.hidden_dim": 16, "field.semantic_hidden_dim": 16, "field.backend": "torch",
                               "render.grid_resolution": 8})
    aabb = np.array([[0.0, 0.0, 0.0], [20.0, 20.0, 10.0]])
    field = build_field(cfg, aabb, 2, 7, torch.tensor([[5.0, 5.0, 30.0], [15.0, 15.0, 30.0]]), torch.device("cpu"))
    tensors = {f"model.{k}": v for k, v in field.state_dict().items()}
    meta = {"config": to_dict(cfg), "georef": GEOREF.to_dict(), "aabb": aabb.tolist(),
            "classes": ["ground", "road", "building", "vegetation", "water", "vehicle", "other"],
            "image_names": ["a.png", "b.png"], "test_names": []}
    edit_tensors(tensors)
    edit_meta(meta)
    return save_checkpoint(tmp_path / "run" / "checkpoints", 1, tensors, meta)


def _load_field(sidecar: Path):
    from citygen.train import load_field

    return lambda: load_field(sidecar)


def _poison(name: str, value: float):
    def edit(tensors: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = value
    return edit


@case("tensor 'model.encoding.params' has 1 NaN or inf value(s)")
def case_checkpoint_nan_weights(tmp_path):
    sidecar = _checkpoint(tmp_path, _poison("model.encoding.params", float("nan")))
    return _load_field(sidecar), sidecar.with_suffix(".safetensors")


@case("tensor 'model.density_mlp.0.weight' has 1 NaN or inf value(s)")
def case_checkpoint_inf_weights(tmp_path):
    sidecar = _checkpoint(tmp_path, _poison("model.density_mlp.0.weight", float("-inf")))
    return _load_field(sidecar), sidecar.with_suffix(".safetensors")


@case("tensor model.background_semantics has shape (7,), the config gives (5,)")
def case_checkpoint_sidecar_classes_disagree_with_weights(tmp_path):
    sidecar = _checkpoint(tmp_path, edit_meta=lambda m: m.update(classes=m["classes"][:5]))
    return _load_field(sidecar), sidecar


@case("tensor model.encoding.params has shape")
def case_checkpoint_sidecar_hash_size_disagrees_with_weights(tmp_path):
    sidecar = _checkpoint(tmp_path, edit_meta=lambda m: m["config"]["field"].update(log2_hashmap_size=9))
    return _load_field(sidecar), sidecar


@case("checkpoint sidecar lacks ['aabb']")
def case_checkpoint_sidecar_without_aabb(tmp_path):
    sidecar = _checkpoint(tmp_path, edit_meta=lambda m: m.pop("aabb"))
    return _load_field(sidecar), sidecar


@case("checkpoint sidecar 'aabb' must be finite")
def case_checkpoint_sidecar_inverted_aabb(tmp_path):
    sidecar = _checkpoint(tmp_path, edit_meta=lambda m: m.update(aabb=[[0, 0, 10], [20, 20, 0]]))
    return _load_field(sidecar), sidecar


@case("checkpoint sidecar is not valid JSON")
def case_checkpoint_sidecar_truncated(tmp_path):
    sidecar = _checkpoint(tmp_path)
    sidecar.write_bytes(sidecar.read_bytes()[:100])
    return _load_field(sidecar), sidecar


@case("not a citygen checkpoint sidecar")
def case_checkpoint_sidecar_of_another_program(tmp_path):
    sidecar = _checkpoint(tmp_path)
    sidecar.write_text(json.dumps({"format": "nerfacto/2", "tensors_file": sidecar.with_suffix(".safetensors").name}))
    return _load_field(sidecar), sidecar


@case("checkpoint tensor file is truncated or corrupt (0 bytes")
def case_checkpoint_zero_byte_tensors(tmp_path):
    sidecar = _checkpoint(tmp_path)
    sidecar.with_suffix(".safetensors").write_bytes(b"")
    return _load_field(sidecar), sidecar.with_suffix(".safetensors")


@case("checkpoint tensor file is corrupt")
def case_checkpoint_garbage_tensors_of_right_size(tmp_path):
    sidecar = _checkpoint(tmp_path)
    st = sidecar.with_suffix(".safetensors")
    st.write_bytes(np.random.default_rng(0).integers(0, 256, st.stat().st_size, dtype=np.uint8).tobytes())
    return _load_field(sidecar), st


@case("checkpoint tensor file not found")
def case_checkpoint_tensor_file_missing(tmp_path):
    sidecar = _checkpoint(tmp_path)
    sidecar.with_suffix(".safetensors").unlink()
    return _load_field(sidecar), sidecar.with_suffix(".safetensors")


@case("checkpoint has no tensors ['model.appearance.weight']")
def case_checkpoint_without_field_tensors(tmp_path):
    sidecar = _checkpoint(tmp_path, lambda t: t.pop("model.appearance.weight"))
    return _load_field(sidecar), sidecar


# -- plan.json --------------------------------------------------------------------------------------
def _plan(tmp_path: Path, edit: Callable[[dict], None] = lambda d: None, text: str | None = None):
    from citygen.partition import TilePlan
    from citygen.partition.config import PartitionConfig
    from citygen.partition.ground import GroundModel
    from citygen.partition.planner import plan_tile

    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])
    images = []
    for k, (x, y) in enumerate([(10.0, 10.0), (60.0, 10.0), (10.0, 60.0), (60.0, 60.0)]):
        m = c2w.copy()
        m[:3, 3] = [x, y, 80.0]
        images.append(SurveyImage(f"{k}.png", 0, m))
    survey = Survey(tmp_path, [Camera(64, 48, 50.0, 50.0, 32.0, 24.0)], images, GEOREF)
    plan = plan_tile(survey, PartitionConfig(blocks=(2, 2)), GroundModel.plane(0.0))
    d = plan.to_dict()
    edit(d)
    path = tmp_path / "tile" / "plan.json"
    path.parent.mkdir()
    path.write_text(text if text is not None else json.dumps(d))
    return (lambda: TilePlan.load(path)), path


@case("not valid JSON")
def case_plan_truncated(tmp_path):
    return _plan(tmp_path, text='{"kind": "citygen.plan", "blocks": [')


@case("malformed plan: no blocks")
def case_plan_without_blocks(tmp_path):
    return _plan(tmp_path, lambda d: d.update(blocks=[]))


@case("is not a cell of the 2x2 grid")
def case_plan_block_outside_grid(tmp_path):
    return _plan(tmp_path, lambda d: d["blocks"][0].update(row=5))


@case("malformed plan: unsupported version 99")
def case_plan_from_the_future(tmp_path):
    return _plan(tmp_path, lambda d: d.update(version=99))


@case("malformed plan: missing key 'core'")
def case_plan_block_without_core(tmp_path):
    return _plan(tmp_path, lambda d: d["blocks"][1].pop("core"))


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
    assert len(CASES) >= 50


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


# -- the command line, files ---------------------------------------------------------------------
def test_cli_plan_with_truncated_sparse_points_beside_transforms(tmp_path, capsys):
    """Ground height 'auto' reads sparse/0 beside --data: a truncated points3D.bin is refused in one
    line by survey_io's reader (pycolmap alone grew to 16.5 GB and died with std::bad_alloc)."""
    _, data = _survey_with_images(tmp_path)
    (tmp_path / "src").mkdir()
    model = _colmap_model(tmp_path / "src", text=False)
    (tmp_path / "sparse").mkdir()
    model.rename(tmp_path / "sparse" / "0")
    points = tmp_path / "sparse" / "0" / "points3D.bin"
    points.write_bytes(points.read_bytes()[:30])
    line = _cli(["plan", "--data", str(data), "--out", str(tmp_path / "tile"), "--blocks", "1x1"], capsys)
    assert str(points) in line and "truncated COLMAP binary file" in line
    assert not (tmp_path / "tile").exists()


def test_cli_plan_with_image_of_the_wrong_size(tmp_path, capsys):
    _, data = _survey_with_images(tmp_path, sizes=((64, 48), (640, 480)))
    line = _cli(["plan", "--data", str(data), "--out", str(tmp_path / "tile"), "--ground-height", "0"], capsys)
    assert str(tmp_path / "images" / "b.png") in line and "640x480" in line and "64x48" in line
    assert not (tmp_path / "tile").exists()


def test_cli_ingest_with_xmp_entity_bomb(tmp_path, capsys):
    flight = tmp_path / "flight"
    flight.mkdir()
    case_drone_xmp_entity_expansion(flight)
    line = _cli(["ingest", str(flight), "--out", str(tmp_path / "out")], capsys)
    assert str(flight / "b.jpg") in line and "declares a DTD or entities" in line
    assert not (tmp_path / "out" / "transforms.json").exists()


def test_cli_export_refuses_nan_checkpoint_and_writes_nothing(tmp_path, capsys):
    sidecar = _checkpoint(tmp_path, _poison("model.encoding.params", float("nan")))
    out = tmp_path / "export"
    line = _cli(["export", str(tmp_path / "run"), "--out", str(out), "--what", "dsm", "--gsd", "2",
                 "--no-progress"], capsys)
    assert str(sidecar.with_suffix(".safetensors")) in line and "NaN or inf" in line
    assert not out.exists()


def test_cli_export_refuses_an_all_nodata_raster(tmp_path, capsys):
    """Finite weights that render nothing (every occupancy cell empty: no ray takes a sample)."""
    def empty(tensors):
        tensors["model.occupancy.occupied"] = torch.zeros_like(tensors["model.occupancy.occupied"])
    import torch

    _checkpoint(tmp_path, empty)
    out = tmp_path / "export"
    line = _cli(["export", str(tmp_path / "run"), "--out", str(out), "--what", "ortho,dsm", "--gsd", "2",
                 "--no-progress"], capsys)
    assert str(out) in line and "all nodata" in line and "10x10" in line
    assert not out.exists()


def test_cli_train_with_a_file_that_is_not_an_image(tmp_path, capsys):
    _, data = _survey_with_images(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"GIF89a but not really")
    line = _cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny"], capsys)
    assert str(tmp_path / "images" / "b.png") in line and "not an image file" in line
    assert not (tmp_path / "run").exists()
