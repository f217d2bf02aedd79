"""A small binary little-endian PLY writer (vertices with any properties, optional faces), and a
streamed one for vertex-only files of any size (:class:`PlyVertexWriter`)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from survey_io.atomic import atomic_path, scratch_path

_PLY_TYPES = {np.dtype("<f4"): "float", np.dtype("<f8"): "double", np.dtype("u1"): "uchar",
              np.dtype("i1"): "char", np.dtype("<u2"): "ushort", np.dtype("<i2"): "short",
              np.dtype("<u4"): "uint", np.dtype("<i4"): "int"}


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray | None = None,
              comments: tuple[str, ...] = ()) -> Path:
    """Write a binary little-endian PLY atomically.

    Args:
        vertices: a structured array; each field becomes a vertex property of the same name
            (little-endian float/double/uchar/... fields).
        faces: optional (F, 3) vertex indices (written as ``list uchar int vertex_indices``).
        comments: header comment lines (no newlines).
    """
    path = Path(path)
    vertices = np.ascontiguousarray(vertices).astype(vertices.dtype.newbyteorder("<"), copy=False)
    if faces is not None:
        faces = np.asarray(faces)
    header = _header(vertices.dtype, len(vertices), comments, None if faces is None else len(faces))
    with atomic_path(path, suffix=".ply") as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(vertices.tobytes())
        if faces is not None:
            rec = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
            rec["n"] = 3
            rec["v"] = faces
            f.write(rec.tobytes())
    return path


def _header(dtype: np.dtype, n_vertices: int, comments: tuple[str, ...], n_faces: int | None = None) -> bytes:
    props = []
    for name in dtype.names:
        dt = np.dtype(dtype.fields[name][0])
        if dt not in _PLY_TYPES:
            raise ValueError(f"PLY property {name!r}: unsupported dtype {dt}")
        props.append(f"property {_PLY_TYPES[dt]} {name}")
    lines = ["ply", "format binary_little_endian 1.0"]
    lines += [f"comment {c}" for c in comments]
    lines += [f"element vertex {n_vertices}", *props]
    if n_faces is not None:
        lines += [f"element face {n_faces}", "property list uchar int vertex_indices"]
    return ("\n".join(lines) + "\nend_header\n").encode("ascii")


class PlyVertices:
    """The sink :func:`ply_vertex_writer` yields: :meth:`write` appends vertices."""

    def __init__(self, body, dtype: np.dtype):
        self._body, self.dtype, self.count = body, dtype, 0

    def write(self, vertices: np.ndarray) -> None:
        self._body.write(np.ascontiguousarray(vertices, dtype=self.dtype).tobytes())
        self.count += len(vertices)


@contextlib.contextmanager
def ply_vertex_writer(path: str | Path, dtype: np.dtype, comments: tuple[str, ...] = ()) -> Iterator[PlyVertices]:
    """A vertex-only binary PLY written chunk by chunk, atomically.

    Yields a :class:`PlyVertices`; its chunks (structured arrays of ``dtype``) go to a staging
    file, and on a clean exit the header (whose vertex count is known only then) and the
    staged vertices are copied into ``path``.  Memory: one chunk.  On an exception nothing is
    written.
    """
    path, dtype = Path(path), np.dtype(dtype).newbyteorder("<")
    _header(dtype, 0, comments)  # refuse unsupported properties before anything is written
    with scratch_path(path, suffix=".stage.ply") as stage:
        with open(stage, "wb") as body:
            sink = PlyVertices(body, dtype)
            yield sink
        with atomic_path(path, suffix=".ply") as tmp, open(tmp, "wb") as out, open(stage, "rb") as body:
            out.write(_header(dtype, sink.count, comments))
            shutil.copyfileobj(body, out, 1 << 24)
