"""A tile's envelopes as glTF binary (citygen.export.envelope, ``citygen bake-envelope --glb``):
the file read back by trimesh and, independently, by parsing the GLB container by hand, against
the mesh written (vertices, triangles, colours) and the georeference in its extras."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyproj
import pytest

from citygen.cli import entrypoint
from citygen.render.envelope import Shell
from survey_io import Georef

pytest.importorskip("trimesh", reason="glTF is written with trimesh (the mesh extra)")

from citygen.export.envelope import read_glb, write_glb  # noqa: E402

GEOREF = Georef("EPSG:32651", (350000.0, 3450000.0, 20.0))


def tetra() -> Shell:
    v = np.array([[0.0, 0.0, 0.0], [12.5, 0.0, 1.0], [0.0, 30.25, 2.0], [3.0, 4.0, 17.0]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]], np.int32)
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [17, 99, 201]], np.uint8)
    return Shell(v, f, c)


def glb_chunks(raw: bytes) -> tuple[dict, bytes]:
    """The GLB container by the glTF 2.0 spec: 12-byte header, JSON chunk, BIN chunk."""
    magic, version, length = struct.unpack_from("<4sII", raw, 0)
    assert (magic, version, length) == (b"glTF", 2, len(raw))
    n, kind = struct.unpack_from("<I4s", raw, 12)
    assert kind == b"JSON"
    doc = json.loads(raw[20:20 + n])
    m, kind = struct.unpack_from("<I4s", raw, 20 + n)
    assert kind == b"BIN\x00"
    return doc, raw[28 + n:28 + n + m]


def accessor(doc: dict, binary: bytes, index: int) -> np.ndarray:
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    dtype = {5126: np.float32, 5121: np.uint8, 5125: np.uint32, 5123: np.uint16}[acc["componentType"]]
    width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[acc["type"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    return np.frombuffer(binary, dtype, acc["count"] * width, start).reshape(acc["count"], width)


def test_glb_round_trip_with_crs(tmp_path):
    shell = tetra()
    path = write_glb(tmp_path / "b.glb", shell, GEOREF, name="b", extras={"block": "b"})
    # trimesh reads it back in the local frame
    v, f, c, extras = read_glb(path)
    np.testing.assert_allclose(v, shell.vertices, atol=1e-5)
    np.testing.assert_array_equal(f, shell.triangles)
    np.testing.assert_array_equal(c, shell.colors)
    # by hand: glTF positions are y-up (x, z, -y); the extras' matrix takes them to the CRS
    doc, binary = glb_chunks(path.read_bytes())
    prim = doc["meshes"][0]["primitives"][0]
    pos = accessor(doc, binary, prim["attributes"]["POSITION"]).astype(np.float64)
    local = shell.vertices.astype(np.float64)
    np.testing.assert_allclose(pos, np.stack([local[:, 0], local[:, 2], -local[:, 1]], 1), atol=1e-5)
    col = accessor(doc, binary, prim["attributes"]["COLOR_0"])
    np.testing.assert_array_equal(col[:, :3], shell.colors)
    extras = doc["scenes"][doc.get("scene", 0)]["extras"]
    m = np.asarray(extras["gltf_to_crs"])
    crs_xyz = (m @ np.c_[pos, np.ones(len(pos))].T).T[:, :3]
    np.testing.assert_allclose(crs_xyz, local + np.array([350000.0, 3450000.0, 20.0]), atol=1e-4)
    assert extras["crs"] == "EPSG:32651" and extras["origin"] == [350000.0, 3450000.0, 20.0]
    assert pyproj.CRS.from_wkt(extras["crs_wkt"]).to_epsg() == 32651 and extras["block"] == "b"
    assert not list(tmp_path.glob(".*"))                   # nothing half-written left behind


def test_bake_envelope_cli_bad_tile(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert entrypoint(["bake-envelope", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("citygen: error: ") and "plan.json" in err[0]
    assert entrypoint(["bench", "view"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tile" in err[0]


def test_view_levels_within_tolerance_of_the_sphere_keep_colour_and_cache(tmp_path):
    o3d = pytest.importorskip("open3d")
    from citygen.export.envelope import view_levels
    from citygen.render.envelope import Envelope, save_envelope
    from citygen.store.layout import envelope_file, envelope_view_file

    radius, centre = 10.0, np.float32([5.0, -3.0, 12.0])
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=radius, resolution=40)   # 3120 triangles
    v = np.asarray(sphere.vertices, np.float32) + centre
    f = np.asarray(sphere.triangles, np.int32)
    shell = Shell(v, f, np.tile(np.uint8([90, 140, 200]), (len(v), 1)))
    empty = Shell(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.uint8))
    env = Envelope(empty, shell, 1.0, 2.0, 3.0, 0.5)          # the viewer shows the inner shell
    save_envelope(envelope_file(tmp_path), env)
    levels = view_levels(tmp_path, env, levels=(1200, 300, 80))
    tris = [len(lv.shell.triangles) for lv in levels]
    assert 600 <= tris[0] <= 1200 and 150 <= tris[1] <= 300 and 40 <= tris[2] <= 80
    # the full mesh's own chord error (sagitta of its longest edge) against the exact sphere
    edges = np.linalg.norm(v[f] - v[np.roll(f, 1, axis=1)], axis=-1).max()
    sagitta = radius - np.sqrt(radius**2 - (edges / 2) ** 2)
    for lv in levels:
        # closed form: a vertex's distance to the sphere is | |v - c| - R |; the measured error
        # bounds it up to the full mesh's own sagitta
        off = np.abs(np.linalg.norm(lv.shell.vertices - centre, axis=1) - radius)
        assert off.max() <= lv.error_m + sagitta + 1e-4
        assert np.all(lv.shell.colors == (90, 140, 200))
    # coarser levels are further from the sphere, and all within 10 % of its radius (measured:
    # 0.04 / 0.22 / 0.69 m, the last 0.7 % of R under the bound)
    errors = [lv.error_m for lv in levels]
    assert 0 < errors[0] < errors[1] < errors[2] < 0.1 * radius
    assert envelope_view_file(tmp_path).is_file()
    again = view_levels(tmp_path, Envelope(empty, empty, 1.0, 2.0, 3.0, 0.5), levels=(1200, 300, 80))  # cached
    np.testing.assert_array_equal(again[1].shell.triangles, levels[1].shell.triangles)
    assert [lv.error_m for lv in again] == errors
    # other targets: the cache is stale and made again
    assert len(view_levels(tmp_path, env, levels=(500,))) == 1


def test_surface_deviation_closed_form_planes():
    pytest.importorskip("open3d")
    from citygen.export.envelope import surface_deviation

    square = np.array([[0, 0, 0], [4, 0, 0], [4, 4, 0], [0, 4, 0]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    c = np.zeros((4, 3), np.uint8)
    lifted = square + np.float32([0, 0, 0.75])
    assert surface_deviation(Shell(square, f, c), Shell(lifted, f, c)) == pytest.approx(0.75, abs=1e-6)
    # a smaller square above the first: its corners lie 0.5 above the big one, while the big
    # one's corners are sqrt(1 + 1 + 0.25) = 1.5 m from the small one's nearest corner
    small = np.array([[1, 1, 0.5], [3, 1, 0.5], [3, 3, 0.5], [1, 3, 0.5]], np.float32)
    assert surface_deviation(Shell(small, f, c), Shell(square, f, c)) == pytest.approx(0.5, abs=1e-6)
    assert surface_deviation(Shell(square, f, c), Shell(small, f, c)) == pytest.approx(1.5, abs=1e-6)
