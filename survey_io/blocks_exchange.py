"""ContextCapture / iTwin Capture BlocksExchange XML ("CC Orientations"): read and write.

Conventions, as Bentley's annotated sample BlocksExchange file states them (sources: the
sample reproduced in github.com/StOriJimmy/libBATools README; developer.bentley.com
"CC Orientations"; a real ContextCapture AT export with an ENU SRS quoted in a public
dataset README), and as checked numerically where noted:

* ``SpatialReferenceSystems/SRS``: ``Id`` (integer) and ``Definition``: ``EPSG:<code>``,
  WKT, or a PROJ string (anything pyproj accepts), or ContextCapture's local tangent plane
  ``ENU:<lat>,<lon>`` (East-North-Up metres, origin at that point on the ellipsoid).
  ``Block/SRSId`` picks the block's SRS; a ``Photogroup/SRSId`` overrides it.  No SRSId
  means a local Cartesian frame with no georeferencing.
* ``Photo/Pose/Center`` x y z: the camera centre in the SRS.  For a geographic SRS x is the
  longitude and y the latitude (degrees), z the height.
* ``Photo/Pose/Rotation``: the matrix that maps world (SRS) coordinates to camera
  coordinates, ``M_ij`` = row i, column j, camera axes as the photogroup's
  ``CameraOrientation`` names them (default ``XRightYDown``: x right, y down, z = x × y
  forward, i.e. OpenCV).  So in OpenCV terms ``c2w = [(A^T M)^T | C]`` with ``A`` the
  orientation's axes.  Alternatively ``Omega/Phi/Kappa`` in degrees give
  ``M = Rz(kappa) Ry(phi) Rx(omega)`` with the passive rotations
  ``Rx(w) = [[1,0,0],[0,cos w,sin w],[0,-sin w,cos w]]`` (Ry, Rz alike); checked against
  Bentley's sample, where the given angles reproduce the given matrix to 4e-12.  For a
  geographic SRS (the pose metadata of a real export) the rotation is taken relative to the
  local East-North-Up frame at the camera (an assumption: a nadir camera then has
  ``M_22 = -1``).  Heading/Pitch/Roll rotations are not supported.
* ``Photogroup``: ``ImageDimensions`` Width/Height (pixels); the focal length as
  ``FocalLengthPixels``, or ``FocalLength`` (mm) with ``SensorSize`` (mm, the sensor's
  *largest* dimension) or ``PixelSize`` (mm); ``PrincipalPoint`` x/y in pixels with the
  origin at the *centre* of the upper-left pixel (so nerfstudio's ``cx = x + 0.5``), default
  the image centre; ``Distortion`` K1 K2 K3 P1 P2 (Brown's model, mapped to OpenCV's
  k1 k2 k3 p1 p2 as they are); ``AspectRatio`` (taken as ``fl_y / fl_x``, an assumption)
  and ``Skew`` (must be 0).  Only ``CameraModelType`` Perspective is read.
* ``ImagePath``: absolute, or relative to ``BaseImagePath`` (itself relative to the XML's
  folder when not absolute), else to the XML's folder.  Exports often carry absolute
  Windows paths of the machine that made them: an absolute path outside the image folder
  is looked up there by its file name (pass ``images_root`` to say where the images are).

Poses in another frame than the target :class:`Georef` (an ENU or geographic SRS, or a
different projected CRS) go through ECEF: each camera centre is transformed exactly by
pyproj, and its rotation by the (orthonormalised) Jacobian of the map at the camera, which
absorbs meridian convergence.  The default target is the SRS itself when it is projected,
else the UTM zone of the cameras; its origin is the mean camera centre rounded to metres.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET  # building XML to write; parsing goes through .safexml
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pyproj

from .atomic import atomic_write_text
from .errors import SurveyError
from .georef import Georef, utm_epsg_for
from .safexml import ParseError, parse_xml
from .survey import Camera, Survey, SurveyImage, check_pose, check_relative_path

#: CameraOrientation name -> its (x, y) image axes as OpenCV camera axes; z = x × y.
_AXIS = {"Right": (1.0, 0.0, 0.0), "Left": (-1.0, 0.0, 0.0), "Down": (0.0, 1.0, 0.0), "Up": (0.0, -1.0, 0.0)}
CAMERA_ORIENTATIONS = ("XRightYDown", "XRightYUp", "XLeftYDown", "XLeftYUp",
                       "XDownYRight", "XDownYLeft", "XUpYRight", "XUpYLeft")


def orientation_axes(name: str) -> np.ndarray:
    """3x3 ``A`` whose rows are the named camera axes in OpenCV camera coordinates (``R_named = A @ R_cv``)."""
    rest = name[1:]
    for y_name in ("Right", "Left", "Down", "Up"):
        if rest.endswith("Y" + y_name):
            x = np.array(_AXIS[rest[: -len(y_name) - 1]])
            y = np.array(_AXIS[y_name])
            return np.stack([x, y, np.cross(x, y)])
    raise KeyError(name)


def opk_to_matrix(omega_deg: float, phi_deg: float, kappa_deg: float) -> np.ndarray:
    """ContextCapture's Omega/Phi/Kappa (degrees) as the world-to-camera matrix ``Rz(k) Ry(p) Rx(o)``."""
    o, p, k = np.radians([omega_deg, phi_deg, kappa_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(o), np.sin(o)], [0, -np.sin(o), np.cos(o)]])
    ry = np.array([[np.cos(p), 0, -np.sin(p)], [0, 1, 0], [np.sin(p), 0, np.cos(p)]])
    rz = np.array([[np.cos(k), np.sin(k), 0], [-np.sin(k), np.cos(k), 0], [0, 0, 1]])
    return rz @ ry @ rx


# -- small XML helpers -------------------------------------------------------------------
class _Doc:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, reason: str) -> SurveyError:
        return SurveyError(self.path, reason)

    def text(self, el: ET.Element, tag: str, where: str, default: str | None = None) -> str:
        child = el.find(tag)
        if child is None or child.text is None or not child.text.strip():
            if default is not None:
                return default
            raise self.fail(f"{where}: missing <{tag}>")
        return child.text.strip()

    def number(self, el: ET.Element, tag: str, where: str, default: float | None = None) -> float:
        raw = self.text(el, tag, where, None if default is None else repr(default))
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(f"{where}: <{tag}> is not a number ({raw[:40]!r})") from None
        if not np.isfinite(value):
            raise self.fail(f"{where}: <{tag}> is not finite ({raw[:40]!r})")
        return value


# -- spatial reference systems ---------------------------------------------------------
@dataclass(frozen=True)
class _Srs:
    kind: str  # "local", "enu", "projected", "geographic", "geocentric"
    definition: str = ""
    crs: object = None  # pyproj.CRS
    lat0: float = 0.0
    lon0: float = 0.0


def _parse_srs(definition: str, doc: _Doc, srs_id: str) -> _Srs:
    if definition.upper().startswith("ENU:"):
        try:
            lat, lon = (float(v) for v in definition[4:].split(","))
        except ValueError:
            raise doc.fail(f"SRS {srs_id}: cannot read the ENU origin in {definition!r} "
                           "(expected ENU:<lat>,<lon>)") from None
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise doc.fail(f"SRS {srs_id}: ENU origin {lat},{lon} is not a latitude,longitude")
        return _Srs("enu", definition, None, lat, lon)
    try:
        crs = pyproj.CRS.from_user_input(definition)
    except pyproj.exceptions.CRSError:
        raise doc.fail(f"SRS {srs_id}: unknown or unsupported spatial reference system {definition[:80]!r} "
                       "(expected EPSG:<code>, WKT, a PROJ string, or ENU:<lat>,<lon>)") from None
    if crs.is_projected:
        return _Srs("projected", definition, crs)
    if crs.is_geocentric:
        return _Srs("geocentric", definition, crs)
    if crs.is_geographic or (crs.sub_crs_list and crs.sub_crs_list[0].is_geographic):
        return _Srs("geographic", definition, crs)
    raise doc.fail(f"SRS {srs_id}: spatial reference system {definition[:80]!r} is neither projected, "
                   "geographic nor geocentric")


def _enu_basis(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """(..., 3, 3): columns are East, North, Up at (lat, lon) in ECEF."""
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    e = np.stack([-np.sin(lon), np.cos(lon), np.zeros_like(lon)], -1)
    n = np.stack([-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)], -1)
    u = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
    return np.stack([e, n, u], -1)


def _transformer(src, dst, doc: _Doc):
    try:
        return pyproj.Transformer.from_crs(src, dst, always_xy=True)
    except pyproj.exceptions.ProjError as err:
        name = src.name if hasattr(src, "name") else str(src)
        raise doc.fail(f"cannot transform from {name[:60]!r} to {str(dst)[:60]!r}: "
                       f"{str(err).splitlines()[0][:160]}") from None


def _apply(tr, xyz: np.ndarray) -> np.ndarray:
    x, y, z = tr.transform(xyz[..., 0], xyz[..., 1], xyz[..., 2])
    return np.stack(np.broadcast_arrays(x, y, z), -1).astype(np.float64)


def _orthonormal(j: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(j)
    return u @ vt


def _jacobian(tr, p: np.ndarray, axes: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Orthonormalised Jacobian (3x3 per point) of ``tr`` at ``p`` (N, 3) along ``axes`` (N, 3, 3) columns."""
    cols = []
    for i in range(3):
        d = axes[:, :, i] * step
        cols.append((_apply(tr, p + d) - _apply(tr, p - d)) / (2 * step))
    return np.stack([_orthonormal(j) for j in np.stack(cols, -1)])


def _to_ecef(srs: _Srs, centers: np.ndarray, doc: _Doc) -> tuple[np.ndarray, np.ndarray]:
    """Camera centres in ECEF and, per camera, the source frame's axes in ECEF (columns)."""
    n = len(centers)
    if srs.kind == "enu":  # tangent plane at (lat0, lon0) on the WGS84 ellipsoid
        origin = _apply(_transformer("EPSG:4979", "EPSG:4978", doc), np.array([srs.lon0, srs.lat0, 0.0]))
        basis = _enu_basis(np.array(srs.lat0), np.array(srs.lon0))
        return origin + centers @ basis.T, np.broadcast_to(basis, (n, 3, 3)).copy()
    if srs.kind == "geocentric":
        return centers.copy(), np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    tr = _transformer(srs.crs, "EPSG:4978", doc)
    ecef = _apply(tr, centers)
    if not np.all(np.isfinite(ecef)):
        raise doc.fail(f"camera centres cannot be placed on Earth in SRS {srs.definition[:60]!r}")
    if srs.kind == "geographic":
        return ecef, _enu_basis(centers[:, 1], centers[:, 0])
    # projected: the map's own axes, orthonormalised at each camera
    to_ecef_axes = _jacobian(tr, centers, np.broadcast_to(np.eye(3), (n, 3, 3)))
    return ecef, to_ecef_axes


# -- reading ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Photo:
    name: str
    camera: int
    w2c: np.ndarray  # world-to-camera rotation, OpenCV camera axes, source SRS
    centre: np.ndarray  # camera centre in the source SRS
    srs_id: str  # "" for none (a local Cartesian frame)


def _read_camera(pg: ET.Element, doc: _Doc, where: str) -> tuple[Camera, np.ndarray]:
    model_type = doc.text(pg, "CameraModelType", where, "Perspective")
    if model_type != "Perspective":
        raise doc.fail(f"{where}: CameraModelType {model_type!r} is not supported (only Perspective)")
    dims = pg.find("ImageDimensions")
    if dims is None:
        raise doc.fail(f"{where}: missing <ImageDimensions>")
    w, h = doc.number(dims, "Width", where), doc.number(dims, "Height", where)
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise doc.fail(f"{where}: ImageDimensions must be positive integers, got {w}x{h}")
    w, h = int(w), int(h)
    if pg.find("FocalLengthPixels") is not None:
        f = doc.number(pg, "FocalLengthPixels", where)
    elif pg.find("FocalLength") is not None:
        f_mm = doc.number(pg, "FocalLength", where)
        if pg.find("SensorSize") is not None:
            pixel_mm = doc.number(pg, "SensorSize", where) / max(w, h)
        elif pg.find("PixelSize") is not None:
            pixel_mm = doc.number(pg, "PixelSize", where)
        else:
            raise doc.fail(f"{where}: <FocalLength> (mm) needs <SensorSize> or <PixelSize> (mm)")
        if pixel_mm <= 0:
            raise doc.fail(f"{where}: sensor/pixel size must be positive")
        f = f_mm / pixel_mm
    else:
        raise doc.fail(f"{where}: missing focal length (<FocalLengthPixels>, or <FocalLength> with <SensorSize>)")
    cx, cy = w / 2.0, h / 2.0
    pp = pg.find("PrincipalPoint")
    if pp is not None:
        if pp.find("x") is None and pp.find("xmm") is not None:
            raise doc.fail(f"{where}: PrincipalPoint in millimetres (xmm/ymm) is not supported; give x/y in pixels")
        cx, cy = doc.number(pp, "x", where) + 0.5, doc.number(pp, "y", where) + 0.5
    aspect = doc.number(pg, "AspectRatio", where, 1.0)
    if doc.number(pg, "Skew", where, 0.0) != 0.0:
        raise doc.fail(f"{where}: non-zero <Skew> is not supported")
    dist = {}
    d = pg.find("Distortion")
    if d is not None:
        dist = {k.lower(): doc.number(d, k, where, 0.0) for k in ("K1", "K2", "K3", "P1", "P2")}
    orientation = doc.text(pg, "CameraOrientation", where, "XRightYDown")
    if orientation not in CAMERA_ORIENTATIONS:
        raise doc.fail(f"{where}: unknown CameraOrientation {orientation!r} (known: {', '.join(CAMERA_ORIENTATIONS)})")
    model = "OPENCV" if any(dist.values()) else "PINHOLE"
    try:
        cam = Camera(w, h, f, f * aspect, cx, cy, model, **(dist if model == "OPENCV" else {}))
    except SurveyError as err:
        raise doc.fail(f"{where}: {err.reason}") from None
    return cam, orientation_axes(orientation)


def _read_pose(photo: ET.Element, doc: _Doc, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(world-to-camera matrix as given, camera centre)."""
    pose = photo.find("Pose")
    if pose is None:
        raise doc.fail(f"{where}: missing <Pose> (citygen needs posed photos, e.g. an aerotriangulation export)")
    rot, center = pose.find("Rotation"), pose.find("Center")
    if rot is None or center is None:
        raise doc.fail(f"{where}: <Pose> needs both <Rotation> and <Center>")
    if any(child.tag.startswith("M_") for child in rot):
        m = np.array([[doc.number(rot, f"M_{i}{j}", where) for j in range(3)] for i in range(3)])
    elif rot.find("Omega") is not None:
        m = opk_to_matrix(*(doc.number(rot, k, where) for k in ("Omega", "Phi", "Kappa")))
    else:
        raise doc.fail(f"{where}: <Rotation> needs M_00..M_22 or Omega/Phi/Kappa (Heading/Pitch/Roll is not supported)")
    c = np.array([doc.number(center, k, where) for k in ("x", "y", "z")])
    return m, c


def _image_name(raw: str, root: Path, doc: _Doc, where: str) -> str:
    """The image's name relative to ``root``.

    An absolute path (often a Windows path from the machine that ran the aerotriangulation)
    is used relative to ``root`` when it lies inside it, else by its file name when
    ``root`` holds a file of that name.
    """
    windows = PureWindowsPath(raw)
    if windows.drive or windows.root == "\\" or Path(raw).is_absolute():
        if Path(raw).is_absolute():
            try:
                return Path(raw).resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                pass
        if (root / windows.name).is_file():
            return windows.name
        raise doc.fail(f"{where}: image path {raw!r} is outside the image folder {root} and {windows.name!r} "
                       "is not in it; pass images_root (the folder holding the images)")
    name = PurePosixPath(raw.replace("\\", "/")).as_posix()
    check_relative_path(root, name, doc.path)
    return name


def read_blocks_exchange(xml_path: str | Path, images_root: str | Path | None = None,
                         georef: Georef | None = None) -> Survey:
    """Read one block of a BlocksExchange XML file into a :class:`Survey`.

    Args:
        xml_path: the ``.xml`` file.
        images_root: the folder image paths are relative to (default: ``BaseImagePath``, else the XML's folder).
            Absolute image paths must lie inside it.
        georef: the target frame.  Required when the block has no SRS (a local Cartesian frame, taken to be
            this georef's local frame); otherwise poses are converted into it.  Default: see the module docstring.
    """
    doc = _Doc(Path(xml_path))
    try:
        top = parse_xml(doc.path.read_bytes(), doc.path, "BlocksExchange XML")
    except FileNotFoundError:
        raise doc.fail("file not found") from None
    except (ParseError, OSError, UnicodeDecodeError) as err:
        raise doc.fail(f"not valid XML ({err})") from None
    if top.tag != "BlocksExchange":
        raise doc.fail(f"root element is <{top.tag}>, expected <BlocksExchange>")
    srs_defs = {doc.text(s, "Id", "SRS"): doc.text(s, "Definition", "SRS")
                for s in top.findall("SpatialReferenceSystems/SRS")}
    blocks = top.findall("Block")
    if len(blocks) != 1:
        raise doc.fail(f"expected exactly one <Block>, found {len(blocks)}")
    block = blocks[0]

    base = (top.findtext("BaseImagePath") or "").strip()
    if images_root is not None:
        root = Path(images_root)
    elif base and not PureWindowsPath(base).drive:  # a Windows drive means another machine's folder
        root = doc.path.parent / base.replace("\\", "/")
    else:
        root = doc.path.parent

    def srs_of(srs_id: str | None) -> _Srs:
        if srs_id is None:
            return _Srs("local")
        if srs_id not in srs_defs:
            raise doc.fail(f"SRSId {srs_id} is not defined in <SpatialReferenceSystems>")
        return _parse_srs(srs_defs[srs_id], doc, srs_id)

    block_srs_id = (block.findtext("SRSId") or "").strip() or None
    cameras: list[Camera] = []
    photos_read: list[_Photo] = []
    seen_ids: set[str] = set()
    for g, pg in enumerate(block.findall("Photogroups/Photogroup")):
        pg_where = f"Photogroup {g} ({(pg.findtext('Name') or '').strip() or 'unnamed'})"
        photos = pg.findall("Photo")
        if not photos:
            continue
        cam, axes = _read_camera(pg, doc, pg_where)
        if cam not in cameras:
            cameras.append(cam)
        srs_id = (pg.findtext("SRSId") or "").strip() or block_srs_id or ""
        for photo in photos:
            photo_id = doc.text(photo, "Id", pg_where)
            where = f"Photo {photo_id}"
            if photo_id in seen_ids:
                raise doc.fail(f"{where}: duplicate photo Id")
            seen_ids.add(photo_id)
            name = _image_name(doc.text(photo, "ImagePath", where), root, doc, where)
            m, c = _read_pose(photo, doc, f"{where} ({name})")
            photos_read.append(_Photo(name, cameras.index(cam), axes.T @ m, c, srs_id))
    if not photos_read:
        raise doc.fail("block has no photos")

    by_srs = {sid: [p for p in photos_read if p.srs_id == sid] for sid in sorted({p.srs_id for p in photos_read})}
    srs_list = {sid: srs_of(sid or None) for sid in by_srs}
    target = georef or _default_georef(srs_list, by_srs, doc)
    c2w_of: dict[str, np.ndarray] = {}
    for sid, srs in srs_list.items():
        photos = by_srs[sid]
        local, rot = _to_target(srs, np.array([p.centre for p in photos]),
                                np.stack([p.w2c.T for p in photos]), target, doc)
        for p, t, r in zip(photos, local, rot, strict=True):
            c2w = np.eye(4)
            c2w[:3, :3], c2w[:3, 3] = r, t
            c2w_of[p.name] = check_pose(c2w, doc.path, what=f"pose of {p.name!r}")
    images = [SurveyImage(name=p.name, camera=p.camera, c2w=c2w_of[p.name]) for p in photos_read]
    return Survey(root=root, cameras=cameras, images=images, georef=target).validate(doc.path)


def _same_crs(a, b) -> bool:
    try:
        return bool(a.equals(b, ignore_axis_order=True))
    except (TypeError, AttributeError):
        return a == b


def _default_georef(srs_list: dict[str, _Srs], by_srs: dict[str, list[_Photo]], doc: _Doc) -> Georef:
    kinds = {s.kind for s in srs_list.values()}
    if "local" in kinds:
        raise doc.fail("block has no SRS (a local Cartesian frame) and so no georeferencing: pass georef, "
                       "or run `citygen ingest` to align it")
    first = next(iter(srs_list.values()))
    if len(srs_list) == 1 and first.kind == "projected":
        mean = np.mean([p.centre for p in by_srs[next(iter(srs_list))]], axis=0)
        try:
            return Georef(first.definition, tuple(np.round(mean)))
        except SurveyError as err:
            raise doc.fail(err.reason) from None
    # Everything else goes to the UTM zone of the cameras.
    ecef = np.concatenate([_to_ecef(s, np.array([p.centre for p in by_srs[sid]]), doc)[0]
                           for sid, s in srs_list.items()])
    lon, lat, _ = _apply(_transformer("EPSG:4978", "EPSG:4979", doc), ecef.mean(axis=0))
    crs = f"EPSG:{utm_epsg_for(float(lon), float(lat))}"
    utm = _apply(_transformer("EPSG:4978", crs, doc), ecef)
    return Georef(crs, tuple(np.round(utm.mean(axis=0))))


def _to_target(srs: _Srs, centers: np.ndarray, r_c2w: np.ndarray, target: Georef, doc: _Doc):
    """Camera centres (local metres) and camera-to-world rotations in ``target``'s local frame."""
    if srs.kind == "local":
        return centers.copy(), r_c2w.copy()
    if srs.kind == "projected" and _same_crs(srs.crs, target.pyproj_crs):
        return target.crs_to_local(centers), r_c2w.copy()
    ecef, axes = _to_ecef(srs, centers, doc)
    to_target = _transformer("EPSG:4978", target.pyproj_crs, doc)
    local = target.crs_to_local(_apply(to_target, ecef))
    if not np.all(np.isfinite(local)):
        raise doc.fail(f"camera centres cannot be expressed in {target.crs}")
    # source axis i in the target frame: J @ axes[:, :, i]; rotation of cameras follows.
    jac = _jacobian(to_target, ecef, axes)
    return local, jac @ r_c2w


# -- writing ----------------------------------------------------------------------------
def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = text
    return el


def write_blocks_exchange(survey: Survey, xml_path: str | Path) -> Path:
    """Write ``survey`` as BlocksExchange XML (atomically): one SRS (the georef's CRS), one block.

    Centres are written in the CRS (local + origin), rotations as world-to-camera ``M_ij``
    with ``CameraOrientation`` XRightYDown, focal lengths in pixels, and ``BaseImagePath``
    pointing at ``survey.root`` (relative to the XML's folder when possible).
    """
    xml_path = Path(xml_path)
    survey.validate(xml_path)
    top = ET.Element("BlocksExchange", version="2.1")
    srs = _sub(_sub(top, "SpatialReferenceSystems"), "SRS")
    _sub(srs, "Id", "0")
    _sub(srs, "Name", "citygen georef CRS")
    _sub(srs, "Definition", survey.georef.crs)
    try:
        base = os.path.relpath(Path(survey.root).resolve(), xml_path.parent.resolve())
    except ValueError:  # another drive on Windows
        base = str(Path(survey.root).resolve())
    _sub(top, "BaseImagePath", Path(base).as_posix())
    block = _sub(top, "Block")
    _sub(block, "Name", "citygen")
    _sub(block, "SRSId", "0")
    groups = _sub(block, "Photogroups")
    photo_id = 0
    for ci, cam in enumerate(survey.cameras):
        if cam.camera_model == "OPENCV_FISHEYE" or cam.k4 != 0.0:
            raise SurveyError(xml_path, f"camera {ci}: {cam.camera_model} distortion has no BlocksExchange "
                                        "Perspective equivalent")
        pg = _sub(groups, "Photogroup")
        _sub(pg, "Name", f"camera {ci}")
        dims = _sub(pg, "ImageDimensions")
        _sub(dims, "Width", str(cam.width))
        _sub(dims, "Height", str(cam.height))
        _sub(pg, "CameraModelType", "Perspective")
        _sub(pg, "FocalLengthPixels", repr(float(cam.fl_x)))
        _sub(pg, "CameraOrientation", "XRightYDown")
        pp = _sub(pg, "PrincipalPoint")
        _sub(pp, "x", repr(float(cam.cx) - 0.5))
        _sub(pp, "y", repr(float(cam.cy) - 0.5))
        _sub(pg, "AspectRatio", repr(float(cam.fl_y) / float(cam.fl_x)))
        _sub(pg, "Skew", "0")
        dist = _sub(pg, "Distortion")
        for key in ("K1", "K2", "K3", "P1", "P2"):
            _sub(dist, key, repr(float(getattr(cam, key.lower()))))
        for im in survey.images:
            if im.camera != ci:
                continue
            photo = _sub(pg, "Photo")
            _sub(photo, "Id", str(photo_id))
            photo_id += 1
            _sub(photo, "ImagePath", im.name)
            pose = _sub(photo, "Pose")
            rot = _sub(pose, "Rotation")
            w2c = np.asarray(im.c2w, dtype=np.float64)[:3, :3].T
            for i in range(3):
                for j in range(3):
                    _sub(rot, f"M_{i}{j}", repr(float(w2c[i, j])))
            center = _sub(pose, "Center")
            for key, v in zip("xyz", survey.georef.local_to_crs(np.asarray(im.c2w)[:3, 3]), strict=True):
                _sub(center, key, repr(float(v)))
    ET.indent(top)
    text = '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(top, encoding="unicode") + "\n"
    atomic_write_text(xml_path, text)
    return xml_path
