"""Exact, vectorised ray casting against the procedural city (numpy, float64).

Rays come as a *ray set* that knows how to project a 3D point onto its 2D "screen":
a pinhole camera (screen = pixel coordinates) or a bundle of parallel rays (screen = the
plane perpendicular to the rays; used for orthophotos and for sun-shadow rays).  A ray
can only hit an object whose projected bounding box contains the ray's screen point, so
rays are binned on the screen and each object is tested against the rays in the bins its
projected box covers: exact results, cost about proportional to the covered pixels.

Ground: the terrain heightfield is intersected by bracketed regula falsi (Illinois), to
sub-millimetre accuracy for the gentle terrain of :mod:`.city`; water is a flat plane.

Small matrix products use einsum: numpy's BLAS matmul of (N, 3) x (3, 3) is ~10x slower here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .city import City

KIND_NONE, KIND_TERRAIN, KIND_WATER, KIND_BOX, KIND_ELLIPSOID = range(5)
_CHUNK = 1 << 16
_EPS_T = 1e-6
_NEAR = 0.05  # metres: nothing in the city comes this close to a camera


class PinholeRays:
    """Rays of an exact pinhole camera through sample points of its pixels.

    Args:
        c2w: 4x4 camera-to-plan-frame, OpenCV (x right, y down, z forward).
        K: 3x3 intrinsics.
        width, height: image size.
        offsets: (S, 2) sub-pixel offsets from the pixel centre; pixel (i, j)'s centre is
            (i + 0.5, j + 0.5) in pixel coordinates (nerfstudio's convention).

    Directions are *not* normalised: d = R @ ((u - cx)/fx, (v - cy)/fy, 1), so the ray
    parameter t of a hit is its depth along the optical axis.  Rays are ordered (S, H, W).
    """

    def __init__(self, c2w: np.ndarray, K: np.ndarray, width: int, height: int, offsets: np.ndarray):
        self.R = np.asarray(c2w, np.float64)[:3, :3]
        self.origin = np.asarray(c2w, np.float64)[:3, 3].copy()
        self.K = np.asarray(K, np.float64)
        j, i = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
        offsets = np.asarray(offsets, np.float64).reshape(-1, 2)
        u = (i[None] + 0.5 + offsets[:, 0, None, None]).ravel()
        v = (j[None] + 0.5 + offsets[:, 1, None, None]).ravel()
        self.screen = np.stack([u, v], axis=1)
        fx, fy, cx, cy = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2]
        d_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=1)
        self.dirs = np.einsum("ij,kj->ik", d_cam, self.R)
        self.shape = (len(offsets), height, width)

    def origins(self, idx: np.ndarray | slice) -> np.ndarray:
        return np.broadcast_to(self.origin, (len(self.dirs[idx]), 3))

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pc = np.einsum("ij,jk->ik", pts - self.origin, self.R)
        ok = pc[:, 2] >= _NEAR * (1 - 1e-9)
        z = np.where(ok, pc[:, 2], 1.0)
        uv = np.stack([self.K[0, 0] * pc[:, 0] / z + self.K[0, 2], self.K[1, 1] * pc[:, 1] / z + self.K[1, 2]], 1)
        return uv, ok

    def near_point_on_edges(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Screen point where segments a-b cross the near plane (NaN where they do not)."""
        za = np.einsum("...j,j->...", a - self.origin, self.R[:, 2])
        zb = np.einsum("...j,j->...", b - self.origin, self.R[:, 2])
        cross = (za - _NEAR) * (zb - _NEAR) < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            w = (_NEAR - za) / (zb - za)
        p = a + np.where(cross, w, np.nan)[..., None] * (b - a)
        uv, _ = self.project(p.reshape(-1, 3))
        return np.where(cross[..., None], uv.reshape(p.shape[:-1] + (2,)), np.nan)

    def depth_key(self, pts: np.ndarray) -> np.ndarray:
        """A lower bound of the t at which a ray meets ``pts``: their depth along the optical axis."""
        return np.maximum(np.einsum("ij,j->i", pts - self.origin, self.R[:, 2]), 0.0)

    def key_offset(self, idx) -> np.ndarray | float:
        return 0.0


class ParallelRays:
    """Parallel rays (direction ``direction``) from arbitrary origins; t is in units of |direction|."""

    def __init__(self, origins: np.ndarray, direction: np.ndarray):
        self._origins = np.asarray(origins, np.float64).reshape(-1, 3)
        d = np.asarray(direction, np.float64)
        self.dirs = np.broadcast_to(d, self._origins.shape)
        n = d / np.linalg.norm(d)
        self._unit, self._norm = n, float(np.linalg.norm(d))
        a = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        e1 = np.cross(n, a)
        e1 /= np.linalg.norm(e1)
        self.basis = np.stack([e1, np.cross(n, e1)], axis=1)  # (3, 2)
        self.screen = np.einsum("ij,jk->ik", self._origins, self.basis)

    def origins(self, idx: np.ndarray | slice) -> np.ndarray:
        return self._origins[idx]

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.einsum("ij,jk->ik", pts, self.basis), np.ones(len(pts), bool)

    def depth_key(self, pts: np.ndarray) -> np.ndarray:
        """Position along the ray direction; a ray (o, d) reaches ``p`` at t = key(p) - key(o)."""
        return np.einsum("ij,j->i", pts, self._unit) / self._norm

    def key_offset(self, idx) -> np.ndarray:
        return np.einsum("ij,j->i", self._origins[idx], self._unit) / self._norm


@dataclass
class Hits:
    """Nearest hit per ray: parameter t (inf: none), KIND_*, and the index within that kind."""

    t: np.ndarray
    kind: np.ndarray
    index: np.ndarray


# ----------------------------------------------------------------------------------------------
# scene acceleration data
# ----------------------------------------------------------------------------------------------
class SceneGeometry:
    """Flattened object arrays of a city, shared by all ray casts."""

    def __init__(self, city: City):
        self.city = city
        b, e = city.boxes, city.ellipsoids
        self.n_boxes = len(b)
        self.box_lo, self.box_hi = b.lo, b.hi
        # gable planes n.p <= c (two per gabled box; unused rows for flat boxes)
        self.gabled = b.gable_axis >= 0
        self.plane_n = np.zeros((len(b), 2, 3))
        self.plane_c = np.zeros((len(b), 2))
        for k in np.nonzero(self.gabled)[0]:
            ax = 1 if b.gable_axis[k] == 0 else 0  # the horizontal axis across the ridge
            centre = (b.lo[k, ax] + b.hi[k, ax]) / 2
            half_span = (b.hi[k, ax] - b.lo[k, ax]) / 2
            ridge, eave = b.hi[k, 2], b.eave_z[k]
            slope = (ridge - eave) / half_span
            for s, sign in enumerate((1.0, -1.0)):
                n = np.zeros(3)
                n[ax], n[2] = sign * slope, 1.0
                self.plane_n[k, s] = n
                self.plane_c[k, s] = ridge + sign * slope * centre
        self.ell_c, self.ell_r = e.center, e.radii
        lo = np.concatenate([b.lo, e.center - e.radii])
        hi = np.concatenate([b.hi, e.center + e.radii])
        sel = np.array([[(m >> a) & 1 for a in range(3)] for m in range(8)], bool)  # (8, 3)
        self.corners = np.where(sel[None], hi[:, None, :], lo[:, None, :]).reshape(-1, 3)
        self.n_objects = len(lo)
        zmin, zmax = city.terrain_bounds()
        self.terrain_lo, self.terrain_hi = zmin, zmax


# ----------------------------------------------------------------------------------------------
# casting
# ----------------------------------------------------------------------------------------------
def cast(geo: SceneGeometry, rays, *, ground: bool = True, objects: bool = True) -> Hits:
    """Nearest hit of every ray (terrain, water, boxes, ellipsoids).

    Objects are tested front to back in batches; after each batch a (object, screen bin)
    pair is skipped when every ray of the bin already hit something nearer than the
    object's nearest corner (occlusion culling), which keeps oblique views cheap.
    """
    n = len(rays.dirs)
    t = np.full(n, np.inf)
    kind = np.zeros(n, np.int8)
    index = np.full(n, -1, np.int64)
    if objects and geo.n_objects:
        rects = _object_rects(geo, rays)
        obj_key = rays.depth_key(geo.corners).reshape(-1, 8).min(1)
    for s in range(0, n, _CHUNK):
        sl = slice(s, min(n, s + _CHUNK))
        o, d = rays.origins(sl), rays.dirs[sl]
        tc, kc, ic = t[sl], kind[sl], index[sl]
        down = d[:, 2] < -1e-9
        if ground:
            # every descending ray meets the ground before it sinks below the terrain's lowest point
            with np.errstate(divide="ignore", invalid="ignore"):
                tc[:] = np.where(down, (geo.terrain_lo - o[:, 2]) / d[:, 2], np.inf)
        if objects and geo.n_objects:
            _objects_pass(geo, rays, sl, o, d, tc, kc, ic, rects, obj_key)
        if ground:
            # the ground only matters where no object was hit above the terrain's highest point
            with np.errstate(divide="ignore", invalid="ignore"):
                t_top = (geo.terrain_hi - o[:, 2]) / d[:, 2]
            need = np.nonzero(down & ((kc == KIND_NONE) | (tc > t_top)))[0]
            tt = _terrain_t(geo, o[need], d[need])
            tw = _water_t(geo, o[need], d[need])
            tg = np.minimum(tt, tw)
            win = tg <= np.where(kc[need] == KIND_NONE, np.inf, tc[need])
            need, tg, water = need[win], tg[win], (tw < tt)[win]
            tc[need] = tg
            kc[need] = np.where(water, KIND_WATER, KIND_TERRAIN)
            ic[need] = -1
        tc[kc == KIND_NONE] = np.inf
    return Hits(t=t, kind=kind, index=index)


def _objects_pass(geo, rays, sl, o, d, tc, kc, ic, rects, obj_key) -> None:
    """Update (tc, kc, ic) with the nearest object hits closer than tc, front-to-back batches."""
    binned = _BinnedRays(rays.screen[sl])
    objs = binned.overlapping(rects)
    objs = objs[np.argsort(obj_key[objs], kind="stable")]
    key_off = rays.key_offset(sl)
    first, size = 0, 32
    while first < len(objs):
        batch = objs[first:first + size]
        first += size
        size *= 2
        ray, obj = binned.pairs(batch, rects, obj_key, tc + key_off)
        if len(ray) == 0:
            continue
        ray, obj, tn = _object_hits(geo, ray, obj, o, d, None)
        closer = tn < tc[ray]
        ray, obj, tn = ray[closer], obj[closer], tn[closer]
        np.minimum.at(tc, ray, tn)
        win = tn == tc[ray]
        ray, obj = ray[win], obj[win]
        is_box = obj < geo.n_boxes
        kc[ray] = np.where(is_box, KIND_BOX, KIND_ELLIPSOID)
        ic[ray] = np.where(is_box, obj, obj - geo.n_boxes)


def occluded(geo: SceneGeometry, rays: ParallelRays, ignore: np.ndarray) -> np.ndarray:
    """Whether each (shadow) ray hits any object other than ``ignore[i]`` (global object id, -1 none)."""
    n = len(rays.dirs)
    out = np.zeros(n, bool)
    if not geo.n_objects or n == 0:
        return out
    rects = _object_rects(geo, rays)
    for s in range(0, n, _CHUNK):
        sl = slice(s, min(n, s + _CHUNK))
        binned = _BinnedRays(rays.screen[sl])
        ray, obj = binned.pairs(binned.overlapping(rects), rects)
        ray, _, _ = _object_hits(geo, ray, obj, rays.origins(sl), rays.dirs[sl], ignore[sl])
        out[s + ray] = True
    return out


_BOX_EDGES = np.array([(a, b) for a in range(8) for b in range(a + 1, 8) if (a ^ b).bit_count() == 1])


def _object_rects(geo: SceneGeometry, rays) -> np.ndarray:
    """Screen bounding rectangle (x0, y0, x1, y1) of every object's bounding box."""
    uv, ok = rays.project(geo.corners)
    uv, ok = uv.reshape(-1, 8, 2), ok.reshape(-1, 8)
    okk = ok[..., None]
    rects = np.concatenate([np.where(okk, uv, np.inf).min(1), np.where(okk, uv, -np.inf).max(1)], axis=1)
    partial = np.nonzero(ok.any(1) & ~ok.all(1))[0]
    if len(partial):
        # boxes crossing the camera's near plane: add where their edges cross it (exact clipping)
        pts = geo.corners.reshape(-1, 8, 3)[partial]
        near = rays.near_point_on_edges(pts[:, _BOX_EDGES[:, 0]], pts[:, _BOX_EDGES[:, 1]])  # (P, 12, 2)
        valid = ~np.isnan(near)
        r = rects[partial]
        rects[partial] = np.concatenate([np.minimum(r[:, :2], np.where(valid, near, np.inf).min(1)),
                                         np.maximum(r[:, 2:], np.where(valid, near, -np.inf).max(1))], 1)
    rects[~ok.any(1)] = (np.inf, np.inf, -np.inf, -np.inf)  # wholly behind the camera: never hit
    return rects


class _BinnedRays:
    """Rays sorted into square bins of their screen points (about 16 rays per bin)."""

    def __init__(self, screen: np.ndarray):
        self.screen = screen
        self.smin, smax = screen.min(0), screen.max(0)
        self.smax = smax
        span = np.maximum(smax - self.smin, 1e-9)
        self.bin = max(np.sqrt(span[0] * span[1] * 16.0 / len(screen)), 1e-9)
        self.nbx, self.nby = int(span[0] / self.bin) + 1, int(span[1] / self.bin) + 1
        b = np.minimum(((screen - self.smin) / self.bin).astype(np.int64), [self.nbx - 1, self.nby - 1])
        self.bid = b[:, 1] * self.nbx + b[:, 0]
        self.order = np.argsort(self.bid, kind="stable")
        self.start = np.concatenate([[0], np.cumsum(np.bincount(self.bid, minlength=self.nbx * self.nby))])

    def overlapping(self, rects: np.ndarray) -> np.ndarray:
        """Objects whose projected box overlaps these rays' screen bounds."""
        smin, smax = self.smin, self.smax
        keep = (rects[:, 2] >= smin[0]) & (rects[:, 0] <= smax[0]) & (rects[:, 3] >= smin[1]) & (rects[:, 1] <= smax[1])
        return np.nonzero(keep)[0]

    def pairs(self, objs, rects, obj_key=None, ray_key=None) -> tuple[np.ndarray, np.ndarray]:
        """(ray, object) pairs whose screen point lies in the object's projected box; with keys,
        pairs whose object lies entirely behind the ray's current hit are dropped."""
        if len(objs) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        nbx, nby = self.nbx, self.nby
        r = rects[objs]
        lo = np.clip(np.floor((r[:, :2] - self.smin) / self.bin), 0, [nbx - 1, nby - 1]).astype(np.int64)
        hi = np.clip(np.floor((r[:, 2:] - self.smin) / self.bin), 0, [nbx - 1, nby - 1]).astype(np.int64)
        # (object, bin) pairs
        nx, ny = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
        nb = nx * ny
        ob = np.repeat(np.arange(len(objs)), nb)
        k = np.arange(nb.sum()) - np.repeat(np.cumsum(nb) - nb, nb)
        bins = (lo[ob, 1] + k // nx[ob]) * nbx + lo[ob, 0] + k % nx[ob]
        if obj_key is not None:
            bin_max = np.full(nbx * nby, -np.inf)
            np.maximum.at(bin_max, self.bid, ray_key)
            keep = bin_max[bins] >= obj_key[objs[ob]]
            ob, bins = ob[keep], bins[keep]
        s, e = self.start[bins], self.start[bins + 1]
        lens = e - s
        pos = np.repeat(s - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
        ray = self.order[pos]
        obj = np.repeat(objs[ob], lens)
        sc, rr = self.screen[ray], rects[obj]
        m = (sc[:, 0] >= rr[:, 0]) & (sc[:, 0] <= rr[:, 2]) & (sc[:, 1] >= rr[:, 1]) & (sc[:, 1] <= rr[:, 3])
        if obj_key is not None:
            m &= obj_key[obj] <= ray_key[ray]
        return ray[m], obj[m]


def _object_hits(geo, ray, obj, o, d, ignore):
    """Entry parameter of every candidate pair that hits; returns (ray, global object, t)."""
    if ignore is not None:
        keep = obj != ignore[ray]
        ray, obj = ray[keep], obj[keep]
    is_box = obj < geo.n_boxes
    out_r, out_o, out_t = [], [], []
    rb, ob = ray[is_box], obj[is_box]
    if len(rb):
        tn = box_entry(geo, ob, o[rb], d[rb])
        ok = np.isfinite(tn)
        out_r.append(rb[ok])
        out_o.append(ob[ok])
        out_t.append(tn[ok])
    re, oe = ray[~is_box], obj[~is_box]
    if len(re):
        tn = ellipsoid_entry(geo, oe - geo.n_boxes, o[re], d[re])
        ok = np.isfinite(tn)
        out_r.append(re[ok])
        out_o.append(oe[ok])
        out_t.append(tn[ok])
    if not out_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_r), np.concatenate(out_o), np.concatenate(out_t)


def box_entry(geo: SceneGeometry, k: np.ndarray, o: np.ndarray, d: np.ndarray, with_face: bool = False):
    """Entry t of rays (o, d) into boxes k (gable planes included); inf where missed.

    With ``with_face``, also the face entered: 0..2 = the -x/-y/-z face, 3..5 = +x/+y/+z,
    6..7 = the gable planes.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = np.where(np.abs(d) < 1e-12, 1e-12, d)
        inv = 1.0 / dd
        t1 = (geo.box_lo[k] - o) * inv
        t2 = (geo.box_hi[k] - o) * inv
        near, far = np.minimum(t1, t2), np.maximum(t1, t2)  # column-wise: faster than .max(1) on (N, 3)
        tn = np.maximum(np.maximum(near[:, 0], near[:, 1]), near[:, 2])
        tf = np.minimum(np.minimum(far[:, 0], far[:, 1]), far[:, 2])
        if with_face:
            axis = np.where(near[:, 0] == tn, 0, np.where(near[:, 1] == tn, 1, 2))
            # a ray going +axis enters through the low (-) face
            face = np.where(np.take_along_axis(dd, axis[:, None], 1)[:, 0] > 0, axis, axis + 3)
        g = geo.gabled[k]
        if g.any():
            gi = np.nonzero(g)[0]
            kk = k[gi]
            for s in range(2):
                n = geo.plane_n[kk, s]
                denom = np.einsum("ij,ij->i", n, d[gi])
                num = geo.plane_c[kk, s] - np.einsum("ij,ij->i", n, o[gi])
                tp = num / np.where(denom == 0, 1e-300, denom)
                enters = (denom < 0) & (tp > tn[gi])
                if with_face:
                    face[gi[enters]] = 6 + s
                tn[gi] = np.where(enters, tp, tn[gi])
                tf[gi] = np.where(denom > 0, np.minimum(tf[gi], tp), np.where((denom == 0) & (num < 0), -np.inf, tf[gi]))
    t = np.where((tn <= tf) & (tn > _EPS_T), tn, np.inf)
    return (t, face) if with_face else t


def ellipsoid_entry(geo: SceneGeometry, k: np.ndarray, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    r = geo.ell_r[k]
    oc = (o - geo.ell_c[k]) / r
    dd = d / r
    a = np.einsum("ij,ij->i", dd, dd)
    b = np.einsum("ij,ij->i", oc, dd)
    c = np.einsum("ij,ij->i", oc, oc) - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > _EPS_T), t, np.inf)


def _terrain_t(geo: SceneGeometry, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """First intersection with the terrain heightfield for descending rays (inf otherwise)."""
    city = geo.city
    t = np.full(len(d), np.inf)
    down = d[:, 2] < -1e-9
    if not down.any():
        return t
    oo, dd = o[down], d[down]
    ta = np.maximum((geo.terrain_hi - oo[:, 2]) / dd[:, 2], 0.0)
    tb = (geo.terrain_lo - oo[:, 2]) / dd[:, 2]
    f = lambda tt: oo[:, 2] + tt * dd[:, 2] - city.terrain(oo[:, 0] + tt * dd[:, 0], oo[:, 1] + tt * dd[:, 1])
    fa, fb = f(ta), f(tb)
    result = tb.copy()
    act = np.arange(len(ta))
    side = np.zeros(len(ta), np.int8)
    for _ in range(40):  # Illinois regula falsi on the rays not yet converged
        tc = (ta * fb - tb * fa) / np.where(fb - fa == 0, -1e-300, fb - fa)
        oa, da = oo[act], dd[act]
        fc = oa[:, 2] + tc * da[:, 2] - city.terrain(oa[:, 0] + tc * da[:, 0], oa[:, 1] + tc * da[:, 1])
        done = np.abs(fc) < 1e-6
        result[act[done]] = tc[done]
        pos = fc > 0
        ta, fa, tb, fb = np.where(pos, tc, ta), np.where(pos, fc, fa), np.where(pos, tb, tc), np.where(pos, fb, fc)
        fb = np.where(pos & (side == 1), fb / 2, fb)
        fa = np.where(~pos & (side == -1), fa / 2, fa)
        side = np.where(pos, 1, -1).astype(np.int8)
        keep = ~done
        if not keep.any():
            break
        act, ta, tb, fa, fb, side = act[keep], ta[keep], tb[keep], fa[keep], fb[keep], side[keep]
        result[act] = tc[keep]  # best estimate so far, in case the loop ends
    t[down] = result
    return t


def _water_t(geo: SceneGeometry, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    wl = geo.city.water_level
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (wl - o[:, 2]) / d[:, 2]
    return np.where((d[:, 2] < 0) & (o[:, 2] > wl), t, np.inf)
