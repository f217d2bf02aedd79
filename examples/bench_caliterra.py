"""The real-survey chain on caliterra (tests/data/caliterra, 40 DJI-style JPEGs): ingest -> train
(the ``drone`` preset, the default for a survey without depth maps) -> export (ortho + DSM) ->
evaluation, with every figure in one JSON::

    python examples/bench_caliterra.py --work /tmp/cal-bench                 # the full run (~15 min)
    python examples/bench_caliterra.py --work /tmp/cal-bench --baseline tiny  # + the tiny preset, same steps
    python examples/bench_caliterra.py --work /tmp/cal-bench --steps 3000 --max-seconds 0 \
        --override optim.ground_opacity_weight=0.1                            # a config override, both runs
    python examples/bench_caliterra.py --work /tmp/ci --images 10 --ingest-max-size 600 --steps 100 --downscale 4 --export-gsd 1

Figures (``WORK/bench_caliterra.json``): ingest (registered images, reprojection error, held-out
views and points), training (preset and why, steps, seconds), held-out views (PSNR, SSIM, and the
rendered depth against the held-out SfM points they observe: median |error|, RMSE, share within
2 GSD), and the exported DSM against the held-out points and its coverage of the ground two or
more cameras see (``citygen.export.survey_check``).  ``--baseline PRESET`` trains a second run with
another preset at the same settings and reports it beside the first ("before and after").

A measurement, not a test: the figures depend on the machine's speed through ``max_seconds``
(pass ``--steps`` with ``--max-seconds 0`` for a fixed step count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALITERRA = REPO / "tests" / "data" / "caliterra"


def ingest_subset(src: Path, out: Path, n_images: int | None, threads: int, max_image_size: int = 1000) -> dict:
    """``citygen ingest`` of the first ``n_images`` JPEGs of ``src`` (all when None); reused when
    ``out`` already holds an ingest of the same selection."""
    from survey_io.ingest import IngestOptions, ingest
    from survey_io.sfm import SfmOptions

    marker = out / "bench_ingest.json"
    names = sorted(p.name for p in (src / "images").glob("*.jpg"))[: n_images or None]
    key = {"images": names, "max_image_size": max_image_size}
    if marker.is_file() and all(json.loads(marker.read_text()).get(k) == v for k, v in key.items()):
        return json.loads((out / "ingest_report.json").read_text()) | {"reused": True}
    staging = out.parent / f"{out.name}_src"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in names:
        try:  # a hard link (symlinks may leave the dataset folder, which the reader refuses)
            (staging / name).hardlink_to(src / "images" / name)
        except OSError:
            shutil.copy(src / "images" / name, staging / name)
    t0 = time.perf_counter()
    ingest(staging, out, IngestOptions(sfm=SfmOptions(num_threads=threads, max_image_size=max_image_size)))
    report = json.loads((out / "ingest_report.json").read_text())
    marker.write_text(json.dumps({**key, "seconds": time.perf_counter() - t0}))
    return report


def train_and_check(data: Path, run: Path, export_dir: Path, preset: str | None, overrides: dict,
                    export_gsd: float) -> dict:
    """Train one run (``preset``, or the default rule's choice), evaluate its held-out views, export
    ortho + DSM and check the DSM against the survey; the figures as a dict."""
    from citygen.config import choose_preset, load_config
    from citygen.export.run import ExportOptions, export_tile
    from citygen.train import train_block
    from citygen.train.data import load_survey

    survey = load_survey(data)
    name, why = choose_preset(preset, bool(survey.images) and all(im.depth is not None for im in survey.images))
    cfg = load_config(name, overrides)
    shutil.rmtree(run, ignore_errors=True)
    result = train_block(cfg, survey, run, progress=False)
    t0 = time.perf_counter()
    shutil.rmtree(export_dir, ignore_errors=True)
    manifest = export_tile(run, export_dir, ExportOptions(what=("ortho", "dsm"), gsd=export_gsd, progress=False))
    export_s = time.perf_counter() - t0
    ev = result.eval or {}
    return {"preset": name, "preset_reason": why, "overrides": overrides, "steps": result.step,
            "train_seconds": round(result.seconds, 1), "box_source": result.box_source,
            "heldout_views": {"count": len(ev.get("views", [])), **{k: ev.get("mean", {}).get(k) for k in ("psnr", "ssim")},
                              "depth_vs_heldout_points": ev.get("heldout_points")},
            "export": {"gsd_m": export_gsd, "seconds": round(export_s, 1), "files": manifest["files"],
                       "dsm_vs_heldout_points": manifest["survey_check"]["heldout_points"],
                       "image_gsd_m": manifest["survey_check"]["image_gsd_m"],
                       "coverage": manifest["survey_check"]["coverage"]}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="work folder (ingest, runs, exports, the JSON)")
    ap.add_argument("--src", type=Path, default=CALITERRA, help="the survey folder (holding images/)")
    ap.add_argument("--images", type=int, default=None, help="ingest only the first N images (name order)")
    ap.add_argument("--preset", default=None, help="training preset (default: the rule's choice: drone here)")
    ap.add_argument("--baseline", default=None, help="also train this preset at the same settings")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--max-seconds", type=float, default=None, help="training time cap (default: the preset's)")
    ap.add_argument("--downscale", type=int, default=None, help="image downscale (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both runs, e.g. optim.ground_opacity_weight=0.01 (repeatable)")
    ap.add_argument("--export-gsd", type=float, default=0.25, help="DSM / ortho cell size, metres")
    ap.add_argument("--ingest-threads", type=int, default=2, help="COLMAP threads")
    ap.add_argument("--ingest-max-size", type=int, default=1000, help="long side (pixels) SfM features are extracted at")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    overrides = {k: v for k, v in {"steps": args.steps, "max_seconds": args.max_seconds, "downscale": args.downscale,
                                   "threads": args.threads}.items() if v is not None}
    from citygen.config import parse_overrides
    from citygen.errors import CitygenError

    try:
        overrides.update(parse_overrides(args.override))
    except CitygenError as err:
        ap.error(str(err))
    t0 = time.perf_counter()
    rep = ingest_subset(args.src, work / "survey", args.images, args.ingest_threads, args.ingest_max_size)
    figures = {"survey": str(args.src), "ingest": {
        "registered": rep.get("registered"), "total": rep.get("total"),
        "reprojection_error_px": (rep.get("sfm") or {}).get("mean_reprojection_error_px"),
        "held_out_views": len((rep.get("held_out_views") or {}).get("names", [])),
        "held_out_points": (rep.get("held_out_points") or {}).get("num_points"), "reused": rep.get("reused", False)}}
    figures["run"] = train_and_check(work / "survey", work / "run", work / "export", args.preset, overrides,
                                     args.export_gsd)
    if args.baseline:
        figures["baseline"] = train_and_check(work / "survey", work / "run_baseline", work / "export_baseline",
                                              args.baseline, overrides, args.export_gsd)
    figures["seconds_total"] = round(time.perf_counter() - t0, 1)
    (work / "bench_caliterra.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
