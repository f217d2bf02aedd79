"""COLMAP sparse models (text or binary) in and out, through pycolmap.

COLMAP stores each image's pose as ``cam_from_world`` (quaternion ``qvec`` = w,x,y,z and
translation ``tvec``): a world point ``X`` maps to camera coordinates ``R X + t`` in the
OpenCV camera convention (x right, y down, z forward).  citygen's camera-to-world is its
inverse, ``[R^T | -R^T t]``.  COLMAP's principal point uses the same pixel convention as
nerfstudio (the image's top-left corner is (0, 0)), so intrinsics pass through unchanged.

A COLMAP model's frame is arbitrary unless it was aligned.  :func:`read_colmap` takes the
model to be in the local ENU frame of a :class:`Georef`: the one passed in, else the one in
a ``georef.json`` sidecar (``{"crs", "origin"}``) next to the model files, which
:func:`write_colmap` writes and ``citygen ingest`` leaves behind after alignment.

pycolmap's binary reader trusts its input (a truncated ``cameras.bin`` reads as garbage, a
truncated ``points3D.bin`` asks for terabytes), so binary files are walked record by record
first and any short or over-long file is refused, naming the file; text files get a
line-by-line shape check for the same reason (pycolmap's errors do not say which file).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_json
from .errors import SurveyError
from .georef import Georef
from .survey import Camera, Survey, SurveyImage, check_relative_path

#: COLMAP camera models citygen reads, with their parameter lists (COLMAP order).
COLMAP_MODELS: dict[str, tuple[str, ...]] = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k1"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
    "OPENCV_FISHEYE": ("fx", "fy", "cx", "cy", "k1", "k2", "k3", "k4"),
}
GEOREF_SIDECAR = "georef.json"
_MODEL_FILES = ("cameras", "images", "points3D")


def _pycolmap():
    try:
        import pycolmap
    except ImportError:
        raise SurveyError(None, "reading COLMAP models needs pycolmap: pip install pycolmap") from None
    return pycolmap


# -- binary structure check ------------------------------------------------------------
class _Cursor:
    """Reads little-endian records from bytes; a short read raises SurveyError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def take(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise SurveyError(self.path, f"truncated COLMAP binary file: ends inside {what} "
                                         f"(byte {self.pos} of {len(self.data)})")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values

    def skip(self, n_bytes: int, what: str) -> None:
        if n_bytes < 0 or self.pos + n_bytes > len(self.data):
            raise SurveyError(self.path, f"truncated COLMAP binary file: ends inside {what} "
                                         f"(needs {n_bytes} bytes at byte {self.pos} of {len(self.data)})")
        self.pos += n_bytes

    def string(self, what: str) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise SurveyError(self.path, f"truncated COLMAP binary file: ends inside {what}")
        raw, self.pos = self.data[self.pos:end], end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SurveyError(self.path, f"{what} is not UTF-8") from None

    def done(self) -> None:
        if self.pos != len(self.data):
            raise SurveyError(self.path, f"{len(self.data) - self.pos} unexpected bytes after the last record "
                                         "(corrupt or not a COLMAP binary file)")


def _num_params(model_id: int, path: Path, camera_id: int) -> int:
    pycolmap = _pycolmap()
    try:
        model = pycolmap.CameraModelId(model_id)
        return int(pycolmap.Camera.create_from_model_id(0, model, 1.0, 1, 1).params.size)
    except (ValueError, TypeError, RuntimeError):
        raise SurveyError(path, f"camera {camera_id} has unknown COLMAP camera model id {model_id}") from None


def _check_binary_model(model_dir: Path) -> None:
    """Walk every record of the binary model files; refuse truncated or padded files."""
    cur = _Cursor(model_dir / "cameras.bin")
    (n,) = cur.take("Q", "the camera count")
    for i in range(n):
        cam_id, model_id, _w, _h = cur.take("iiQQ", f"camera record {i}")
        cur.skip(8 * _num_params(model_id, cur.path, cam_id), f"the parameters of camera {cam_id}")
    cur.done()

    cur = _Cursor(model_dir / "images.bin")
    (n,) = cur.take("Q", "the image count")
    for i in range(n):
        (image_id,) = cur.take("I", f"image record {i}")
        cur.take("7dI", f"the pose of image {image_id}")
        cur.string(f"the name of image {image_id}")
        (n_pts,) = cur.take("Q", f"the keypoint count of image {image_id}")
        cur.skip(24 * n_pts, f"the keypoints of image {image_id}")
    cur.done()

    cur = _Cursor(model_dir / "points3D.bin")
    (n,) = cur.take("Q", "the point count")
    for i in range(n):
        cur.take("Q3d3Bd", f"point record {i}")
        (track_len,) = cur.take("Q", f"the track length of point record {i}")
        cur.skip(8 * track_len, f"the track of point record {i}")
    cur.done()

    # COLMAP >= 3.12 adds rigs and frames; older models lack them and get trivial rigs.
    if (model_dir / "rigs.bin").exists():
        cur = _Cursor(model_dir / "rigs.bin")
        (n,) = cur.take("Q", "the rig count")
        for i in range(n):
            rig_id, n_sensors = cur.take("II", f"rig record {i}")
            if n_sensors:
                cur.take("iI", f"the reference sensor of rig {rig_id}")
            for _ in range(max(n_sensors - 1, 0)):
                _type, _id, has_pose = cur.take("iIB", f"a sensor of rig {rig_id}")
                if has_pose:
                    cur.take("7d", f"a sensor pose of rig {rig_id}")
        cur.done()
    if (model_dir / "frames.bin").exists():
        cur = _Cursor(model_dir / "frames.bin")
        (n,) = cur.take("Q", "the frame count")
        for i in range(n):
            frame_id, _rig = cur.take("II", f"frame record {i}")
            cur.take("7d", f"the pose of frame {frame_id}")
            (n_data,) = cur.take("I", f"the data count of frame {frame_id}")
            cur.skip(16 * n_data, f"the data ids of frame {frame_id}")
        cur.done()


def _check_text_model(model_dir: Path) -> None:
    """Check the shape of every record of the text model files (pycolmap's errors do not say which file)."""
    pycolmap = _pycolmap()

    def numbers(path: Path, line_no: int, tokens: list[str], what: str, integer: bool = False) -> None:
        for tok in tokens:
            try:
                int(tok) if integer else float(tok)
            except ValueError:
                raise SurveyError(path, f"line {line_no}: {what} {tok!r} is not a number") from None

    path = model_dir / "cameras.txt"
    for no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        tok = line.split()
        if not tok or tok[0].startswith("#"):
            continue
        if len(tok) < 4:
            raise SurveyError(path, f"line {no}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[], "
                                    f"got {line.strip()[:80]!r}")
        numbers(path, no, tok[0:1] + tok[2:4], "camera id/size", integer=True)
        numbers(path, no, tok[4:], "camera parameter")
        try:
            model = pycolmap.CameraModelId.__members__[tok[1]]
        except KeyError:
            raise SurveyError(path, f"line {no}: camera {tok[0]} has unknown COLMAP camera model {tok[1]!r}") from None
        expected = _num_params(int(model.value), path, int(tok[0]))
        if len(tok) - 4 != expected:
            raise SurveyError(path, f"line {no}: camera model {tok[1]} takes {expected} parameters, got {len(tok) - 4}")

    path = model_dir / "images.txt"
    lines = path.read_text(errors="replace").splitlines()
    i = 0
    while i < len(lines):
        tok = lines[i].split()
        i += 1
        if not tok or tok[0].startswith("#"):
            continue
        if len(tok) < 10:
            raise SurveyError(path, f"line {i}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, "
                                    f"got {lines[i - 1].strip()[:80]!r}")
        numbers(path, i, tok[1:8], "pose value")
        numbers(path, i, tok[0:1] + tok[8:9], "image/camera id", integer=True)
        if i >= len(lines):
            raise SurveyError(path, f"line {i}: image {tok[0]} has no POINTS2D line (truncated file?)")
        points = lines[i].split()
        i += 1
        if len(points) % 3:
            raise SurveyError(path, f"line {i}: POINTS2D of image {tok[0]} must come in (X, Y, POINT3D_ID) triples")
        numbers(path, i, points, "keypoint value")

    path = model_dir / "points3D.txt"
    for no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        tok = line.split()
        if not tok or tok[0].startswith("#"):
            continue
        if len(tok) < 8 or (len(tok) - 8) % 2:
            raise SurveyError(path, f"line {no}: expected POINT3D_ID X Y Z R G B ERROR TRACK[] (image, point2D pairs)")
        numbers(path, no, tok, "point value")


# -- reading ----------------------------------------------------------------------------
def _model_format(model_dir: Path) -> str:
    if not model_dir.is_dir():
        raise SurveyError(model_dir, "COLMAP model folder not found")
    for ext in ("bin", "txt"):
        present = [(model_dir / f"{name}.{ext}").exists() for name in _MODEL_FILES]
        if all(present):
            return ext
        if any(present):
            missing = [f"{n}.{ext}" for n, p in zip(_MODEL_FILES, present, strict=True) if not p]
            raise SurveyError(model_dir, f"incomplete COLMAP model: missing {', '.join(missing)}")
    raise SurveyError(model_dir, "no COLMAP model here (expected cameras, images and points3D as .bin or .txt)")


def _load_reconstruction(model_dir: Path):
    """A checked ``pycolmap.Reconstruction`` of the model in ``model_dir``."""
    ext = _model_format(model_dir)
    if ext == "bin":
        _check_binary_model(model_dir)
    else:
        _check_text_model(model_dir)
    pycolmap = _pycolmap()
    try:
        return pycolmap.Reconstruction(str(model_dir))
    except (ValueError, RuntimeError, IndexError, MemoryError, TypeError) as err:
        files = ", ".join(f"{n}.{ext}" for n in _MODEL_FILES)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SurveyError(model_dir, f"pycolmap could not read the model ({files}): {reason}") from None


def colmap_camera_to_camera(colmap_camera, source: Path) -> Camera:
    """A pycolmap camera as a :class:`Camera`, keeping COLMAP's model name (all six are nerfstudio names)."""
    model = colmap_camera.model_name
    if model not in COLMAP_MODELS:
        raise SurveyError(source, f"camera {colmap_camera.camera_id} uses COLMAP camera model {model}, which citygen "
                                  f"does not support (supported: {', '.join(COLMAP_MODELS)})")
    values = [float(v) for v in colmap_camera.params]
    if len(values) != len(COLMAP_MODELS[model]):
        raise SurveyError(source, f"camera {colmap_camera.camera_id}: {model} takes {len(COLMAP_MODELS[model])} "
                                  f"parameters, got {len(values)}")
    p = dict(zip(COLMAP_MODELS[model], values, strict=True))
    fx = p.get("fx", p.get("f"))
    fy = p.get("fy", p.get("f"))
    dist = {k: p[k] for k in ("k1", "k2", "k3", "k4", "p1", "p2") if k in p}
    try:
        return Camera(int(colmap_camera.width), int(colmap_camera.height), fx, fy, p["cx"], p["cy"], model, **dist)
    except SurveyError as err:
        raise SurveyError(source, f"camera {colmap_camera.camera_id}: {err.reason}") from None


def _sidecar_georef(model_dir: Path) -> Georef | None:
    path = model_dir / GEOREF_SIDECAR
    if not path.exists():
        return None
    try:
        return Georef.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SurveyError(path, f"not valid JSON ({err})") from None
    except SurveyError as err:
        raise SurveyError(path, err.reason) from None
    except AttributeError:
        raise SurveyError(path, "expected an object {\"crs\": ..., \"origin\": [e, n, h]}") from None


def write_georef_sidecar(model_dir: str | Path, georef: Georef) -> Path:
    """Write ``model_dir/georef.json``: declares that the COLMAP model there is in ``georef``'s local frame."""
    path = Path(model_dir) / GEOREF_SIDECAR
    atomic_write_json(path, georef.to_dict())
    return path


def read_colmap(model_dir: str | Path, images_dir: str | Path, georef: Georef | None = None) -> Survey:
    """Read a COLMAP sparse model (``cameras/images/points3D`` as ``.txt`` or ``.bin``) into a :class:`Survey`.

    Args:
        model_dir: the folder of the model files (e.g. ``sparse/0``).
        images_dir: the folder COLMAP's image names are relative to; it becomes ``Survey.root``.
        georef: the frame the model is in.  When None, ``model_dir/georef.json`` is used.

    Only registered images (those with a pose) are returned, sorted by name.

    Raises:
        SurveyError: missing/truncated/corrupt files, unsupported camera models, no georeferencing.
    """
    model_dir, images_dir = Path(model_dir), Path(images_dir)
    rec = _load_reconstruction(model_dir)
    georef = georef or _sidecar_georef(model_dir)
    if georef is None:
        raise SurveyError(model_dir, "COLMAP model has no georeferencing: pass georef, add a georef.json "
                                     "({\"crs\", \"origin\"}) next to the model, or run `citygen ingest` to align it")
    ext = _model_format(model_dir)
    cameras_file = model_dir / f"cameras.{ext}"

    cameras: list[Camera] = []
    cam_index: dict[int, int] = {}
    images: list[SurveyImage] = []
    registered = [im for im in rec.images.values() if im.has_pose]
    for im in sorted(registered, key=lambda im: im.name):
        if im.camera_id not in cam_index:
            cam_index[im.camera_id] = len(cameras)
            cameras.append(colmap_camera_to_camera(rec.cameras[im.camera_id], cameras_file))
        check_relative_path(images_dir, im.name, model_dir / f"images.{ext}")
        w2c = np.eye(4)
        w2c[:3, :] = np.asarray(im.cam_from_world().matrix(), dtype=np.float64)
        images.append(SurveyImage(name=im.name, camera=cam_index[im.camera_id], c2w=_invert_rigid(w2c)))
    if not images:
        raise SurveyError(model_dir, "COLMAP model has no registered images")
    return Survey(root=images_dir, cameras=cameras, images=images, georef=georef).validate(model_dir)


def read_colmap_points(model_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's sparse points: ``xyz`` float64 (N, 3) in the model frame and ``rgb`` uint8 (N, 3)."""
    table = read_colmap_point_table(model_dir)
    return table["xyz"], table["rgb"]


def read_colmap_point_table(model_dir: str | Path) -> dict[str, np.ndarray]:
    """The model's sparse points in id order, with what COLMAP knows of each: ``id`` int64 (N,),
    ``xyz`` float64 (N, 3) in the model frame, ``rgb`` uint8 (N, 3), ``error_px`` float64 (N,)
    (mean reprojection error; -1 where the model has none) and ``track_length`` int64 (N,)
    (views that observe the point; 0 for points written without a track)."""
    return _point_table(_load_reconstruction(Path(model_dir)))


def read_colmap_observations(model_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`read_colmap_point_table`'s table, and each registered image's observations of those
    points: image name -> (point ids int64 (K,), keypoint positions xy float64 (K, 2), COLMAP's
    pixel convention: the image's top-left corner is (0, 0)).  Keypoints without a 3D point are
    left out."""
    rec = _load_reconstruction(Path(model_dir))
    obs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        pairs = [(p.point3D_id, p.xy) for p in image.points2D if p.has_point3D()]
        ids = np.array([i for i, _ in pairs], dtype=np.int64)
        xy = np.array([xy for _, xy in pairs], dtype=np.float64).reshape(-1, 2)
        obs[image.name] = (ids, xy)
    return _point_table(rec), obs


def _point_table(rec) -> dict[str, np.ndarray]:
    ids = sorted(rec.points3D)
    pts = [rec.points3D[i] for i in ids]
    return {
        "id": np.asarray(ids, dtype=np.int64),
        "xyz": np.array([p.xyz for p in pts], dtype=np.float64).reshape(-1, 3),
        "rgb": np.array([p.color for p in pts], dtype=np.uint8).reshape(-1, 3),
        "error_px": np.array([p.error for p in pts], dtype=np.float64),
        "track_length": np.array([p.track.length() for p in pts], dtype=np.int64),
    }


def _invert_rigid(m: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    R, t = m[:3, :3], m[:3, 3]
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


# -- writing ----------------------------------------------------------------------------
def colmap_params(cam: Camera, path: Path) -> list[float]:
    model = cam.camera_model
    if model not in COLMAP_MODELS:
        raise SurveyError(path, f"camera model {model} has no COLMAP equivalent")
    names = COLMAP_MODELS[model]
    if "f" in names and cam.fl_x != cam.fl_y:
        raise SurveyError(path, f"{model} has one focal length, but fl_x={cam.fl_x} != fl_y={cam.fl_y}")
    dropped = [k for k in ("k1", "k2", "k3", "k4", "p1", "p2") if k not in names and getattr(cam, k) != 0.0]
    if dropped:
        raise SurveyError(path, f"{model} cannot hold distortion {dropped}; use a model that has them")
    values = {"f": cam.fl_x, "fx": cam.fl_x, "fy": cam.fl_y, "cx": cam.cx, "cy": cam.cy,
              **{k: getattr(cam, k) for k in ("k1", "k2", "k3", "k4", "p1", "p2")}}
    return [float(values[n]) for n in names]


def write_colmap(survey: Survey, model_dir: str | Path, text: bool = True,
                 points: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write ``survey`` as a COLMAP sparse model (text or binary) plus a ``georef.json`` sidecar.

    Args:
        survey: cameras and posed images; image names are written as they are (relative to ``survey.root``).
        model_dir: output folder (created).  Each file is replaced atomically.
        text: ``.txt`` files when True, else ``.bin``.
        points: optional sparse points ``(xyz (N, 3), rgb uint8 (N, 3))`` in the local frame.
    """
    pycolmap = _pycolmap()
    model_dir = Path(model_dir)
    survey.validate()
    rec = pycolmap.Reconstruction()
    for cam_id, cam in enumerate(survey.cameras, start=1):
        params = colmap_params(cam, model_dir)  # refuses models COLMAP cannot hold
        colmap_cam = pycolmap.Camera.create_from_model_name(cam_id, cam.camera_model, 1.0, cam.width, cam.height)
        colmap_cam.params = params
        rec.add_camera_with_trivial_rig(colmap_cam)
    for image_id, im in enumerate(survey.images, start=1):
        w2c = _invert_rigid(np.asarray(im.c2w, dtype=np.float64))
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3].copy())
        rec.add_image_with_trivial_frame(pycolmap.Image(name=im.name, camera_id=im.camera + 1, image_id=image_id), pose)
    if points is not None:
        xyz, rgb = np.asarray(points[0], dtype=np.float64), np.asarray(points[1], dtype=np.uint8)
        for p, c in zip(xyz.reshape(-1, 3), rgb.reshape(-1, 3), strict=True):
            rec.add_point3D(p, pycolmap.Track(), c)

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".colmap.", dir=model_dir))
    try:
        (rec.write_text if text else rec.write_binary)(str(staging))
        for f in sorted(staging.iterdir()):
            atomic_write_bytes(model_dir / f.name, f.read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_georef_sidecar(model_dir, survey.georef)
    return model_dir
