"""A small binary little-endian PLY writer (vertices with any properties, optional faces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from survey_io.atomic import atomic_path

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
    props = []
    for name in vertices.dtype.names:
        dt = np.dtype(vertices.dtype.fields[name][0])
        if dt not in _PLY_TYPES:
            raise ValueError(f"PLY property {name!r}: unsupported dtype {dt}")
        props.append(f"property {_PLY_TYPES[dt]} {name}")
    lines = ["ply", "format binary_little_endian 1.0"]
    lines += [f"comment {c}" for c in comments]
    lines += [f"element vertex {len(vertices)}", *props]
    if faces is not None:
        faces = np.asarray(faces)
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header = ("\n".join(lines) + "\nend_header\n").encode("ascii")
    with atomic_path(path, suffix=".ply") as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(vertices.tobytes())
        if faces is not None:
            rec = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
            rec["n"] = 3
            rec["v"] = faces
            f.write(rec.tobytes())
    return path
