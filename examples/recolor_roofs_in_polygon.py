"""Recolor the roofs of the buildings inside a district polygon (GeoJSON in the tile's CRS).

"Roofs" = class building AND more than 5.5 m above the ground; the polygon is a GeoJSON
file in the tile's projected CRS, as a GIS would export it.  From the shell:
``citygen edit TILE add --op recolor --class building --height 5.5,1000 --polygon district.geojson --color 0.2,0.7,0.3``.

    python examples/recolor_roofs_in_polygon.py   # writes outputs/examples/recolor_roofs_in_polygon/
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from citygen.config import RenderConfig
from citygen.edit import EditedField, EditStack, PlaneGround
from citygen.edit.analytic import BUILDING, AnalyticCityField
from citygen.images import rgb_to_uint8, write_png
from citygen.render import render_image
from citygen.render.sampling import look_at
from survey_io import Camera, Georef

GEOREF = Georef("EPSG:32633", (500000.0, 4500000.0, 0.0))


def main(out: Path = Path("outputs/examples/recolor_roofs_in_polygon"), size: int = 96) -> dict:
    out = Path(out)
    tile = out / "tile"
    tile.mkdir(parents=True, exist_ok=True)
    field = AnalyticCityField(with_occupancy=True, occupancy_resolution=32)

    # The district: the north-east quarter of the tile, in UTM coordinates.
    e0, n0 = GEOREF.origin[0], GEOREF.origin[1]
    ring = [[e0 + 0, n0 + 0], [e0 + 20, n0 + 0], [e0 + 20, n0 + 20], [e0 + 0, n0 + 20], [e0 + 0, n0 + 0]]
    geojson = {"type": "FeatureCollection",
               "features": [{"type": "Feature", "properties": {"name": "district"},
                             "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    (out / "district.geojson").write_text(json.dumps(geojson))

    stack = EditStack.load(tile)
    stack.add("recolor", {"and": [{"class": "building"}, {"height": [5.5, 1000.0]},
                                  {"polygon": json.loads((out / "district.geojson").read_text()), "crs": "tile"}]},
              {"color": [0.2, 0.7, 0.3]})
    stack.save()

    edited = EditedField(field, EditStack.load(tile), georef=GEOREF, ground=PlaneGround(0.0))
    camera = Camera(width=size, height=size, fl_x=size, fl_y=size, cx=size / 2, cy=size / 2)
    c2w = look_at(np.array([0.0, 0.0, 40.0]), np.array([0.0, 0.0, 0.0]))
    cfg = RenderConfig(step_size=0.2)
    before, after = render_image(field, camera, c2w, render=cfg), render_image(edited, camera, c2w, render=cfg)
    write_png(out / "before.png", rgb_to_uint8(before["rgb"]))
    write_png(out / "after.png", rgb_to_uint8(after["rgb"]))
    changed = (after["rgb"] - before["rgb"]).abs().sum(-1) > 1e-4
    only_buildings = bool((before["semantics"].argmax(-1)[changed] == BUILDING).all())
    summary = {"changed_pixels": int(changed.sum()), "only_building_pixels_changed": only_buildings,
               "check": int(changed.sum()) > 0 and only_buildings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
