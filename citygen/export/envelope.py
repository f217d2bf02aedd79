"""A tile's baked envelopes (:mod:`citygen.render.envelope`): bake or load every trained block's,
and write each as a glTF binary mesh (``citygen bake-envelope TILE``).

**Where.**  A block's envelope lives in its run folder (:func:`citygen.store.layout.envelope_file`);
it is baked again when the block's newest checkpoint is newer than it (the block was trained on).

**What is shown: the inner shell.**  The viewer flies over every block's *inner* shell (opacity
0.5 per step: where the field turns opaque), not the outer one: on a young field the outer shell
(1e-2 per step) wraps the semi-transparent layer metres above the surface, and its colours, the
field seen inward from there, are that fog's -- on the 200-step smoke tile it was one pale blob
over the whole tile, while the inner shell shows the streets, trees, water and roofs of the
neural render (where the field is nowhere opaque, e.g. thin ground, it has holes).

**Display levels of detail** (:func:`view_levels`).  Rasterised on the CPU by Mesa's llvmpipe when
there is no GPU, a frame costs per triangle sent and per pixel covered: a block's inner shell is
decimated to each of ``VIEW_LEVELS`` triangles (open3d's quadric decimation, colours carried along,
each level from the previous one) and kept beside the envelope
(:func:`citygen.store.layout.envelope_view_file`; stale when older than it, or baked for other
levels), each level with its error: the one-sided Hausdorff distance from its vertices to the full
inner shell (:func:`surface_deviation`), which the viewer turns into pixels to choose a level per
chunk (:mod:`viewer.lod`).  Measured on the demo tile (4 blocks x 2100 steps, 82-92k inner
triangles per block): 1.06-1.22 m at 25k triangles, 3.5-5.6 m at the 6k level; that level stalls
at 6.0-8.9k triangles, since quadric decimation keeps every separate piece of the young field's
shell (~300 per block).  Frame times: DESIGN.md's viewer entries.

**glTF.**  One ``<block id>.glb`` per block: a shell (the inner by default, what the viewer shows;
the outer bounds everything the field renders) at full resolution with its per-vertex colours
(``COLOR_0``).  glTF is y-up, right-handed, metres; the tile's local frame is z-up
(x east, y north), so positions are stored as (x, z, -y) -- small float32 numbers around the
tile's origin -- and the scene's ``extras`` carry what georeferences them: the CRS (as given
and as WKT), the local origin (E, N, H) in it, and ``gltf_to_crs``, the 4x4 row-major matrix
taking a glTF position to CRS coordinates (the axis swap plus the origin).  Written by trimesh,
atomically.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from survey_io import Georef
from survey_io.atomic import atomic_path

from ..errors import CitygenError
from ..extras import require_open3d
from ..render.envelope import Envelope, Shell, bake_field_envelope, load_envelope, save_envelope
from ..render.realtime import RealtimeSampling, pack_field
from ..store.layout import (
    block_checkpoint,
    discover,
    envelope_file,
    envelope_view_file,
    open_block_field,
    tile_georef,
)

#: triangles of a block's display levels of detail, finest first (module docstring)
VIEW_LEVELS = (25_000, 6_000)
VIEW_FORMAT = "citygen-envelope-view/2"
#: local z-up (x east, y north, z up) -> glTF y-up: (x, y, z) -> (x, z, -y)
Z_UP_TO_Y_UP = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])


def gltf_to_crs(georef: Georef | None) -> np.ndarray:
    """4x4 matrix (row-major, column vectors) from a glTF position to CRS coordinates (or to the
    local frame without a georef)."""
    m = np.eye(4)
    m[:3, :3] = Z_UP_TO_Y_UP.T
    if georef is not None:
        m[:3, 3] = georef.origin
    return m


def write_glb(path: str | Path, shell: Shell, georef: Georef | None, name: str = "envelope",
              extras: dict[str, Any] | None = None) -> Path:
    """Write ``shell`` (local-frame vertices, per-vertex colours) as a glTF binary (module docstring)."""
    try:
        import trimesh  # deferred: the mesh extra
    except ImportError:
        raise CitygenError(path, "writing glTF needs trimesh: pip install 'citygen[mesh]'") from None
    path = Path(path)
    vertices = np.asarray(shell.vertices, np.float64) @ Z_UP_TO_Y_UP.T
    colors = np.concatenate([np.asarray(shell.colors, np.uint8), np.full((len(vertices), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(vertices, np.asarray(shell.triangles, np.int64), vertex_colors=colors, process=False)
    scene = trimesh.Scene()
    scene.add_geometry(mesh, geom_name=name, node_name=name)
    meta: dict[str, Any] = {"generator": "citygen", "up_axis": "Y (glTF); local frame z-up: glTF (x, y, z) = (x, z, -y)",
                            "gltf_to_crs": gltf_to_crs(georef).tolist()}
    if georef is not None:
        meta.update(crs=georef.crs, crs_wkt=georef.pyproj_crs.to_wkt(), origin=list(georef.origin))
    meta.update(extras or {})
    scene.metadata.update(meta)
    data = scene.export(file_type="glb")
    with atomic_path(path, suffix=".glb") as tmp:
        Path(tmp).write_bytes(data)
    return path


def read_glb(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """A glb written by :func:`write_glb`, back in the local frame: vertices (V, 3), triangles
    (F, 3), colours (V, 3) uint8 and the scene's extras."""
    import trimesh  # deferred: the mesh extra

    raw = Path(path).read_bytes()
    mesh = trimesh.load(io.BytesIO(raw), file_type="glb", force="mesh", process=False)
    # the JSON chunk (after the 12-byte header: chunk length, chunk type, JSON) holds the extras
    n = struct.unpack_from("<I", raw, 12)[0]
    extras = json.loads(raw[20:20 + n])["scenes"][0].get("extras", {})
    local = np.asarray(mesh.vertices) @ Z_UP_TO_Y_UP
    return local, np.asarray(mesh.faces), np.asarray(mesh.visual.vertex_colors)[:, :3], extras


def block_envelope(run_dir: Path, *, bake: bool = True, force: bool = False, device: str = "cpu",
                   log: Callable[[str], None] | None = None) -> Envelope | None:
    """The envelope of the block trained in ``run_dir``: loaded when it is newer than the block's
    newest checkpoint, else baked and saved (None when it is missing and ``bake`` is False)."""
    path = envelope_file(run_dir)
    sidecar = block_checkpoint(run_dir)
    if path.is_file() and not force and path.stat().st_mtime >= sidecar.stat().st_mtime:
        return load_envelope(path)
    if not bake:
        return None
    field, meta = open_block_field(run_dir, device)
    render = meta["train_config"].render
    # the budget is a share of the packed block's bytes: its hash tables and MLPs; the fine
    # occupancy bits (a small share) are left out rather than baked only to be counted
    packed = pack_field(field, render, sampling=RealtimeSampling(occupancy_factor=1))
    if log:
        log(f"baking the envelope of {run_dir.name} (packed block {packed.nbytes / 1e6:.1f} MB)")
    env = bake_field_envelope(field, render.step_size, packed.nbytes, min_transmittance=render.min_transmittance)
    save_envelope(path, env)
    return env


def _decimate_coloured(shell: Shell, target: int) -> Shell:
    """``shell`` decimated to about ``target`` triangles by open3d's quadric decimation, the
    per-vertex colours carried along."""
    o3d = require_open3d("the viewer's envelope layer: decimating the envelope for display")
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(shell.vertices.astype(np.float64)),
                                     o3d.utility.Vector3iVector(shell.triangles.astype(np.int32)))
    mesh.vertex_colors = o3d.utility.Vector3dVector(shell.colors.astype(np.float64) / 255.0)
    mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=max(int(target), 4))
    mesh.remove_unreferenced_vertices()
    colors = np.clip(np.asarray(mesh.vertex_colors) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Shell(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.triangles, np.int32), colors)


def surface_deviation(drawn: Shell, reference: Shell) -> float:
    """How far what ``drawn`` shows lies from ``reference``, metres: the largest distance from a
    vertex of ``drawn`` to the surface of ``reference`` (open3d's point-to-triangle distance on a
    BVH), the one-sided Hausdorff distance on vertices.  Between its vertices a triangle of
    ``drawn`` is a chord, off by at most the reference's own curvature over its length."""
    if not len(drawn.triangles):
        return 0.0
    if not len(reference.triangles):
        return float("inf")
    o3d = require_open3d("the viewer's envelope layer: measuring the display levels' error")
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(reference.vertices, np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(reference.triangles, np.uint32)))
    used = np.unique(drawn.triangles)
    return float(scene.compute_distance(o3d.core.Tensor(np.ascontiguousarray(drawn.vertices[used],
                                                                             np.float32))).numpy().max())


@dataclass
class ViewLevel:
    """One display level of detail of a block: the inner shell decimated, and its geometric
    deviation from the full inner shell (:func:`surface_deviation`, metres)."""

    shell: Shell
    error_m: float


def _save_levels(path: Path, levels: list[ViewLevel], targets: tuple[int, ...]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, lv in enumerate(levels):
        tensors[f"lod{k}_vertices"] = torch.from_numpy(np.ascontiguousarray(lv.shell.vertices, np.float32))
        tensors[f"lod{k}_triangles"] = torch.from_numpy(np.ascontiguousarray(lv.shell.triangles, np.int32))
        tensors[f"lod{k}_colors"] = torch.from_numpy(np.ascontiguousarray(lv.shell.colors, np.uint8))
    tensors["error_m"] = torch.tensor([lv.error_m for lv in levels], dtype=torch.float64)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": VIEW_FORMAT, "targets": json.dumps(list(targets))})


def _load_levels(path: Path, targets: tuple[int, ...]) -> list[ViewLevel] | None:
    """The levels cached at ``path``; None when the file is of another format or other targets
    (an older bake: made again) or unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != VIEW_FORMAT or json.loads(meta.get("targets", "null")) != list(targets):
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}    # noqa: SIM118 - safe_open has no iterator
        errors = t["error_m"].tolist()
        levels = [ViewLevel(Shell(t[f"lod{k}_vertices"].numpy(), t[f"lod{k}_triangles"].numpy(),
                                  t[f"lod{k}_colors"].numpy()), float(e)) for k, e in enumerate(errors)]
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    for lv in levels:
        n = len(lv.shell.vertices)
        if lv.shell.triangles.ndim != 2 or (len(lv.shell.triangles) and not 0 <= lv.shell.triangles.min() <= lv.shell.triangles.max() < n):
            return None
    return levels


def view_levels(run_dir: Path, envelope: Envelope, levels: tuple[int, ...] = VIEW_LEVELS) -> list[ViewLevel]:
    """The block's display levels of detail (module docstring), cached in its run folder: the
    inner shell decimated to each of ``levels`` triangles (finest first; a level the shell is
    already below keeps it whole), each with its measured error against the full inner shell."""
    path, source = envelope_view_file(run_dir), envelope_file(run_dir)
    if path.is_file() and source.is_file() and path.stat().st_mtime >= source.stat().st_mtime:
        cached = _load_levels(path, levels)
        if cached is not None:
            return cached
    full, out = envelope.inner, []
    shell = full
    for target in levels:
        if len(shell.triangles) > target:
            # each level from the previous one: decimation's cost is in the input's size
            shell = _decimate_coloured(shell, target)
        out.append(ViewLevel(shell, surface_deviation(shell, full) if shell is not full else 0.0))
    _save_levels(path, out, levels)
    return out


def tile_view_levels(tile_dir: str | Path, *, bake: bool = True, device: str = "cpu",
                     log: Callable[[str], None] | None = None) -> dict[str, list[ViewLevel]]:
    """Every block's display levels (:func:`view_levels`) for the viewer, baking the envelopes
    first where missing or stale when ``bake``; without ``bake`` only the blocks that have one."""
    out = {}
    for block_id, run in discover(tile_dir).trained.items():
        env = block_envelope(run, bake=bake, device=device, log=log)
        if env is not None:
            out[block_id] = view_levels(run, env)
    return out


def tile_envelopes(tile_dir: str | Path, *, bake: bool = True, force: bool = False, device: str = "cpu",
                   log: Callable[[str], None] | None = None) -> dict[str, Envelope]:
    """Every trained block's envelope (block id -> envelope), baking the missing or stale ones
    when ``bake``; without ``bake`` only the blocks that have a current one."""
    out = {}
    for block_id, run in discover(tile_dir).trained.items():
        env = block_envelope(run, bake=bake, force=force, device=device, log=log)
        if env is not None:
            out[block_id] = env
    return out


def bake_tile_envelopes(tile_dir: str | Path, glb_dir: str | Path | None = None, *, force: bool = False,
                        device: str = "cpu", shell: str = "inner",
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``citygen bake-envelope``: bake (or reuse) every block's envelope and display mesh; with
    ``glb_dir`` also write ``<block id>.glb`` there, of the ``shell`` ("inner" or "outer").
    Returns a JSON-able report."""
    if shell not in ("inner", "outer"):
        raise CitygenError(None, f"--shell must be inner or outer, got {shell!r}")
    tile_dir = Path(tile_dir)
    envelopes = tile_envelopes(tile_dir, force=force, device=device, log=log)
    if not envelopes:
        raise CitygenError(tile_dir, "no trained block to bake an envelope of")
    georef = tile_georef(tile_dir)
    report: dict[str, Any] = {"tile": str(tile_dir), "crs": georef.crs if georef else None, "blocks": {}}
    for block_id, env in envelopes.items():
        row = {"envelope": str(envelope_file(discover(tile_dir).trained[block_id])),
               "outer_triangles": len(env.outer.triangles), "inner_triangles": len(env.inner.triangles),
               "bytes": env.nbytes, "bake_s": round(env.bake_seconds, 1)}
        levels = view_levels(discover(tile_dir).trained[block_id], env)
        row["view_triangles"] = [len(lv.shell.triangles) for lv in levels]
        row["view_error_m"] = [round(lv.error_m, 3) for lv in levels]
        if glb_dir is not None:
            row["glb"] = str(write_glb(Path(glb_dir) / f"{block_id}.glb", getattr(env, shell), georef,
                                       name=block_id, extras={"block": block_id, "shell": shell}))
        report["blocks"][block_id] = row
    return report


__all__ = ["VIEW_LEVELS", "ViewLevel", "bake_tile_envelopes", "block_envelope", "gltf_to_crs", "read_glb",
           "surface_deviation", "tile_envelopes", "tile_view_levels", "view_levels", "write_glb"]
