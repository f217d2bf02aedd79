"""Raise every building of a district by 10 m (walls are extended from their lower floors).

From the shell: ``citygen edit TILE add --op raise --class building --polygon district.geojson --dz 10``.

    python examples/raise_district.py   # writes outputs/examples/raise_district/
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from citygen.config import RenderConfig
from citygen.edit import EditedField, EditStack, PlaneGround
from citygen.edit.analytic import AnalyticCityField
from citygen.images import rgb_to_uint8, write_png
from citygen.render import render_image
from citygen.render.sampling import look_at
from survey_io import Camera, Georef

GEOREF = Georef("EPSG:32633", (500000.0, 4500000.0, 0.0))
DZ = 10.0


def main(out: Path = Path("outputs/examples/raise_district"), size: int = 96) -> dict:
    out = Path(out)
    tile = out / "tile"
    tile.mkdir(parents=True, exist_ok=True)
    field = AnalyticCityField(with_occupancy=True, occupancy_resolution=32)
    e0, n0 = GEOREF.origin[0], GEOREF.origin[1]
    district = {"type": "Polygon", "coordinates": [[[e0 - 20, n0 - 20], [e0, n0 - 20], [e0, n0], [e0 - 20, n0]]]}

    stack = EditStack.load(tile)
    stack.add("raise", {"and": [{"class": "building"}, {"polygon": district, "crs": "tile"}]}, {"dz": DZ})
    stack.save()

    edited = EditedField(field, EditStack.load(tile), georef=GEOREF, ground=PlaneGround(0.0))
    camera = Camera(width=size, height=size, fl_x=size * 0.8, fl_y=size * 0.8, cx=size / 2, cy=size / 2)
    c2w = look_at(np.array([30.0, -30.0, 45.0]), np.array([-4.0, -2.0, 0.0]))
    nadir = look_at(np.array([0.0, 0.0, 60.0]), np.array([0.0, 0.0, 0.0]))
    cfg = RenderConfig(step_size=0.2)
    write_png(out / "before.png", rgb_to_uint8(render_image(field, camera, c2w, render=cfg)["rgb"]))
    write_png(out / "after.png", rgb_to_uint8(render_image(edited, camera, c2w, render=cfg)["rgb"]))
    # The roof of the district's building (x < 0), seen from straight above, is DZ closer.
    roof = np.linalg.inv(nadir) @ np.array([-8.0, -6.0, 10.0, 1.0])
    row = int(camera.cy + camera.fl_y * roof[1] / roof[2])
    col = int(camera.cx + camera.fl_x * roof[0] / roof[2])
    d0 = float(render_image(field, camera, nadir, render=cfg)["depth"][row, col])
    d1 = float(render_image(edited, camera, nadir, render=cfg)["depth"][row, col])
    summary = {"roof_depth_before_m": round(d0, 3), "roof_depth_after_m": round(d1, 3),
               "check": abs((d0 - d1) - DZ) < 0.25}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
