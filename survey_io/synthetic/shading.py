"""Materials, textures and lighting of the synthetic city, and the two renderers built on them.

Albedo is a deterministic function of the 3D surface point (procedural value noise, window
grids, road markings, tiles), so a neural field can reproduce it from any view.  Lighting is
fixed: a directional sun (Lambert, ``max(0, n . sun)``) with exact hard shadows (a shadow ray
towards the sun against every object; terrain self-shadowing is ignored, the terrain is gentle)
plus a constant bluish ambient term.  Nothing depends on the viewing direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import city as C
from .raycast import (
    KIND_BOX,
    KIND_ELLIPSOID,
    KIND_NONE,
    KIND_TERRAIN,
    KIND_WATER,
    Hits,
    ParallelRays,
    PinholeRays,
    SceneGeometry,
    box_entry,
    cast,
    occluded,
)

AMBIENT = np.array([0.40, 0.42, 0.48])
SUN = np.array([0.80, 0.76, 0.68])
SKY = np.array([0.64, 0.74, 0.86])
#: Rotated-grid 4x supersampling pattern (pixel units, zero mean).
AA_OFFSETS = np.array([[-0.125, -0.375], [0.375, -0.125], [0.125, 0.375], [-0.375, 0.125]])


# ----------------------------------------------------------------------------------------------
# noise
# ----------------------------------------------------------------------------------------------
def _hash(*ints: np.ndarray, seed: int = 0) -> np.ndarray:
    """Integer lattice hash -> float in [0, 1)."""
    h = np.full(np.shape(ints[0]), (seed * 0x9E3779B1 + 0x85EBCA6B) & 0xFFFFFFFF, dtype=np.uint32)
    for k, (v, m) in enumerate(zip(ints, (0x27D4EB2F, 0x165667B1, 0x9E3779B1))):
        h = (h ^ (np.asarray(v).astype(np.int64).astype(np.uint32) * np.uint32(m))) * np.uint32(0x85EBCA77)
        h ^= h >> np.uint32(15)
    h = h * np.uint32(0xC2B2AE3D)
    h ^= h >> np.uint32(13)
    return h.astype(np.float64) * (1.0 / 4294967296.0)


def noise2(x: np.ndarray, y: np.ndarray, freq: float, seed: int = 0) -> np.ndarray:
    """Smooth value noise in [0, 1] on a lattice of spacing 1/freq."""
    X, Y = x * freq, y * freq
    ix, iy = np.floor(X), np.floor(Y)
    fx, fy = X - ix, Y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash(ix, iy, seed=seed), _hash(ix + 1, iy, seed=seed)
    c, d = _hash(ix, iy + 1, seed=seed), _hash(ix + 1, iy + 1, seed=seed)
    return (a + (b - a) * fx) * (1 - fy) + (c + (d - c) * fx) * fy


def noise3(p: np.ndarray, freq: float, seed: int = 0) -> np.ndarray:
    P = p * freq
    i = np.floor(P)
    f = P - i
    f = f * f * (3 - 2 * f)
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1]) * (f[:, 2] if dz else 1 - f[:, 2])
                out = out + w * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed=seed)
    return out


# ----------------------------------------------------------------------------------------------
# surfaces
# ----------------------------------------------------------------------------------------------
@dataclass
class Surface:
    """Per-ray surface attributes at the hit point (plan frame)."""

    p: np.ndarray        # (N, 3) hit point
    n: np.ndarray        # (N, 3) unit normal
    cls: np.ndarray      # (N,) uint8 semantic class (255: sky)
    obj: np.ndarray      # (N,) global object id (-1 for ground / sky)
    face: np.ndarray     # (N,) box face: 0..2 = -x,-y,-z, 3..5 = +x,+y,+z, 6..7 gable planes; -1 otherwise


def surfaces(geo: SceneGeometry, hits: Hits, o: np.ndarray, d: np.ndarray) -> Surface:
    city = geo.city
    n = len(hits.t)
    t = np.where(np.isfinite(hits.t), hits.t, 0.0)
    p = o + t[:, None] * d
    nrm = np.zeros((n, 3))
    nrm[:, 2] = 1.0
    cls = np.full(n, 255, np.uint8)
    obj = np.full(n, -1, np.int64)
    face = np.full(n, -1, np.int8)
    ter = hits.kind == KIND_TERRAIN
    if ter.any():
        x, y = p[ter, 0], p[ter, 1]
        hx, hy = city.terrain_gradient(x, y)
        nn = np.stack([-hx, -hy, np.ones_like(hx)], 1)
        nrm[ter] = nn / np.linalg.norm(nn, axis=1, keepdims=True)
        cls[ter] = C.ZONE_CLASS[city.ground_zone(x, y)]
    cls[hits.kind == KIND_WATER] = 4
    box = hits.kind == KIND_BOX
    if box.any():
        k = hits.index[box]
        _, f = box_entry(geo, k, o[box] if o.ndim == 2 else o, d[box], with_face=True)
        nn = np.zeros((len(k), 3))
        axis_faces = f < 6
        nn[axis_faces, f[axis_faces] % 3] = np.where(f[axis_faces] < 3, -1.0, 1.0)
        if (~axis_faces).any():
            pn = geo.plane_n[k[~axis_faces], f[~axis_faces] - 6]
            nn[~axis_faces] = pn / np.linalg.norm(pn, axis=1, keepdims=True)
        nrm[box], face[box], obj[box] = nn, f, k
        cls[box] = city.boxes.cls[k]
    ell = hits.kind == KIND_ELLIPSOID
    if ell.any():
        k = hits.index[ell]
        r = geo.ell_r[k]
        nn = (p[ell] - geo.ell_c[k]) / (r * r)
        nrm[ell] = nn / np.linalg.norm(nn, axis=1, keepdims=True)
        cls[ell] = 3
        obj[ell] = k + geo.n_boxes
    return Surface(p=p, n=nrm, cls=cls, obj=obj, face=face)


def _asphalt(x, y, base=0.30):
    v = base + 0.05 * (noise2(x, y, 0.6, 11) - 0.5) + 0.04 * (noise2(x, y, 2.5, 12) - 0.5)
    return np.stack([v, v, v * 1.03], -1)


def ground_albedo(city: C.City, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Albedo of the bare ground (terrain, or a bridge deck) at plan (x, y), height z."""
    zone = city.ground_zone(x, y)
    out = np.zeros(x.shape + (3,))
    n1 = noise2(x, y, 0.35, 1)
    n2 = noise2(x, y, 1.7, 2)
    # roads with markings
    m = zone == C.ZONE_ROAD
    if m.any():
        xr, yr = x[m], y[m]
        col = _asphalt(xr, yr)
        paint = np.zeros(len(xr), bool)
        for cen, hw, other, ohw, across_c, along_c in (
                (city.road_x, city.road_x_halfwidth, city.road_y, city.road_y_halfwidth, xr, yr),
                (city.road_y, city.road_y_halfwidth, city.road_x, city.road_x_halfwidth, yr, xr)):
            dist, w, _ = C._nearest_road(across_c, cen, hw)
            on_this = dist < w
            odist, ow, _ = C._nearest_road(along_c, other, ohw)
            clear = odist - ow - city.sidewalk  # distance past the crossing road's sidewalk
            centre_dash = (dist < 0.15) & (np.mod(along_c, 9.0) < 3.5) & (clear > 0.5) & (w > 4.5)
            edge = (np.abs(dist - (w - 0.5)) < 0.12) & (clear > 0.0)
            zebra = (clear > 0.6) & (clear < 4.0) & (np.mod(across_c, 1.2) < 0.6) & (dist < w - 0.3)
            paint |= on_this & (centre_dash | edge | zebra)
        col[paint] = (0.86, 0.86, 0.82)
        out[m] = col
    m = zone == C.ZONE_SIDEWALK
    if m.any():
        xs, ys = x[m], y[m]
        seam = (np.mod(xs, 1.5) < 0.1) | (np.mod(ys, 1.5) < 0.1)
        v = 0.64 + 0.05 * (n2[m] - 0.5) - 0.12 * seam
        out[m] = np.stack([v, v * 0.98, v * 0.95], -1)
    m = zone == C.ZONE_YARD
    if m.any():
        v = 0.62 + 0.08 * (n1[m] - 0.5) + 0.04 * (n2[m] - 0.5)
        out[m] = np.stack([v * 1.05, v, v * 0.88], -1)
    m = (zone == C.ZONE_LAWN) | (zone == C.ZONE_BANK)
    if m.any():
        a, b = n1[m], n2[m]
        col = np.stack([0.28 + 0.10 * a + 0.04 * b, 0.44 + 0.08 * b, 0.18 + 0.04 * a], -1)
        wet = z[m] < city.water_level + 0.7  # muddy strip along the water
        col[wet] = np.stack([0.50 + 0.05 * b[wet], 0.45 + 0.05 * b[wet], 0.36 + 0.03 * a[wet]], -1)
        out[m] = col
    m = zone == C.ZONE_PARKING
    if m.any():
        col = _asphalt(x[m], y[m], 0.34)
        col[np.mod(x[m], 2.6) < 0.12] = (0.85, 0.85, 0.82)
        out[m] = col
    m = zone == C.ZONE_PLAZA
    if m.any():
        checker = (np.floor(x[m] / 3.0) + np.floor(y[m] / 3.0)) % 2
        v = 0.70 + 0.05 * checker + 0.05 * (n2[m] - 0.5)
        out[m] = np.stack([v, v * 0.93, v * 0.84], -1)
    m = zone == C.ZONE_FIELD
    if m.any():
        xf, yf = x[m], y[m]
        ix, iy = np.floor(xf / 45.0), np.floor(yf / 32.0)
        crop = _hash(ix, iy, seed=7)
        palette = np.array([[0.36, 0.50, 0.22], [0.55, 0.52, 0.30], [0.45, 0.40, 0.28], [0.30, 0.42, 0.20],
                            [0.62, 0.58, 0.36]])
        col = palette[(crop * len(palette)).astype(int)]
        rows = 0.92 + 0.08 * (np.mod(xf, 2.0) < 1.0)  # crop rows
        col = col * rows[:, None] * (0.9 + 0.2 * n1[m][:, None])
        out[m] = col
    return out


def box_albedo(city: C.City, geo: SceneGeometry, s: Surface, sel: np.ndarray) -> np.ndarray:
    b = city.boxes
    k = s.obj[sel]
    p, f = s.p[sel], s.face[sel]
    mat = b.material[k]
    out = np.zeros((len(k), 3))
    top = f == 5
    gable = f >= 6
    wall = (f % 3 != 2) & (f < 6)
    nz = noise2(p[:, 0] + p[:, 2], p[:, 1] - p[:, 2], 0.8, 21)

    m = mat == C.MAT_BUILDING
    mw = m & wall
    if mw.any():
        kk = k[mw]
        u = np.where(f[mw] % 3 == 0, p[mw, 1] - b.lo[kk, 1], p[mw, 0] - b.lo[kk, 0])
        wall_len = np.where(f[mw] % 3 == 0, b.hi[kk, 1] - b.lo[kk, 1], b.hi[kk, 0] - b.lo[kk, 0])
        v = p[mw, 2] - b.base_z[kk]
        bay, frac, curtain = b.window[kk, 0], b.window[kk, 1], b.window[kk, 2] > 0
        nb = np.maximum(np.floor(wall_len / bay), 1)
        bay = wall_len / nb  # whole number of bays per wall
        iu = np.floor(u / bay)
        fu = u / bay - iu
        floor_i = np.floor(v / C.FLOOR_HEIGHT)
        fv = v - floor_i * C.FLOOR_HEIGHT
        glass_v = np.where(curtain, (fv > 0.15) & (fv < 3.05), (fv > 0.9) & (fv < 2.4))
        shop = (floor_i == 0) & ~curtain & (b.gable_axis[kk] < 0)
        glass_v = np.where(shop, (fv > 0.3) & (fv < 2.7), glass_v)
        glass_u = np.abs(fu - 0.5) < np.where(shop, 0.42, frac / 2)
        below_eave = p[mw, 2] < b.eave_z[kk] - np.where(b.gable_axis[kk] >= 0, 0.3, 1.1)
        is_glass = glass_u & glass_v & below_eave & (v > 0.2)
        h = _hash(iu, floor_i, kk, seed=5)
        glass = np.stack([0.16 + 0.10 * h, 0.20 + 0.10 * h, 0.26 + 0.10 * h], -1)
        lit = h > 0.88
        glass[lit] = (0.62, 0.56, 0.42)
        facade = b.color[kk] * (0.92 + 0.12 * nz[mw])[:, None]
        out[mw] = np.where(is_glass[:, None], glass, facade)
    mt = m & top
    if mt.any():
        kk = k[mt]
        edge = np.minimum.reduce([p[mt, 0] - b.lo[kk, 0], b.hi[kk, 0] - p[mt, 0],
                                  p[mt, 1] - b.lo[kk, 1], b.hi[kk, 1] - p[mt, 1]])
        px, py = p[mt, 0], p[mt, 1]
        n_roof = noise2(px, py, 0.25, 22)
        grain = noise2(px, py, 2.5, 23)
        col = b.roof_color[kk] * (0.9 + 0.1 * n_roof + 0.1 * grain)[:, None]
        # solar panel rows on some roofs: a grid of dark blue modules inset from the parapet
        solar = (_hash(kk, seed=24) > 0.65) & (edge > 2.5)
        cell_u, cell_v = np.mod(px - b.lo[kk, 0], 2.4), np.mod(py - b.lo[kk, 1], 1.3)
        module = solar & (cell_u < 1.9) & (cell_v < 1.05)
        col[module] = np.stack([0.10 + 0.04 * grain[module], 0.13 + 0.04 * grain[module],
                                0.24 + 0.05 * grain[module]], -1)
        col[edge < 0.6] = np.minimum(b.roof_color[kk][edge < 0.6] * 1.3 + 0.05, 1.0)
        out[mt] = col
    mg = m & gable
    if mg.any():
        kk = k[mg]
        rows = np.mod(p[mg, 2] - b.eave_z[kk], 0.35) < 0.07
        col = b.roof_color[kk] * (0.9 + 0.15 * nz[mg])[:, None]
        col[rows] *= 0.8
        out[mg] = col
    m = mat == C.MAT_ROOF_UNIT
    if m.any():
        out[m] = np.where(top[m, None], b.roof_color[k[m]], b.color[k[m]]) * (0.95 + 0.1 * nz[m])[:, None]
    m = mat == C.MAT_VEHICLE
    if m.any():
        kk = k[m]
        ext = b.hi[kk] - b.lo[kk]
        along_x = ext[:, 0] > ext[:, 1]
        a = np.where(along_x, (p[m, 0] - b.lo[kk, 0]) / ext[:, 0], (p[m, 1] - b.lo[kk, 1]) / ext[:, 1])
        hz = (p[m, 2] - b.lo[kk, 2]) / ext[:, 2]
        bus = np.maximum(ext[:, 0], ext[:, 1]) > 8
        glass_top = top[m] & ~bus & (((a > 0.22) & (a < 0.38)) | ((a > 0.72) & (a < 0.82)))
        glass_side = ~top[m] & (hz > 0.72) & (hz < 0.93) & (a > 0.2) & (a < 0.85)
        col = b.color[kk] * (0.95 + 0.08 * nz[m])[:, None]
        col[glass_top | glass_side] = (0.07, 0.08, 0.10)
        out[m] = col
    m = mat == C.MAT_TRUNK
    if m.any():
        out[m] = b.color[k[m]]
    m = mat == C.MAT_BRIDGE
    if m.any():
        deck = top[m]
        col = b.color[k[m]].astype(np.float64) * (0.95 + 0.1 * nz[m])[:, None]
        if deck.any():
            pd = p[m][deck]
            col[deck] = ground_albedo(city, pd[:, 0], pd[:, 1], pd[:, 2])
        out[m] = col
    return out


def shade(geo: SceneGeometry, s: Surface, kind: np.ndarray, shadows: bool = True) -> np.ndarray:
    """Linear RGB in [0, 1] of every surface point (sky where nothing was hit)."""
    city = geo.city
    n = len(kind)
    albedo = np.zeros((n, 3))
    m = kind == KIND_TERRAIN
    if m.any():
        albedo[m] = ground_albedo(city, s.p[m, 0], s.p[m, 1], s.p[m, 2])
    m = kind == KIND_WATER
    if m.any():
        w = noise2(s.p[m, 0] * 0.5, s.p[m, 1] * 2.0, 0.8, 31)
        albedo[m] = np.stack([0.14 + 0.04 * w, 0.27 + 0.05 * w, 0.31 + 0.05 * w], -1)
    m = kind == KIND_BOX
    if m.any():
        albedo[m] = box_albedo(city, geo, s, m)
    m = kind == KIND_ELLIPSOID
    if m.any():
        k = s.obj[m] - geo.n_boxes
        leaf = noise3(s.p[m], 1.1, 41) * 0.6 + noise3(s.p[m], 3.0, 42) * 0.4
        albedo[m] = city.ellipsoids.color[k] * (0.65 + 0.6 * leaf)[:, None] * (0.8 + 0.2 * s.n[m, 2:3])
    sun = city.sun_plan
    ndl = np.clip(np.einsum("ij,j->i", s.n, sun), 0.0, None)
    lit = np.ones(n)
    if shadows:
        cand = np.nonzero((ndl > 0) & (kind != KIND_NONE))[0]
        if len(cand):
            rays = ParallelRays(s.p[cand] + s.n[cand] * 0.02, sun)
            lit[cand[occluded(geo, rays, s.obj[cand])]] = 0.0
    rgb = albedo * (AMBIENT + SUN * (ndl * lit)[:, None])
    rgb[kind == KIND_NONE] = SKY
    return np.clip(rgb, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# renderers
# ----------------------------------------------------------------------------------------------
@dataclass
class View:
    """A rendered view: RGB uint8 (H, W, 3), depth float32 (H, W) metres along the optical axis
    (0 where the ray hit nothing), semantic ids uint8 (H, W) (255 where nothing was hit)."""

    rgb: np.ndarray
    depth: np.ndarray
    semantics: np.ndarray


def _to_u8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def render_view(geo: SceneGeometry, c2w_enu: np.ndarray, K: np.ndarray, width: int, height: int,
                antialias: bool = True, shadows: bool = True) -> View:
    """Render one exact pinhole view (c2w in local ENU, OpenCV convention)."""
    R = geo.city.plan_rotation
    c2w = np.eye(4)
    c2w[:3, :3] = R.T @ c2w_enu[:3, :3]
    c2w[:3, 3] = R.T @ c2w_enu[:3, 3]
    offsets = np.concatenate([[[0.0, 0.0]], AA_OFFSETS]) if antialias else np.zeros((1, 2))
    rays = PinholeRays(c2w, K, width, height, offsets)
    hits = cast(geo, rays)
    n_pix = width * height
    surf = surfaces(geo, hits, rays.origins(slice(None)), rays.dirs)
    depth = np.where(np.isfinite(hits.t[:n_pix]), hits.t[:n_pix], 0.0).astype(np.float32).reshape(height, width)
    sem = surf.cls[:n_pix].reshape(height, width)
    shaded = slice(n_pix, None) if antialias else slice(0, n_pix)
    sub = Surface(surf.p[shaded], surf.n[shaded], surf.cls[shaded], surf.obj[shaded], surf.face[shaded])
    rgb = shade(geo, sub, hits.kind[shaded], shadows=shadows).reshape(-1, height, width, 3).mean(0)
    return View(rgb=_to_u8(rgb), depth=depth, semantics=sem)


@dataclass
class OrthoMaps:
    """North-up rasters over the survey area: row 0 north, col 0 west; cell size ``gsd``.

    rgb: true orthophoto (nadir, orthographic, same shading as the images); dsm: highest
    surface height among the cell's samples (local z); dtm: bare surface height at the cell
    centre (terrain, or the water surface where the terrain is under water), local z;
    semantics: class at the cell centre.
    """

    rgb: np.ndarray
    dsm: np.ndarray
    dtm: np.ndarray
    semantics: np.ndarray
    x0: float      # local ENU x of the west edge
    y1: float      # local ENU y of the north edge
    gsd: float


def render_ortho(geo: SceneGeometry, x0: float, y0: float, x1: float, y1: float, gsd: float,
                 antialias: bool = True, shadows: bool = True, rows_per_chunk: int = 64) -> OrthoMaps:
    """True orthophoto, DSM, DTM and semantic ortho of the ENU rectangle [x0, x1] x [y0, y1]."""
    city = geo.city
    w, h = round((x1 - x0) / gsd), round((y1 - y0) / gsd)
    top = geo.terrain_hi + float(np.max(geo.corners[:, 2], initial=0.0)) + 10.0
    offsets = np.concatenate([[[0.0, 0.0]], AA_OFFSETS]) if antialias else np.zeros((1, 2))
    R = city.plan_rotation
    rgb = np.zeros((h, w, 3), np.uint8)
    dsm = np.zeros((h, w), np.float32)
    dtm = np.zeros((h, w), np.float32)
    sem = np.zeros((h, w), np.uint8)
    down = np.array([0.0, 0.0, -1.0])
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(h, r0 + rows_per_chunk)
        cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(r0, r1) + 0.5)
        xs = x0 + (cols[None] + offsets[:, 0, None, None]) * gsd
        ys = y1 - (rows[None] + offsets[:, 1, None, None]) * gsd
        enu = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, top)], 1)
        rays = ParallelRays(np.einsum("ij,jk->ik", enu, R), down)
        hits = cast(geo, rays)
        n = (r1 - r0) * w
        surf = surfaces(geo, hits, rays.origins(slice(None)), rays.dirs)
        z = surf.p[:, 2].reshape(len(offsets), r1 - r0, w)
        dsm[r0:r1] = z.max(0)
        sem[r0:r1] = surf.cls[:n].reshape(r1 - r0, w)
        cp = rays.origins(slice(0, n))
        dtm[r0:r1] = city.surface_ground(cp[:, 0], cp[:, 1]).reshape(r1 - r0, w)
        shaded = slice(n, None) if antialias else slice(0, n)
        sub = Surface(surf.p[shaded], surf.n[shaded], surf.cls[shaded], surf.obj[shaded], surf.face[shaded])
        col = shade(geo, sub, hits.kind[shaded], shadows=shadows).reshape(-1, r1 - r0, w, 3).mean(0)
        rgb[r0:r1] = _to_u8(col)
    return OrthoMaps(rgb=rgb, dsm=dsm, dtm=dtm, semantics=sem, x0=x0, y1=y1, gsd=gsd)
