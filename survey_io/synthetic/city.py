"""The procedural city: terrain, a river, a road grid, lots, buildings, trees, vehicles.

Everything is generated in a *plan frame*: the local ENU frame rotated about +Z by
``City.plan_angle`` (so streets are not aligned with grid north), same origin, same Z.
Objects are convex primitives in that frame:

* boxes: axis-aligned in the plan frame (buildings, podiums, towers, rooftop units, vehicles,
  tree trunks, bridges); a box may carry a *gable* (two roof planes clipping its top), which
  makes pitched-roof houses;
* ellipsoids: tree canopies.

The ground is the terrain heightfield :meth:`City.terrain` (a gentle tilt and dome, plus a
river channel) and a flat water plane at ``water_level``; what the ground looks like and
which class it is comes from :meth:`City.ground_zone` (roads, sidewalks, lawns, parking,
plazas, fields), an exact function of the plan position.

Heights: local z (metres above the georef origin's height, which is WGS84-ellipsoidal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..georef import Georef

# Ground zones (what the terrain surface is at a plan position) and their semantic class.
ZONE_FIELD, ZONE_ROAD, ZONE_SIDEWALK, ZONE_YARD, ZONE_LAWN, ZONE_PARKING, ZONE_PLAZA, ZONE_BANK = range(8)
ZONE_NAMES = ("field", "road", "sidewalk", "yard", "lawn", "parking", "plaza", "riverbank")
#: semantic class id per zone (survey_io.semantics.CLASSES): lawns and fields are "ground",
#: paved traffic areas (carriageway, sidewalk, parking) are "road", plazas are "other".
ZONE_CLASS = np.array([0, 1, 1, 0, 0, 1, 6, 0], dtype=np.uint8)

# Box materials (how the renderer textures them).
MAT_BUILDING, MAT_ROOF_UNIT, MAT_VEHICLE, MAT_TRUNK, MAT_BRIDGE = range(5)

FLOOR_HEIGHT = 3.2  # metres per storey (window grid)

_FACADE_COLORS = np.array([
    [0.82, 0.78, 0.70], [0.90, 0.89, 0.85], [0.70, 0.70, 0.72], [0.62, 0.36, 0.30], [0.78, 0.66, 0.52],
    [0.60, 0.64, 0.68], [0.86, 0.80, 0.62], [0.55, 0.52, 0.50], [0.74, 0.80, 0.82], [0.92, 0.86, 0.78],
], dtype=np.float32)
_ROOF_COLORS = np.array([
    [0.45, 0.45, 0.46], [0.60, 0.60, 0.58], [0.35, 0.36, 0.38], [0.52, 0.50, 0.45], [0.70, 0.70, 0.68],
], dtype=np.float32)
_TILE_COLORS = np.array([[0.62, 0.30, 0.22], [0.35, 0.34, 0.36], [0.50, 0.36, 0.28]], dtype=np.float32)
_CAR_COLORS = np.array([
    [0.85, 0.85, 0.86], [0.10, 0.10, 0.11], [0.55, 0.56, 0.58], [0.70, 0.12, 0.10], [0.12, 0.22, 0.50],
    [0.90, 0.90, 0.92], [0.30, 0.32, 0.30], [0.85, 0.70, 0.15],
], dtype=np.float32)


@dataclass
class Boxes:
    """Axis-aligned boxes in the plan frame, with per-box attributes."""

    lo: np.ndarray            # (N, 3)
    hi: np.ndarray            # (N, 3)
    cls: np.ndarray           # (N,) uint8 semantic class
    material: np.ndarray      # (N,) MAT_*
    color: np.ndarray         # (N, 3) base albedo (walls / body)
    roof_color: np.ndarray    # (N, 3) albedo of the top face
    base_z: np.ndarray        # (N,) ground height the box stands on (facade window grid starts here)
    building: np.ndarray      # (N,) index into City.buildings, -1 for non-building boxes
    gable_axis: np.ndarray    # (N,) -1: flat top; 0: ridge along plan x; 1: ridge along plan y
    eave_z: np.ndarray        # (N,) height of the eaves (== hi z for flat boxes)
    window: np.ndarray        # (N, 3) facade window grid: bay width (m), glass fraction, curtain-wall flag

    def __len__(self) -> int:
        return len(self.lo)


@dataclass
class Ellipsoids:
    """Axis-aligned ellipsoids (tree canopies) in the plan frame."""

    center: np.ndarray   # (M, 3)
    radii: np.ndarray    # (M, 3)
    color: np.ndarray    # (M, 3)

    def __len__(self) -> int:
        return len(self.center)


@dataclass
class City:
    """A generated city; see the module docstring for frames and units."""

    georef: Georef
    half_extent: float                 # the survey area is [-h, h]^2 in local ENU metres
    plan_angle: float                  # radians, plan frame = ENU rotated by this about +Z
    plan_half: float                   # the city occupies [-p, p]^2 in the plan frame
    road_x: np.ndarray                 # plan x of north-south-ish road centrelines
    road_x_halfwidth: np.ndarray
    road_y: np.ndarray                 # plan y of east-west-ish road centrelines
    road_y_halfwidth: np.ndarray
    sidewalk: float
    block_kind: np.ndarray             # (nbx, nby): 0 lots, 1 park, 2 river
    lot_n: np.ndarray                  # (nbx, nby, 2) lots per block along x, y
    lot_kind: np.ndarray               # (nbx, nby, 4, 4): zone of each lot's open ground
    river_row: int
    river: dict                        # y0, amp, wavelength, phase, bottom_halfwidth, bank_halfwidth, depth
    terrain_params: dict               # gx, gy, dome, offset
    water_level: float
    boxes: Boxes
    ellipsoids: Ellipsoids
    buildings: list[dict] = field(default_factory=list)
    sun_dir: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))  # ENU, unit, towards the sun
    #: built patch: buildings, trees, vehicles and lots only where |x|, |y| <= built_half (local ENU);
    #: fields crossed by roads elsewhere.  None: built everywhere.
    built_half: float | None = None

    def in_built(self, x, y) -> np.ndarray:
        """Whether plan positions (x, y) lie in the built patch (a square in ENU, see ``built_half``)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self.built_half is None:
            return np.ones(np.broadcast(x, y).shape, dtype=bool)
        c, s = np.cos(self.plan_angle), np.sin(self.plan_angle)
        return (np.abs(c * x - s * y) <= self.built_half) & (np.abs(s * x + c * y) <= self.built_half)

    # -- frames -------------------------------------------------------------------------------
    @property
    def plan_rotation(self) -> np.ndarray:
        """3x3 R with p_enu = R @ p_plan."""
        c, s = np.cos(self.plan_angle), np.sin(self.plan_angle)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def to_plan(self, p_enu: np.ndarray) -> np.ndarray:
        return np.einsum("...j,jk->...k", np.asarray(p_enu, np.float64), self.plan_rotation)  # (R^T p)^T = p^T R

    def to_enu(self, p_plan: np.ndarray) -> np.ndarray:
        return np.einsum("...j,kj->...k", np.asarray(p_plan, np.float64), self.plan_rotation)

    @property
    def sun_plan(self) -> np.ndarray:
        return self.to_plan(self.sun_dir)

    # -- ground --------------------------------------------------------------------------------
    def _base_terrain(self, x, y):
        tp, p = self.terrain_params, self.plan_half
        xc, yc = np.clip(x, -p, p), np.clip(y, -p, p)
        return tp["gx"] * xc + tp["gy"] * yc + tp["dome"] * (1.0 - (xc * xc + yc * yc) / (2 * p * p)) - tp["offset"]

    def river_centre_y(self, x):
        r = self.river
        return r["y0"] + r["amp"] * np.sin(2 * np.pi * x / r["wavelength"] + r["phase"])

    def river_profile(self, x, y):
        """1 inside the channel bottom, 0 beyond the banks, smooth in between."""
        r = self.river
        d = np.abs(y - self.river_centre_y(x))
        s = np.clip((r["bank_halfwidth"] - d) / (r["bank_halfwidth"] - r["bottom_halfwidth"]), 0.0, 1.0)
        return s * s * (3.0 - 2.0 * s)

    def terrain(self, x, y):
        """Bare-earth height (local z) at plan (x, y); vectorised."""
        return self._base_terrain(x, y) - self.river["depth"] * self.river_profile(x, y)

    def terrain_gradient(self, x, y):
        """(dh/dx, dh/dy) of :meth:`terrain` at plan (x, y), analytic."""
        tp, p, r = self.terrain_params, self.plan_half, self.river
        inx, iny = np.abs(x) < p, np.abs(y) < p
        xc, yc = np.clip(x, -p, p), np.clip(y, -p, p)
        gx = np.where(inx, tp["gx"] - tp["dome"] * xc / (p * p), 0.0)
        gy = np.where(iny, tp["gy"] - tp["dome"] * yc / (p * p), 0.0)
        k = 2 * np.pi / r["wavelength"]
        arg = k * x + r["phase"]
        dy_c = y - (r["y0"] + r["amp"] * np.sin(arg))
        width = r["bank_halfwidth"] - r["bottom_halfwidth"]
        sv = (r["bank_halfwidth"] - np.abs(dy_c)) / width
        inside = (sv > 0) & (sv < 1)
        sv = np.clip(sv, 0.0, 1.0)
        dS_dd = np.where(inside, -6.0 * sv * (1.0 - sv) / width, 0.0)  # d(profile)/d(distance)
        sign = np.sign(dy_c)
        gx = gx - r["depth"] * dS_dd * (-sign * r["amp"] * k * np.cos(arg))
        gy = gy - r["depth"] * dS_dd * sign
        return gx, gy

    def terrain_bounds(self) -> tuple[float, float]:
        """(lower, upper) bounds of :meth:`terrain` anywhere (a margin beyond the true extremes)."""
        g = np.linspace(-self.plan_half, self.plan_half, 257)
        base = self._base_terrain(*np.meshgrid(g, g))
        return float(base.min() - self.river["depth"] - 0.1), float(base.max() + 0.1)

    def surface_ground(self, x, y):
        """Bare surface height: terrain, or the water surface where the terrain is under water."""
        return np.maximum(self.terrain(x, y), self.water_level)

    def ground_zone(self, x, y):
        """ZONE_* of the terrain surface at plan (x, y) (water is decided by the water plane)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        zone = np.full(x.shape, ZONE_FIELD, dtype=np.uint8)
        p = self.plan_half
        inside = (np.abs(x) <= p) & (np.abs(y) <= p)
        dx, wx, _ = _nearest_road(x, self.road_x, self.road_x_halfwidth)
        dy, wy, _ = _nearest_road(y, self.road_y, self.road_y_halfwidth)
        bi = np.clip(np.searchsorted(self.road_x, x) - 1, 0, len(self.road_x) - 2)
        bj = np.clip(np.searchsorted(self.road_y, y) - 1, 0, len(self.road_y) - 2)
        kind = self.block_kind[bi, bj]
        # lot lookup within the block interior
        x0 = self.road_x[bi] + self.road_x_halfwidth[bi] + self.sidewalk
        x1 = self.road_x[bi + 1] - self.road_x_halfwidth[bi + 1] - self.sidewalk
        y0 = self.road_y[bj] + self.road_y_halfwidth[bj] + self.sidewalk
        y1 = self.road_y[bj + 1] - self.road_y_halfwidth[bj + 1] - self.sidewalk
        nlx, nly = self.lot_n[bi, bj, 0], self.lot_n[bi, bj, 1]
        lx = np.clip(((x - x0) / np.maximum(x1 - x0, 1e-6) * nlx).astype(np.int64), 0, nlx - 1)
        ly = np.clip(((y - y0) / np.maximum(y1 - y0, 1e-6) * nly).astype(np.int64), 0, nly - 1)
        lot = self.lot_kind[bi, bj, lx, ly]
        zone = np.where(inside, np.where(kind == 0, lot, np.where(kind == 1, ZONE_LAWN, ZONE_BANK)), zone)
        sidewalk = (dx < wx + self.sidewalk) | (dy < wy + self.sidewalk)
        zone = np.where(inside & sidewalk, ZONE_SIDEWALK, zone)
        road = (dx < wx) | (dy < wy)
        zone = np.where(inside & road, ZONE_ROAD, zone)
        if self.built_half is not None:  # farmland crossed by the roads outside the built patch
            zone = np.where(self.in_built(x, y) | (zone == ZONE_ROAD), zone, ZONE_FIELD)
        return zone


def _nearest_road(v, centres, halfwidths):
    """Distance to the nearest road centreline, that road's half-width, and its index."""
    i = np.clip(np.searchsorted(centres, v), 1, len(centres) - 1)
    d_lo, d_hi = v - centres[i - 1], centres[i] - v
    use_lo = d_lo < d_hi
    idx = np.where(use_lo, i - 1, i)
    return np.abs(np.where(use_lo, d_lo, d_hi)), halfwidths[idx], idx


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
class _BoxList:
    def __init__(self):
        self.rows: list[tuple] = []

    def add(self, lo, hi, cls, material, color, roof_color=None, base_z=0.0, building=-1,
            gable_axis=-1, eave_z=None, window=(3.0, 0.5, 0.0)):
        roof_color = color if roof_color is None else roof_color
        self.rows.append((lo, hi, cls, material, color, roof_color, base_z, building, gable_axis,
                          hi[2] if eave_z is None else eave_z, window))

    def build(self) -> Boxes:
        cols = list(zip(*self.rows)) if self.rows else [[]] * 11
        f = lambda i, dt=np.float64: np.asarray(cols[i], dtype=dt)
        return Boxes(lo=f(0).reshape(-1, 3), hi=f(1).reshape(-1, 3), cls=f(2, np.uint8), material=f(3, np.int8),
                     color=f(4, np.float32).reshape(-1, 3), roof_color=f(5, np.float32).reshape(-1, 3),
                     base_z=f(6), building=f(7, np.int32), gable_axis=f(8, np.int8), eave_z=f(9),
                     window=f(10, np.float32).reshape(-1, 3))


def generate_city(seed: int, half_extent: float, georef: Georef, *, sun_azimuth_deg: float = 135.0,
                  sun_elevation_deg: float = 55.0, max_height: float = 80.0,
                  built_half: float | None = None) -> City:
    """Generate a city covering the square survey area ``[-half_extent, half_extent]^2`` (ENU).

    ``sun_azimuth_deg`` is clockwise from grid north (the local +Y axis), ``sun_elevation_deg``
    above the horizon.  ``max_height`` caps building heights (downtown is near the origin).
    ``built_half``: only the square ``[-built_half, built_half]^2`` (ENU) is built up (objects
    whose centre lies outside are dropped after generation, so the built part is the same city
    as without the knob); the rest is fields crossed by the roads (bridges kept).
    """
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(12.0, 28.0) * rng.choice([-1, 1]))
    # the rotated city must cover the survey square, plus a margin seen by oblique views
    plan_half = half_extent * (abs(np.cos(angle)) + abs(np.sin(angle))) + 60.0

    def road_lines():
        pos, hw = [-plan_half], []
        while pos[-1] < plan_half:
            pos.append(pos[-1] + rng.uniform(70.0, 105.0))
        pos = np.array(pos) - (pos[-1] - plan_half) / 2  # centre the grid
        hw = rng.choice([4.0, 5.5, 7.5], size=len(pos), p=[0.45, 0.35, 0.2])
        return pos, hw

    road_x, road_x_hw = road_lines()
    road_y, road_y_hw = road_lines()
    nbx, nby = len(road_x) - 1, len(road_y) - 1
    sidewalk = 2.5
    river_row = int(rng.integers(1, nby - 1)) if nby >= 3 else 0
    block_kind = np.zeros((nbx, nby), dtype=np.int8)
    block_kind[:, river_row] = 2
    for bi in range(nbx):
        for bj in range(nby):
            if block_kind[bi, bj] == 0 and rng.random() < 0.12:
                block_kind[bi, bj] = 1

    ry0, ry1 = road_y[river_row] + road_y_hw[river_row], road_y[river_row + 1] - road_y_hw[river_row + 1]
    room = ry1 - ry0
    river = dict(y0=float((ry0 + ry1) / 2), amp=float(min(room * 0.12, 8.0)), wavelength=float(rng.uniform(180, 260)),
                 phase=float(rng.uniform(0, 2 * np.pi)), bottom_halfwidth=float(room * 0.18),
                 bank_halfwidth=float(room * 0.32), depth=0.0)
    terrain_params = dict(gx=float(rng.uniform(-0.003, 0.003)), gy=float(rng.uniform(-0.004, 0.004)),
                          dome=float(rng.uniform(0.8, 2.0)), offset=0.0)

    sun_az, sun_el = np.deg2rad(sun_azimuth_deg), np.deg2rad(sun_elevation_deg)
    sun_enu = np.array([np.sin(sun_az) * np.cos(sun_el), np.cos(sun_az) * np.cos(sun_el), np.sin(sun_el)])

    lot_n = np.ones((nbx, nby, 2), dtype=np.int64)
    lot_kind = np.full((nbx, nby, 4, 4), ZONE_YARD, dtype=np.uint8)
    city = City(georef=georef, half_extent=half_extent, plan_angle=float(angle), plan_half=float(plan_half),
                road_x=road_x, road_x_halfwidth=road_x_hw, road_y=road_y, road_y_halfwidth=road_y_hw,
                sidewalk=sidewalk, block_kind=block_kind, lot_n=lot_n, lot_kind=lot_kind, river_row=river_row,
                river=river, terrain_params=terrain_params, water_level=0.0,
                boxes=None, ellipsoids=None, sun_dir=sun_enu)  # type: ignore[arg-type]
    # height 0 at the origin: the georef origin height is the ground there
    terrain_params["offset"] = float(city._base_terrain(np.array(0.0), np.array(0.0)))
    gx_grid = np.linspace(-plan_half, plan_half, 65)
    gxx, gyy = np.meshgrid(gx_grid, gx_grid)
    base_min = float(city._base_terrain(gxx, gyy).min())
    city.water_level = base_min - 0.6
    along = np.linspace(-plan_half, plan_half, 513)
    base_centre_max = float(city._base_terrain(along, city.river_centre_y(along)).max())
    river["depth"] = base_centre_max - city.water_level + 1.5

    boxes, trees = _BoxList(), []
    buildings: list[dict] = []
    ter = city.terrain

    def add_tree(x, y, scale=1.0):
        r = rng.uniform(2.2, 4.2) * scale
        rz = r * rng.uniform(0.75, 1.05)
        g = float(ter(np.array(x), np.array(y)))
        trunk = rng.uniform(2.0, 3.5) * scale
        cz = g + trunk + rz * 0.8
        green = np.array([rng.uniform(0.18, 0.32), rng.uniform(0.38, 0.55), rng.uniform(0.12, 0.22)], np.float32)
        trees.append(((x, y, cz), (r, r, rz), green))
        boxes.add((x - 0.22, y - 0.22, g - 0.5), (x + 0.22, y + 0.22, cz), 3, MAT_TRUNK, (0.35, 0.26, 0.18))

    def ground_range(x0, x1, y0, y1):
        xs, ys = np.meshgrid(np.linspace(x0, x1, 5), np.linspace(y0, y1, 5))
        h = ter(xs, ys)
        return float(h.min()), float(ter(np.array((x0 + x1) / 2), np.array((y0 + y1) / 2)))

    def add_building(x0, x1, y0, y1, dist):
        """One building on the footprint rectangle; returns nothing, appends boxes + record."""
        bid = len(buildings)
        gmin, g = ground_range(x0, x1, y0, y1)
        w, d = x1 - x0, y1 - y0
        downtown = np.exp(-(dist / (0.55 * half_extent + 80.0)) ** 2)
        floors = int(np.clip(rng.lognormal(np.log(3 + 14 * downtown), 0.45), 1, max_height / FLOOR_HEIGHT))
        small = w * d < 260
        kind = "flat"
        if small and floors <= 4 and rng.random() < 0.7:
            kind = "gable"
        elif floors >= 9 and w > 22 and d > 22 and rng.random() < 0.6:
            kind = "podium_tower"
        elif w > 20 and d > 20 and rng.random() < 0.3:
            kind = "l_shape"
        facade = _FACADE_COLORS[rng.integers(len(_FACADE_COLORS))] * rng.uniform(0.9, 1.05)
        roof = _ROOF_COLORS[rng.integers(len(_ROOF_COLORS))] * rng.uniform(0.9, 1.1)
        curtain = floors >= 12 and rng.random() < 0.5
        window = (rng.uniform(2.6, 3.8), 0.85 if curtain else rng.uniform(0.35, 0.6), 1.0 if curtain else 0.0)
        if curtain:
            facade = np.array([0.40, 0.50, 0.58], np.float32) * rng.uniform(0.9, 1.1)
        parts = []
        if kind == "gable":
            h = floors * FLOOR_HEIGHT
            ridge_axis = 0 if w >= d else 1
            span = d if ridge_axis == 0 else w
            pitch = np.tan(np.deg2rad(rng.uniform(25, 38)))
            ridge = g + h + pitch * span / 2
            tile = _TILE_COLORS[rng.integers(len(_TILE_COLORS))] * rng.uniform(0.9, 1.1)
            boxes.add((x0, y0, gmin - 1.0), (x1, y1, ridge), 2, MAT_BUILDING, facade, tile, g, bid,
                      ridge_axis, g + h, window)
            parts.append(dict(footprint=[x0, y0, x1, y1], base_z=g, top_z=ridge, eave_z=g + h, roof="gable",
                              ridge_axis="x" if ridge_axis == 0 else "y"))
        else:
            h = floors * FLOOR_HEIGHT + 1.0
            if kind == "podium_tower":
                ph = rng.integers(2, 5) * FLOOR_HEIGHT + 1.0
                boxes.add((x0, y0, gmin - 1.0), (x1, y1, g + ph), 2, MAT_BUILDING, facade, roof, g, bid, window=window)
                parts.append(dict(footprint=[x0, y0, x1, y1], base_z=g, top_z=g + ph, roof="flat"))
                ix, iy = w * rng.uniform(0.15, 0.3), d * rng.uniform(0.15, 0.3)
                rects = [(x0 + ix, x1 - ix, y0 + iy, y1 - iy, h)]
            elif kind == "l_shape":
                fy = rng.uniform(0.4, 0.55)
                fx = rng.uniform(0.35, 0.5)
                h2 = max(FLOOR_HEIGHT + 1.0, h * rng.uniform(0.5, 1.0))
                rects = [(x0, x1, y0, y0 + d * fy, h), (x0, x0 + w * fx, y0 + d * fy, y1, h2)]
            else:
                rects = [(x0, x1, y0, y1, h)]
            for (a0, a1, b0, b1, hh) in rects:
                boxes.add((a0, b0, gmin - 1.0), (a1, b1, g + hh), 2, MAT_BUILDING, facade, roof, g, bid, window=window)
                parts.append(dict(footprint=[a0, b0, a1, b1], base_z=g, top_z=g + hh, roof="flat"))
                # rooftop units (stairwell, HVAC) on larger flat roofs
                for _ in range(rng.integers(0, 3) if (a1 - a0) * (b1 - b0) > 150 else 0):
                    uw, ud = rng.uniform(2.0, 5.0), rng.uniform(2.0, 4.0)
                    ux = rng.uniform(a0 + 1.5, max(a0 + 1.6, a1 - 1.5 - uw))
                    uy = rng.uniform(b0 + 1.5, max(b0 + 1.6, b1 - 1.5 - ud))
                    uh = rng.uniform(1.2, 3.0)
                    shade = np.float32(rng.uniform(0.55, 0.8))
                    boxes.add((ux, uy, g + hh - 0.2), (ux + uw, uy + ud, g + hh + uh), 2, MAT_ROOF_UNIT,
                              (shade, shade, shade * 1.02), (shade * 0.9,) * 3, g + hh, bid)
        buildings.append(dict(id=bid, kind=kind, floors=floors, parts=parts,
                              height=float(max(p["top_z"] for p in parts) - g), ground_z=g))

    # blocks -> lots -> buildings / parks / parking
    for bi in range(nbx):
        for bj in range(nby):
            x0 = road_x[bi] + road_x_hw[bi] + sidewalk
            x1 = road_x[bi + 1] - road_x_hw[bi + 1] - sidewalk
            y0 = road_y[bj] + road_y_hw[bj] + sidewalk
            y1 = road_y[bj + 1] - road_y_hw[bj + 1] - sidewalk
            if block_kind[bi, bj] == 2:  # riverbank: trees along both banks
                for x in np.arange(x0 + 4, x1 - 4, rng.uniform(9, 14)):
                    for side in (-1, 1):
                        yc = float(city.river_centre_y(np.array(x)))
                        yt = yc + side * (river["bank_halfwidth"] + rng.uniform(2.0, 6.0))
                        if y0 + 3 < yt < y1 - 3 and rng.random() < 0.8:
                            add_tree(x + rng.uniform(-2, 2), yt)
                continue
            if block_kind[bi, bj] == 1:  # park
                n = int((x1 - x0) * (y1 - y0) / 90)
                for _ in range(n):
                    add_tree(rng.uniform(x0 + 3, x1 - 3), rng.uniform(y0 + 3, y1 - 3), rng.uniform(0.9, 1.4))
                continue
            nlx = int(np.clip(round((x1 - x0) / rng.uniform(20, 36)), 1, 4))
            nly = int(np.clip(round((y1 - y0) / rng.uniform(20, 36)), 1, 4))
            lot_n[bi, bj] = (nlx, nly)
            for li in range(nlx):
                for lj in range(nly):
                    lx0, lx1 = x0 + (x1 - x0) * li / nlx, x0 + (x1 - x0) * (li + 1) / nlx
                    ly0, ly1 = y0 + (y1 - y0) * lj / nly, y0 + (y1 - y0) * (lj + 1) / nly
                    r = rng.random()
                    cx, cy = (lx0 + lx1) / 2, (ly0 + ly1) / 2
                    dist = float(np.hypot(*city.to_enu(np.array([cx, cy, 0.0]))[:2]))
                    if r < 0.08:
                        lot_kind[bi, bj, li, lj] = ZONE_PARKING
                        _parking_cars(rng, boxes, ter, lx0, lx1, ly0, ly1)
                    elif r < 0.13:
                        lot_kind[bi, bj, li, lj] = ZONE_PLAZA
                        add_tree(cx, cy, 1.2)
                    else:
                        lot_kind[bi, bj, li, lj] = ZONE_YARD if rng.random() < 0.6 else ZONE_LAWN
                        sb = rng.uniform(1.5, 6.0, size=4)
                        bx0, bx1, by0, by1 = lx0 + sb[0], lx1 - sb[1], ly0 + sb[2], ly1 - sb[3]
                        if bx1 - bx0 > 6 and by1 - by0 > 6:
                            add_building(bx0, bx1, by0, by1, dist)
                        if lot_kind[bi, bj, li, lj] == ZONE_LAWN:
                            # a few trees in the lawn around the building, where there is room
                            for _ in range(rng.integers(0, 4)):
                                side = rng.integers(4)
                                margin = (sb[0], sb[1], sb[2], sb[3])[side]
                                if margin < 3.2:
                                    continue
                                if side < 2:
                                    tx = lx0 + margin / 2 if side == 0 else lx1 - margin / 2
                                    ty = rng.uniform(ly0 + 2, ly1 - 2)
                                else:
                                    ty = ly0 + margin / 2 if side == 2 else ly1 - margin / 2
                                    tx = rng.uniform(lx0 + 2, lx1 - 2)
                                add_tree(tx, ty, 0.7)

    def block_of(x, y):
        """Kind of the block holding plan (x, y)."""
        bi = min(max(int(np.searchsorted(road_x, x)) - 1, 0), nbx - 1)
        bj = min(max(int(np.searchsorted(road_y, y)) - 1, 0), nby - 1)
        return block_kind[bi, bj]

    # street trees along some roads (on the sidewalk), and vehicles on the carriageways
    for axis, (centres, hws, other, other_hw) in enumerate(((road_x, road_x_hw, road_y, road_y_hw),
                                                            (road_y, road_y_hw, road_x, road_x_hw))):
        for k, (c, hw) in enumerate(zip(centres, hws)):
            trees_here = rng.random() < 0.5
            for a0, a1 in zip(other[:-1] + other_hw[:-1] + sidewalk, other[1:] - other_hw[1:] - sidewalk):
                if a1 - a0 < 8:
                    continue
                if trees_here:
                    for s in np.arange(a0 + 4, a1 - 3, 9.0):
                        for side in (-1, 1):
                            off = c + side * (hw + sidewalk * 0.5)
                            x, y = (off, s) if axis == 0 else (s, off)
                            if abs(x) >= plan_half or abs(y) >= plan_half:
                                continue
                            if city.ground_zone(np.array(x), np.array(y)) != ZONE_SIDEWALK:
                                continue
                            if block_of(x, y) == 2 and abs(y - city.river_centre_y(np.array(x))) < river["bank_halfwidth"] + 2:
                                continue  # not on the bridge
                            add_tree(x, y, 0.7)
                n_cars = rng.poisson((a1 - a0) / 25.0)
                for _ in range(n_cars):
                    s = rng.uniform(a0 + 3, a1 - 3)
                    lane = rng.choice([-1, 1]) * hw * rng.uniform(0.3, 0.6)
                    bus = rng.random() < 0.08
                    length, width, height = (11.0, 2.5, 3.1) if bus else (rng.uniform(4.2, 4.9), 1.85, rng.uniform(1.4, 1.7))
                    x, y = (c + lane, s) if axis == 0 else (s, c + lane)
                    if axis == 0:
                        lo, hi = (x - width / 2, y - length / 2), (x + width / 2, y + length / 2)
                    else:
                        lo, hi = (x - length / 2, y - width / 2), (x + length / 2, y + width / 2)
                    if axis == 0 and block_of(x, y) == 2:
                        continue  # keep bridges clear
                    g = float(ter(np.array(x), np.array(y)))
                    col = _CAR_COLORS[rng.integers(len(_CAR_COLORS))]
                    boxes.add((lo[0], lo[1], g - 0.3), (hi[0], hi[1], g + height), 5, MAT_VEHICLE, col, col)

    # bridges where north-south roads cross the river channel
    for c, hw in zip(road_x, road_x_hw):
        xs = np.linspace(c - hw - sidewalk, c + hw + sidewalk, 9)
        yc = city.river_centre_y(xs)
        ya, yb = float((yc - river["bank_halfwidth"]).min()) - 1.0, float((yc + river["bank_halfwidth"]).max()) + 1.0
        deck = float(max(ter(xs, np.full_like(xs, ya)).max(), ter(xs, np.full_like(xs, yb)).max())) + 0.25
        boxes.add((xs[0], ya, deck - 1.4), (xs[-1], yb, deck), 1, MAT_BRIDGE, (0.62, 0.62, 0.60), (0.3, 0.3, 0.3))

    city.boxes = boxes.build()
    if trees:
        c, r, col = zip(*trees)
        city.ellipsoids = Ellipsoids(np.array(c, np.float64), np.array(r, np.float64), np.array(col, np.float32))
    else:
        city.ellipsoids = Ellipsoids(np.zeros((0, 3)), np.ones((0, 3)), np.zeros((0, 3), np.float32))
    city.buildings = buildings
    if built_half is not None:
        _keep_built(city, float(built_half))
    return city


def _keep_built(city: City, built_half: float) -> None:
    """Drop the objects whose centre lies outside the built patch (bridges stay: they carry the
    roads), after generation, so the random draws -- and the city inside the patch -- are those
    of the unrestricted city."""
    city.built_half = built_half
    bx = city.boxes
    centre = (bx.lo + bx.hi) / 2
    keep = city.in_built(centre[:, 0], centre[:, 1]) | (bx.material == MAT_BRIDGE)
    city.boxes = Boxes(**{name: getattr(bx, name)[keep] for name in bx.__dataclass_fields__})
    e = city.ellipsoids
    keep_e = city.in_built(e.center[:, 0], e.center[:, 1])
    city.ellipsoids = Ellipsoids(e.center[keep_e], e.radii[keep_e], e.color[keep_e])
    kept = set(city.boxes.building[city.boxes.building >= 0].tolist())
    city.buildings = [b for b in city.buildings if b["id"] in kept]


def _parking_cars(rng, boxes: _BoxList, ter, x0, x1, y0, y1):
    """Rows of parked cars on a parking lot (stalls 2.6 m wide, 5 m deep, along plan x)."""
    for row_y in np.arange(y0 + 1.0, y1 - 5.5, 7.0):
        for sx in np.arange(x0 + 0.5, x1 - 2.6, 2.6):
            if rng.random() < 0.55:
                cx, cy = sx + 1.3, row_y + 2.5
                g = float(ter(np.array(cx), np.array(cy)))
                col = _CAR_COLORS[rng.integers(len(_CAR_COLORS))]
                boxes.add((cx - 0.92, cy - 2.2, g - 0.3), (cx + 0.92, cy + 2.2, g + rng.uniform(1.4, 1.7)), 5,
                          MAT_VEHICLE, col, col)
