"""Remove every vehicle from a tile, filling the road underneath from its surroundings.

Runs on the closed-form demo city (citygen.edit.analytic); for a trained tile, replace the
field by ``load_field(TILE)`` (or let a TileRenderer apply ``tile_field_wrapper(TILE)``).
The same edit from the shell: ``citygen edit TILE add --op remove --class vehicle``.

    python examples/remove_vehicles.py          # writes outputs/examples/remove_vehicles/
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from citygen.config import RenderConfig
from citygen.edit import EditedField, EditStack
from citygen.edit.analytic import VEHICLE, AnalyticCityField
from citygen.images import rgb_to_uint8, write_png
from citygen.render import render_image
from citygen.render.sampling import look_at
from survey_io import Camera


def main(out: Path = Path("outputs/examples/remove_vehicles"), size: int = 96) -> dict:
    out = Path(out)
    tile = out / "tile"
    tile.mkdir(parents=True, exist_ok=True)
    field = AnalyticCityField(with_occupancy=True, occupancy_resolution=32)

    stack = EditStack.load(tile)
    stack.add("remove", {"class": "vehicle"}, {"fill_ground": True})
    stack.save()  # TILE/edits.json: every renderer applies it from now on

    # No ground model given: it is estimated from the field's ground/road surface.
    edited = EditedField(field, EditStack.load(tile), raster_cell=0.5)
    camera = Camera(width=size, height=size, fl_x=size, fl_y=size, cx=size / 2, cy=size / 2)
    c2w = look_at(np.array([0.0, 0.0, 40.0]), np.array([0.0, 0.0, 0.0]))
    cfg = RenderConfig(step_size=0.2)
    before, after = render_image(field, camera, c2w, render=cfg), render_image(edited, camera, c2w, render=cfg)
    write_png(out / "before.png", rgb_to_uint8(before["rgb"]))
    write_png(out / "after.png", rgb_to_uint8(after["rgb"]))
    n_before = int((before["semantics"].argmax(-1) == VEHICLE).sum())
    n_after = int((after["semantics"].argmax(-1) == VEHICLE).sum())
    summary = {"vehicle_pixels_before": n_before, "vehicle_pixels_after": n_after,
               "check": n_before > 0 and n_after == 0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
