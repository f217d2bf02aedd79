"""The envelope layer's geometry on the GPU side: every block's display levels of detail
(:func:`citygen.export.envelope.view_levels`) cut into chunks, uploaded once, and per frame the
chunks to draw at which level (frustum culling, screen-space error, a triangle budget).

**Why.**  Without a GPU the layer is rasterised by Mesa's llvmpipe, whose cost grows with the
triangles sent (vertex shading and binning on the CPU) and the pixels covered.  So a frame sends
only what it can see, only as fine as a pixel can show:

* **Chunks.**  Each block's levels are cut on an ``n x n`` grid over the block's footprint (a
  triangle goes to the cell of its centroid); a chunk's box bounds its triangles at *every* level,
  so one test culls it whatever level it would be drawn at.  All levels of all chunks share one
  vertex and one index buffer, uploaded when the mesh is set: a frame only issues draw calls over
  index ranges (no per-frame upload).
* **Culling.**  A chunk is dropped when its box lies wholly outside one plane of the view frustum
  (the planes of the GL clip matrix, Gribb & Hartmann); a block whose box is outside drops all its
  chunks.  Conservative: a box straddling two planes' corner region is kept.
* **Level.**  A level's error ``e`` (metres, measured at bake time against the full shell) seen at
  distance ``d`` spans ``e * f / d`` pixels (``f`` the focal length in pixels); each chunk takes the
  coarsest level within ``pixel_error`` pixels at the nearest point of its box.  Neighbouring chunks
  at different levels can leave cracks as wide as the coarser level's error, i.e. under the
  same pixel bound; the neural render replaces the layer at rest.
* **Budget.**  When the chosen levels exceed ``max_triangles``, the farthest chunks are coarsened
  first until the frame fits (or all are at the coarsest level).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from citygen.errors import CitygenError

#: a level is fine enough while its error spans at most this many pixels
PIXEL_ERROR = 2.0
#: triangles per frame the selection keeps to (measured: llvmpipe at 1280x720 on the 2-core box,
#: DESIGN.md's viewer entry)
MAX_TRIANGLES = 60_000
#: chunk grid per block side
CHUNKS_PER_SIDE = 4


@dataclass
class LodMesh:
    """All blocks' levels in one vertex/index array (see the module docstring).

    ``positions`` (N, 3) float32, ``colors`` (N, 3) uint8, ``indices`` (M,) int32 into them;
    chunk ``c`` of block ``chunk_block[c]`` draws ``indices[first:first + count]`` with
    ``(first, count) = ranges[c, level]``; ``boxes`` (C, 2, 3) bound its triangles at every level;
    ``errors`` (C, L) the level errors (metres) of its block; ``block_names`` index ``chunk_block``."""

    positions: np.ndarray
    colors: np.ndarray
    indices: np.ndarray
    ranges: np.ndarray
    boxes: np.ndarray
    errors: np.ndarray
    chunk_block: np.ndarray
    block_names: tuple[str, ...]
    block_boxes: np.ndarray
    classes: None = None
    comments: tuple[str, ...] = ()

    @property
    def levels(self) -> int:
        return self.ranges.shape[1]

    @property
    def is_mesh(self) -> bool:
        return True

    @property
    def bounds(self) -> np.ndarray:
        return np.stack([self.block_boxes[:, 0].min(0), self.block_boxes[:, 1].max(0)])

    @property
    def faces(self) -> np.ndarray:
        """The finest level's triangles (every chunk), (F, 3)."""
        return np.concatenate([self.indices[f:f + n] for f, n in self.ranges[:, 0]]).reshape(-1, 3)

    def level_triangles(self) -> list[int]:
        """Triangles of the whole tile at each level."""
        return [int(n) for n in self.ranges[:, :, 1].sum(0) // 3]


def build_lod_mesh(blocks: dict[str, list], chunks_per_side: int = CHUNKS_PER_SIDE) -> LodMesh:
    """A :class:`LodMesh` from each block's levels, finest first: a list of
    :class:`~citygen.export.envelope.ViewLevel` (or of bare shells, error 0) per block; blocks
    with fewer levels repeat their coarsest."""
    if not blocks:
        raise CitygenError(None, "the tile has no envelope to draw")
    per_block = {name: [(getattr(lv, "shell", lv), float(getattr(lv, "error_m", 0.0))) for lv in levels]
                 for name, levels in blocks.items() if len(levels)}
    n_levels = max(len(v) for v in per_block.values())
    positions, colors = [], []
    chunk_tris: dict[tuple[int, int], list[np.ndarray]] = {}   # (block, cell) -> per-level index arrays
    boxes, errors, names, block_boxes, offset = {}, {}, [], [], 0
    for b, (name, levels) in enumerate(per_block.items()):
        levels = levels + [levels[-1]] * (n_levels - len(levels))
        names.append(name)
        verts = [np.asarray(s.vertices, np.float32) for s, _ in levels]
        allv = np.concatenate([v for v in verts if len(v)] or [np.zeros((1, 3), np.float32)])
        lo, hi = allv.min(0), allv.max(0)
        block_boxes.append(np.stack([lo, hi]))
        span = np.maximum(hi[:2] - lo[:2], 1e-6)
        for k, (shell, err) in enumerate(levels):
            v, f = verts[k], np.asarray(shell.triangles, np.int64)
            centroid = v[f].mean(1) if len(f) else np.zeros((0, 3), np.float32)
            cell = np.clip(((centroid[:, :2] - lo[:2]) / span * chunks_per_side).astype(np.int64), 0,
                           chunks_per_side - 1)
            cid = cell[:, 0] * chunks_per_side + cell[:, 1]
            for c in range(chunks_per_side * chunks_per_side):
                tri = f[cid == c]
                key = (b, c)
                chunk_tris.setdefault(key, [None] * n_levels)[k] = (tri + offset).astype(np.int32)
                if len(tri):
                    pts = v[tri.reshape(-1)]
                    box = np.stack([pts.min(0), pts.max(0)])
                    old = boxes.get(key)
                    boxes[key] = box if old is None else np.stack([np.minimum(old[0], box[0]),
                                                                   np.maximum(old[1], box[1])])
            positions.append(v)
            colors.append(np.asarray(shell.colors, np.uint8))
            offset += len(v)
        errors[b] = [e for _, e in levels]
    # index buffer ordered level-major, so that neighbouring chunks at one level are contiguous
    keys = [k for k in chunk_tris if k in boxes]
    ranges = np.zeros((len(keys), n_levels, 2), np.int64)
    parts, first = [], 0
    for k in range(n_levels):
        for c, key in enumerate(keys):
            tri = chunk_tris[key][k].reshape(-1)
            ranges[c, k] = (first, len(tri))
            parts.append(tri)
            first += len(tri)
    return LodMesh(np.concatenate(positions), np.concatenate(colors),
                   np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32), ranges,
                   np.stack([boxes[k] for k in keys]).astype(np.float64),
                   np.array([errors[b] for b, _ in keys], np.float64).reshape(len(keys), n_levels),
                   np.array([b for b, _ in keys], np.int64), tuple(names), np.stack(block_boxes).astype(np.float64),
                   comments=("coordinates are local",))


def frustum_planes(clip: np.ndarray) -> np.ndarray:
    """The six planes (a, b, c, d) of the view frustum of a GL clip matrix (projection @ view), a
    point p inside when ``a x + b y + c z + d >= 0`` for all six (Gribb & Hartmann); normalised so
    the value is the signed distance."""
    m = np.asarray(clip, np.float64)
    planes = np.stack([m[3] + m[0], m[3] - m[0], m[3] + m[1], m[3] - m[1], m[3] + m[2], m[3] - m[2]])
    return planes / np.linalg.norm(planes[:, :3], axis=1, keepdims=True)


def boxes_outside(boxes: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """(B,) True for the axis-aligned boxes (B, 2, 3) wholly outside one of ``planes``: the box's
    corner farthest along the plane's normal is behind it."""
    boxes = np.asarray(boxes, np.float64)
    n = planes[:, :3]                                                  # (6, 3)
    far = np.where(n[None] >= 0, boxes[:, None, 1], boxes[:, None, 0])  # (B, 6, 3) positive vertices
    return ((far * n[None]).sum(-1) + planes[None, :, 3] < 0).any(1)


@dataclass
class DrawList:
    """What one frame draws: index ranges (first, count) and what they amount to."""

    ranges: list[tuple[int, int]] = field(default_factory=list)
    triangles: int = 0
    chunks_drawn: int = 0
    chunks_culled: int = 0
    level_chunks: list[int] = field(default_factory=list)    # chunks drawn at each level
    blocks_drawn: tuple[str, ...] = ()


def select(mesh: LodMesh, clip: np.ndarray, eye: np.ndarray, focal_px: float, pixel_error: float = PIXEL_ERROR,
           max_triangles: int | None = MAX_TRIANGLES) -> DrawList:
    """The chunks of ``mesh`` to draw from a camera at ``eye`` with clip matrix ``clip`` and focal
    length ``focal_px`` (module docstring), contiguous ranges merged into one draw call."""
    keep = ~boxes_outside(mesh.boxes, frustum_planes(clip))
    idx = np.nonzero(keep)[0]
    n_levels = mesh.levels
    # distance from the eye to the nearest point of each box (0 inside)
    near = np.clip(eye[None], mesh.boxes[idx, 0], mesh.boxes[idx, 1])
    dist = np.maximum(np.linalg.norm(near - eye[None], axis=1), 1e-6)
    # a level is never finer than the one before it (quadric decimation from the previous level)
    err = np.maximum.accumulate(mesh.errors[idx], axis=1)
    ok = err * focal_px / dist[:, None] <= pixel_error                    # (K, L) fine enough
    ok[:, 0] = True
    # the coarsest level fine enough: the last True of each row (errors grow with the level)
    level = n_levels - 1 - np.argmax(ok[:, ::-1], axis=1)
    counts = mesh.ranges[idx, :, 1] // 3                                  # (K, L)
    if max_triangles is not None and len(idx):
        order = np.argsort(-dist)                                         # farthest first
        total = int(counts[np.arange(len(idx)), level].sum())
        while total > max_triangles and np.any(level < n_levels - 1):
            for j in order:
                if level[j] < n_levels - 1:
                    total -= int(counts[j, level[j]] - counts[j, level[j] + 1])
                    level[j] += 1
                    if total <= max_triangles:
                        break
    # nearest chunks first: llvmpipe tests depth before shading and writing a fragment, so what
    # the near chunks hide costs little; ranges adjacent in the buffer and in this order merge
    merged: list[tuple[int, int]] = []
    for j in np.argsort(dist, kind="stable"):
        first, count = (int(v) for v in mesh.ranges[idx[j], level[j]])
        if not count:
            continue
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((first, count))
    return DrawList(merged, sum(c for _, c in merged) // 3, len(idx), int((~keep).sum()),
                    np.bincount(level, minlength=n_levels).tolist(),
                    tuple(sorted({mesh.block_names[b] for b in mesh.chunk_block[idx]})))


def select_all(mesh: LodMesh) -> DrawList:
    """Every chunk at the finest level, nothing culled (the baseline the bench compares with)."""
    ranges = [(int(f), int(n)) for f, n in mesh.ranges[:, 0] if n]
    return DrawList(ranges, sum(n for _, n in ranges) // 3, len(mesh.ranges), 0,
                    [len(mesh.ranges)] + [0] * (mesh.levels - 1), mesh.block_names)


__all__ = ["CHUNKS_PER_SIDE", "MAX_TRIANGLES", "PIXEL_ERROR", "DrawList", "LodMesh", "boxes_outside",
           "build_lod_mesh", "frustum_planes", "select", "select_all"]
