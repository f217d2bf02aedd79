"""A tile's partition into blocks (:class:`TilePlan`) and its file, ``plan.json``.

Layout of ``plan.json`` (version 1)::

    {"version": 1, "kind": "citygen.tile_plan",
     "georef": {"crs": ..., "origin": [e, n, h]},
     "grid": {"origin_local": [x, y], "origin_crs": [e, n], "block_size": [sx, sy],
              "rows": R, "cols": C, "snapped": bool},
     "overlap": {"margin_m": m},
     "ground": {...GroundModel.describe()...},
     "config": {...PartitionConfig...},
     "n_images": N, "unassigned_images": [...],
     "blocks": [{"id": "b_r0_c1", "row": 0, "col": 1,
                 "core": {"local": [x0, y0, x1, y1], "crs": [e0, n0, e1, n1]},
                 "extended": {"local": [...], "crs": [...]},
                 "z_range": {"local": [z0, z1], "crs": [h0, h1]},
                 "images": [...], "test_images": [...], "coverage": {...}}, ...]}

Rectangles are (x_min, y_min, x_max, y_max).  The CRS values are written for people and
other tools; the loader reads the local ones (and checks that both agree with the georef).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from survey_io import Georef, SurveyError
from survey_io.atomic import atomic_write_json

from ..errors import CitygenError

PLAN_VERSION = 1
PLAN_KIND = "citygen.tile_plan"

Rect = tuple[float, float, float, float]


#: the plan's file name in a tile folder (citygen.store.layout refers to it).
PLAN_FILE = "plan.json"


def block_id(row: int, col: int) -> str:
    return f"b_r{row}_c{col}"


@dataclass(frozen=True)
class Grid:
    """The block grid in the local frame: block (r, c) has core
    ``[x0 + c sx, x0 + (c+1) sx] x [y0 + r sy, y0 + (r+1) sy]`` (row 0 is the southern one)."""

    origin: tuple[float, float]
    block_size: tuple[float, float]
    rows: int
    cols: int
    snapped: bool = False

    def core(self, row: int, col: int) -> Rect:
        x0 = self.origin[0] + col * self.block_size[0]
        y0 = self.origin[1] + row * self.block_size[1]
        return (x0, y0, x0 + self.block_size[0], y0 + self.block_size[1])

    @property
    def extent(self) -> Rect:
        return (self.origin[0], self.origin[1], self.origin[0] + self.cols * self.block_size[0],
                self.origin[1] + self.rows * self.block_size[1])


@dataclass
class Block:
    """One block: its core rectangle, the core grown by the margin, its height range and images.

    ``images`` are the training images, the ones seeing most of the core first;
    ``test_images`` the held-out views that see the block (for evaluation), by name.
    """

    id: str
    row: int
    col: int
    core: Rect
    extended: Rect
    z_range: tuple[float, float]
    images: list[str] = field(default_factory=list)
    test_images: list[str] = field(default_factory=list)
    coverage: dict[str, Any] = field(default_factory=dict)

    @property
    def area_m2(self) -> float:
        return (self.core[2] - self.core[0]) * (self.core[3] - self.core[1])

    @property
    def aabb(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The box a block's field covers (local frame): the extended rectangle times the z range."""
        x0, y0, x1, y1 = self.extended
        return (x0, y0, self.z_range[0]), (x1, y1, self.z_range[1])

    @property
    def low_coverage(self) -> bool:
        return bool(self.coverage.get("low_coverage", False))


@dataclass
class TilePlan:
    """The partition of one tile."""

    georef: Georef
    grid: Grid
    margin_m: float
    blocks: list[Block]
    ground: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    unassigned_images: list[str] = field(default_factory=list)
    #: per coverage cell view counts over the whole grid (row 0 south); computed, not saved.
    view_counts: np.ndarray | None = field(default=None, repr=False, compare=False)

    def block(self, block_id_: str) -> Block:
        for b in self.blocks:
            if b.id == block_id_:
                return b
        raise CitygenError(None, f"no block {block_id_!r} in the plan")

    def blocks_of(self, image_name: str) -> list[str]:
        """Ids of the blocks an image trains (or evaluates) in."""
        return [b.id for b in self.blocks if image_name in b.images or image_name in b.test_images]

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        off = np.asarray(self.georef.origin)

        def crs_rect(r: Rect) -> list[float]:
            return [r[0] + off[0], r[1] + off[1], r[2] + off[0], r[3] + off[1]]

        return {
            "version": PLAN_VERSION,
            "kind": PLAN_KIND,
            "georef": self.georef.to_dict(),
            "grid": {"origin_local": list(self.grid.origin),
                     "origin_crs": [self.grid.origin[0] + off[0], self.grid.origin[1] + off[1]],
                     "block_size": list(self.grid.block_size), "rows": self.grid.rows,
                     "cols": self.grid.cols, "snapped": self.grid.snapped},
            "overlap": {"margin_m": self.margin_m},
            "ground": self.ground,
            "config": self.config,
            "n_images": self.n_images,
            "unassigned_images": list(self.unassigned_images),
            "blocks": [{
                "id": b.id, "row": b.row, "col": b.col,
                "core": {"local": list(b.core), "crs": crs_rect(b.core)},
                "extended": {"local": list(b.extended), "crs": crs_rect(b.extended)},
                "z_range": {"local": list(b.z_range), "crs": [b.z_range[0] + off[2], b.z_range[1] + off[2]]},
                "images": list(b.images), "test_images": list(b.test_images), "coverage": b.coverage,
            } for b in self.blocks],
        }

    def save(self, path: str | Path) -> Path:
        """Write ``plan.json`` atomically."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, d: Any, path: str | Path | None = None) -> TilePlan:
        """Parse a plan dict; raise :class:`CitygenError` naming ``path`` on anything malformed."""
        def bad(reason: str) -> CitygenError:
            return CitygenError(path, f"malformed plan: {reason}")

        if not isinstance(d, dict):
            raise bad("expected a JSON object")
        if d.get("kind", PLAN_KIND) != PLAN_KIND:
            raise bad(f"kind is {d.get('kind')!r}, expected {PLAN_KIND!r}")
        if d.get("version") != PLAN_VERSION:
            raise bad(f"unsupported version {d.get('version')!r} (this citygen reads version {PLAN_VERSION})")
        try:
            georef = Georef.from_dict(d["georef"])
        except SurveyError as err:
            raise bad(f"georef: {err.reason}") from None
        except (KeyError, TypeError):
            raise bad("missing 'georef'") from None
        try:
            g = d["grid"]
            grid = Grid(origin=_floats(g["origin_local"], 2, "grid.origin_local"),
                        block_size=_floats(g["block_size"], 2, "grid.block_size"),
                        rows=_int(g["rows"], "grid.rows"), cols=_int(g["cols"], "grid.cols"),
                        snapped=bool(g.get("snapped", False)))
            margin = float(d["overlap"]["margin_m"])
            blocks = [_block_from(b, i) for i, b in enumerate(d["blocks"])]
            unassigned = [str(n) for n in d.get("unassigned_images", [])]
            n_images = _int(d.get("n_images", 0), "n_images")
        except KeyError as err:
            raise bad(f"missing key {err}") from None
        except (TypeError, ValueError) as err:
            raise bad(str(err)) from None
        if min(grid.block_size) <= 0 or grid.rows < 1 or grid.cols < 1 or margin < 0:
            raise bad("grid needs positive block sizes, rows, cols and a margin >= 0")
        if not blocks:
            raise bad("no blocks")
        ids = [b.id for b in blocks]
        if len(set(ids)) != len(ids):
            raise bad("duplicate block ids")
        for b in blocks:
            if not (0 <= b.row < grid.rows and 0 <= b.col < grid.cols) or b.id != block_id(b.row, b.col):
                raise bad(f"block {b.id!r} (row {b.row}, col {b.col}) is not a cell of the "
                          f"{grid.rows}x{grid.cols} grid")
            if not np.allclose(b.core, grid.core(b.row, b.col), atol=1e-6):
                raise bad(f"block {b.id!r}: core {list(b.core)} does not match the grid")
        return cls(georef=georef, grid=grid, margin_m=margin, blocks=blocks, ground=dict(d.get("ground", {})),
                   config=dict(d.get("config", {})), n_images=n_images, unassigned_images=unassigned)

    @classmethod
    def load(cls, path: str | Path) -> TilePlan:
        """Read ``plan.json``; :class:`CitygenError` naming the file on any problem."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CitygenError(path, "plan file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CitygenError(path, f"not valid JSON ({err})") from None
        return cls.from_dict(d, path)


def _floats(v: Any, n: int, what: str) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise ValueError(f"{what} must be a list of {n} numbers, got {v!r}")
    out = tuple(float(x) for x in v)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} must be finite, got {v!r}")
    return out


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an integer, got {v!r}")
    return v


def _rect(v: Any, what: str) -> Rect:
    r = _floats(v, 4, what)
    if not (r[2] > r[0] and r[3] > r[1]):
        raise ValueError(f"{what} must be (x_min, y_min, x_max, y_max) with max > min, got {list(r)}")
    return r  # type: ignore[return-value]


def _block_from(b: Any, i: int) -> Block:
    where = f"blocks[{i}]"
    if not isinstance(b, dict):
        raise TypeError(f"{where} must be an object")
    images = b.get("images", [])
    tests = b.get("test_images", [])
    if not isinstance(images, list) or not isinstance(tests, list):
        raise TypeError(f"{where}: images and test_images must be lists of names")
    z = _floats(b["z_range"]["local"], 2, f"{where}.z_range.local")
    if z[1] < z[0]:
        raise ValueError(f"{where}.z_range.local must be (min, max), got {list(z)}")
    core = _rect(b["core"]["local"], f"{where}.core.local")
    ext = _rect(b["extended"]["local"], f"{where}.extended.local")
    if not (ext[0] <= core[0] and ext[1] <= core[1] and ext[2] >= core[2] and ext[3] >= core[3]):
        raise ValueError(f"{where}: extended rectangle does not contain the core")
    cov = b.get("coverage", {})
    if not isinstance(cov, dict):
        raise TypeError(f"{where}.coverage must be an object")
    return Block(id=str(b["id"]), row=_int(b["row"], f"{where}.row"), col=_int(b["col"], f"{where}.col"),
                 core=core, extended=ext, z_range=z,  # type: ignore[arg-type]
                 images=[str(n) for n in images], test_images=[str(n) for n in tests], coverage=cov)
