"""A small PLY reader for baked previews (meshes and point clouds from ``citygen export``).

Reads ``ascii``, ``binary_little_endian`` and ``binary_big_endian`` files.  Used vertex
properties: ``x y z`` (any numeric type), optional ``red green blue`` (uchar, or float in
[0, 1]) and an optional ``class`` (uchar) semantic id; faces come from the list property
``vertex_indices`` (or ``vertex_index``) and polygons are triangulated as fans.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from citygen.errors import CitygenError
from survey_io import Georef, SurveyError

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


@dataclass
class PlyModel:
    """Geometry of a PLY file: ``positions`` (N, 3) float64 as stored, ``colors`` (N, 3)
    uint8 or None, ``classes`` (N,) uint8 or None (255 = none), ``faces`` (M, 3) int32 or
    None (a point cloud), ``comments`` the header comments."""

    positions: np.ndarray
    colors: np.ndarray | None = None
    classes: np.ndarray | None = None
    faces: np.ndarray | None = None
    comments: tuple[str, ...] = ()

    def georef(self) -> Georef | None:
        """The georeference that citygen's exporters write in the header: ``comment crs ...``
        plus ``comment origin E N H`` for local coordinates; for coordinates in the CRS the
        origin is the model's centre (rounded to metres) so the local frame stays small."""
        crs = next((c[4:].strip() for c in self.comments if c.startswith("crs ")), None)
        if crs is None:
            return None
        origin = None
        for c in self.comments:
            if c.startswith("origin "):
                try:
                    origin = tuple(float(v) for v in c.split()[1:4])
                except ValueError:
                    origin = None
        if origin is None or len(origin) != 3:
            if not self.in_crs:
                return None
            origin = tuple(np.round(self.positions.mean(0)).tolist())
        try:
            return Georef(crs, origin)
        except SurveyError:
            return None

    @property
    def in_crs(self) -> bool:
        """True when the header says the coordinates are CRS coordinates (not local)."""
        return any("coordinates" in c and "in the crs" in c for c in self.comments)

    def localized(self, georef: Georef | None) -> PlyModel:
        """The model in the local frame of ``georef`` (float64; CRS coordinates minus origin)."""
        if georef is None or not self.in_crs:
            return self
        return PlyModel(self.positions - np.asarray(georef.origin), self.colors, self.classes, self.faces,
                        tuple(c for c in self.comments if "in the crs" not in c) + ("coordinates are local",))

    @property
    def is_mesh(self) -> bool:
        return self.faces is not None and len(self.faces) > 0

    @property
    def bounds(self) -> np.ndarray:
        return np.stack([self.positions.min(0), self.positions.max(0)]).astype(np.float64)


@dataclass
class _Element:
    name: str
    count: int
    props: list[tuple[str, str, str | None]]  # (name, value dtype, list-count dtype or None)


def _parse_header(f, path: Path, comments: list[str]) -> tuple[str, list[_Element]]:
    if f.readline().strip() != b"ply":
        raise CitygenError(path, "not a PLY file (missing 'ply' magic line)")
    fmt, elements = None, []
    while True:
        line = f.readline()
        if not line:
            raise CitygenError(path, "PLY header has no 'end_header'")
        text = line.decode("ascii", "replace").strip()
        words = text.split()
        if not words or words[0] in ("comment", "obj_info"):
            if words and words[0] == "comment":
                comments.append(text[len("comment"):].strip())
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            fmt = words[1] if len(words) > 1 else ""
            if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
                raise CitygenError(path, f"unsupported PLY format {fmt!r}")
        elif words[0] == "element" and len(words) == 3:
            try:
                elements.append(_Element(words[1], int(words[2]), []))
            except ValueError:
                raise CitygenError(path, f"bad PLY element line {line!r}") from None
        elif words[0] == "property" and elements:
            try:
                if words[1] == "list":
                    elements[-1].props.append((words[4], _TYPES[words[3]], _TYPES[words[2]]))
                else:
                    elements[-1].props.append((words[2], _TYPES[words[1]], None))
            except (IndexError, KeyError):
                raise CitygenError(path, f"bad PLY property line {line!r}") from None
        else:
            raise CitygenError(path, f"unexpected PLY header line {line!r}")
    if fmt is None:
        raise CitygenError(path, "PLY header has no 'format' line")
    return fmt, elements


def _read_binary(buf: memoryview, pos: int, el: _Element, endian: str, path: Path):
    """Columns of one element from a binary body starting at byte ``pos``; returns (cols, pos)."""
    if all(lt is None for _, _, lt in el.props):  # fixed-size records: one structured read
        dt = np.dtype([(n, endian + t) for n, t, _ in el.props])
        if pos + dt.itemsize * el.count > len(buf):
            raise CitygenError(path, f"PLY body is truncated in element {el.name!r}")
        arr = np.frombuffer(buf, dt, el.count, pos)
        return {n: arr[n] for n, _, _ in el.props}, pos + dt.itemsize * el.count
    # list properties: try the common case of a constant list length first
    cols: dict[str, list] = {n: [] for n, _, _ in el.props}
    if len(el.props) == 1 and el.count:
        name, vt, lt = el.props[0]
        cdt, vdt = np.dtype(endian + lt), np.dtype(endian + vt)
        if pos + cdt.itemsize > len(buf):
            raise CitygenError(path, f"PLY body is truncated in element {el.name!r}")
        k = int(np.frombuffer(buf, cdt, 1, pos)[0])
        rec = np.dtype([("n", cdt), ("v", vdt, (k,))])
        if pos + rec.itemsize * el.count <= len(buf):
            arr = np.frombuffer(buf, rec, el.count, pos)
            if np.all(arr["n"] == k):
                return {name: arr["v"]}, pos + rec.itemsize * el.count
    for _ in range(el.count):
        for n, vt, lt in el.props:
            try:
                if lt is None:
                    dt = np.dtype(endian + vt)
                    cols[n].append(np.frombuffer(buf, dt, 1, pos)[0])
                    pos += dt.itemsize
                else:
                    cdt, vdt = np.dtype(endian + lt), np.dtype(endian + vt)
                    k = int(np.frombuffer(buf, cdt, 1, pos)[0])
                    pos += cdt.itemsize
                    cols[n].append(np.frombuffer(buf, vdt, k, pos))
                    pos += vdt.itemsize * k
            except ValueError:
                raise CitygenError(path, f"PLY body is truncated in element {el.name!r}") from None
    return cols, pos


def _read_ascii(lines: list[bytes], start: int, el: _Element, path: Path):
    cols: dict[str, list] = {n: [] for n, _, _ in el.props}
    if start + el.count > len(lines):
        raise CitygenError(path, f"PLY body is truncated in element {el.name!r}")
    for i in range(start, start + el.count):
        words = lines[i].split()
        j = 0
        try:
            for n, vt, lt in el.props:
                if lt is None:
                    cols[n].append(float(words[j]))
                    j += 1
                else:
                    k = int(words[j])
                    cols[n].append(np.asarray([float(w) for w in words[j + 1:j + 1 + k]], vt))
                    if len(cols[n][-1]) != k:
                        raise IndexError
                    j += 1 + k
        except (IndexError, ValueError):
            raise CitygenError(path, f"bad PLY ascii line {i + 1} of the body in element {el.name!r}") from None
    typed = {n: np.asarray(cols[n], vt) if lt is None else cols[n] for n, vt, lt in el.props}
    return typed, start + el.count


def _triangulate(polys) -> np.ndarray:
    if isinstance(polys, np.ndarray) and polys.ndim == 2:
        if polys.shape[1] == 3:
            return polys.astype(np.int32)
        polys = list(polys)
    tris = []
    for p in polys:
        p = np.asarray(p, np.int64)
        for k in range(1, len(p) - 1):
            tris.append((p[0], p[k], p[k + 1]))
    return np.asarray(tris, np.int32).reshape(-1, 3)


def read_ply(path: str | Path) -> PlyModel:
    """Read a PLY point cloud or triangle mesh; CitygenError names the file on bad input."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CitygenError(path, f"cannot read PLY ({err.strerror or err})") from None

    f = io.BytesIO(data)
    comments: list[str] = []
    fmt, elements = _parse_header(f, path, comments)
    body = memoryview(data)[f.tell():]
    columns: dict[str, dict] = {}
    if fmt == "ascii":
        lines = [ln for ln in bytes(body).splitlines() if ln.strip()]
        pos = 0
        for el in elements:
            columns[el.name], pos = _read_ascii(lines, pos, el, path)
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        pos = 0
        for el in elements:
            columns[el.name], pos = _read_binary(body, pos, el, endian, path)
    vertex = columns.get("vertex")
    if vertex is None or not all(k in vertex for k in "xyz"):
        raise CitygenError(path, "PLY has no vertex element with x, y, z")
    positions = np.stack([np.asarray(vertex[k], np.float64) for k in "xyz"], axis=1)
    if len(positions) == 0:
        raise CitygenError(path, "PLY has no vertices")
    if not np.all(np.isfinite(positions)):
        raise CitygenError(path, "PLY vertex positions are not all finite")
    colors = None
    if all(k in vertex for k in ("red", "green", "blue")):
        rgb = np.stack([np.asarray(vertex[k]) for k in ("red", "green", "blue")], axis=1)
        if rgb.dtype.kind == "f":
            rgb = np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5
        colors = np.asarray(rgb).astype(np.uint8)
    classes = np.asarray(vertex["class"]).astype(np.uint8) if "class" in vertex else None
    faces = None
    face = columns.get("face")
    if face is not None:
        key = "vertex_indices" if "vertex_indices" in face else "vertex_index" if "vertex_index" in face else None
        if key is None:
            raise CitygenError(path, "PLY face element has no vertex_indices list")
        faces = _triangulate(face[key])
        if len(faces) and (faces.min() < 0 or faces.max() >= len(positions)):
            raise CitygenError(path, f"PLY face indices out of range 0..{len(positions) - 1}")
    return PlyModel(positions, colors, classes, faces, tuple(comments))
