"""Export cost of an edit stack: 0, 10, 100, 1000 and 10,000 edits spread over a small tile.

Builds a single-block tile once (a small CityField distilled from the analytic city,
40 m x 40 m), then for each count writes ``edits.json`` (one small edit per cell of a grid
over the tile, cycling recolour / raise / duplicate / remove, so each sample is reached by a
few edits) and runs ``citygen export`` (ortho, DSM, semantics) in a fresh process, printing
its wall time, the time spent building the edited field and the process's peak memory::

    python examples/bench_edit_stack.py                       # 0,10,100,1000,10000 edits
    python examples/bench_edit_stack.py --counts 0,100 --gsd 0.25 --work /tmp/bench

A measurement, not a test: the figures depend on the machine (see the printed table).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("recolor", "raise", "duplicate", "remove")


def make_tile(tile: Path) -> None:
    import torch

    from citygen.config import TrainConfig, to_dict
    from citygen.edit.analytic import AnalyticCityField
    from citygen.edit.bake import distill
    from citygen.store.checkpoint import save_checkpoint
    from citygen.store.field import build_field
    from survey_io import Georef
    from survey_io.semantics import CLASSES

    teacher = AnalyticCityField(with_occupancy=True, occupancy_resolution=32)
    cfg = TrainConfig()
    cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.base_resolution = 4, 12, 4
    cfg.field.max_resolution, cfg.field.hidden_dim, cfg.field.appearance_dim = 48, 16, 4
    cfg.field.semantic_hidden_dim, cfg.field.backend = 16, "torch"
    cfg.render.grid_resolution, cfg.render.step_size = 32, 0.25
    torch.manual_seed(0)
    f = build_field(cfg, teacher.aabb.numpy(), 2, len(CLASSES), torch.tensor([[0.0, 0.0, 40.0], [5.0, 0.0, 40.0]]),
                    torch.device("cpu"))
    distill(teacher, f, steps=200, batch=4096, lr=1e-2, step_size=0.5)
    f.occupancy.occupied.copy_(teacher.occupancy.occupied)
    georef = Georef("EPSG:32633", (500000.0, 4500000.0, 0.0))
    meta = {"config": to_dict(cfg), "aabb": teacher.aabb.tolist(), "classes": list(CLASSES),
            "georef": georef.to_dict(), "image_names": ["a.png", "b.png"], "optimizer": {"type": "Adam", "groups": []}}
    save_checkpoint(tile / "checkpoints", 200, {f"model.{k}": v for k, v in f.state_dict().items()}, meta)


def stack(n: int, extent: float = 40.0, x0: float = -20.0) -> dict:
    """``n`` edits, one per cell of a near-square grid over the tile, kinds in turn."""
    side = max(math.ceil(math.sqrt(n)), 1)
    cell = extent / side
    edits = []
    for i in range(n):
        r, c = divmod(i, side)
        box = [x0 + c * cell, x0 + r * cell, -2.0, x0 + (c + 1) * cell, x0 + (r + 1) * cell, 14.0]
        kind = KINDS[i % len(KINDS)]
        if kind == "recolor":
            e = {"op": "recolor", "selection": {"box": box}, "params": {"hsv": [float(i % 360), 1.0, 1.0]}}
        elif kind == "raise":
            e = {"op": "raise", "selection": {"and": [{"box": box}, {"class": "building"}]}, "params": {"dz": 1.0}}
        elif kind == "duplicate":
            e = {"op": "duplicate", "selection": {"box": box}, "params": {"offset": [cell, 0.0, 0.5]}}
        else:
            e = {"op": "remove", "selection": {"and": [{"box": box}, {"class": "vehicle"}]}, "params": {}}
        edits.append({"id": f"e{i}", "enabled": True, **e})
    return {"version": 1, "edits": edits, "undone": [], "ground": {"kind": "plane", "height": 0.0}}


def run_one(tile: Path, out: Path, gsd: float) -> dict:
    """In this (fresh) process: export the tile; wall time, edited-field build time, peak RSS."""
    import resource

    import torch

    from citygen.edit import field as edit_field
    from citygen.export.run import ExportOptions, export_tile

    torch.set_num_threads(1)
    build = [0.0]
    init = edit_field.EditedField.__init__

    def timed_init(self, *args, **kwargs):  # how much of the export is building the edited field
        t = time.perf_counter()
        init(self, *args, **kwargs)
        build[0] += time.perf_counter() - t

    edit_field.EditedField.__init__ = timed_init
    t0 = time.perf_counter()
    manifest = export_tile(tile, out, ExportOptions(what=("ortho", "dsm", "semantics"), gsd=gsd, progress=False))
    total = time.perf_counter() - t0
    return {"seconds": round(total, 2), "build_s": round(build[0], 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "valid_cells": manifest["counts"]["raster_valid_cells"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="0,10,100,1000,10000")
    ap.add_argument("--gsd", type=float, default=0.25)
    ap.add_argument("--work", type=Path, default=Path("/tmp/citygen_bench_edit_stack"))
    ap.add_argument("--one", nargs=3, metavar=("TILE", "OUT", "GSD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), Path(args.one[1]), float(args.one[2]))))
        return
    tile = args.work / "tile"
    if not (tile / "checkpoints").is_dir():
        make_tile(tile)
    print(f"{'edits':>6} {'export s':>9} {'build s':>8} {'peak MiB':>9} {'valid cells':>11}")
    for n in [int(v) for v in args.counts.split(",")]:
        (tile / "edits.json").write_text(json.dumps(stack(n)))
        res = subprocess.run([sys.executable, __file__, "--one", str(tile), str(args.work / f"out_{n}"), str(args.gsd)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{n:>6} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{n:>6} {r['seconds']:>9.2f} {r['build_s']:>8.2f} {r['peak_rss_mib']:>9.1f} {r['valid_cells']:>11}",
              flush=True)


if __name__ == "__main__":
    main()
