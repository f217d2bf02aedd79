"""``citygen demo``: the whole pipeline on the built-in synthetic city, end to end.

Stages (each timed; all outputs under ``out``):

1. ``survey/``   — the synthetic drone survey (``tiny``: ~64 JPEGs with EXIF GPS and DJI XMP,
   depth, semantics, ground-truth DSM/DTM/ortho GeoTIFFs).
2. ingest check  — the JPEG folder read back through ``survey_io.read_drone_folder`` (EXIF GPS +
   gimbal angles): how far the metadata pose priors are from the exact cameras.
3. ``tile/``     — the survey partitioned into a 2×2 tile (``plan.json``, ``plan.png``).
4. training      — every block trained through the local executor (``tiny`` preset, a fixed
   number of steps per block, no time cap, seeded), resumable: running the demo again continues
   where it stopped.  Its figures are thus the same on any machine (up to floating-point
   summation order); only its duration varies.  Progress: steps/s, train PSNR and ETA.
5. ``renders/``  — held-out views composited from all blocks, scored against ground truth
   (PSNR, SSIM, semantic accuracy, depth error, seam metric; LPIPS with ``lpips_weights``).
6. ``export/``   — true orthophoto, DSM and semantic GeoTIFFs, LAS and PLY point clouds in the
   tile's CRS, scored against the ground-truth rasters.
7. ``summary.json`` and ``summary.png`` (a held-out view: ground truth | render | classes | depth).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from survey_io import read_drone_folder, read_transforms
from survey_io.atomic import atomic_path, atomic_write_json
from survey_io.synthetic import PRESETS, make_survey

from . import tile as tile_training  # looked up at call time (tests replace train_tile)
from .export.compare import compare_to_ground_truth
from .export.run import ExportOptions, export_tile
from .nets.lpips import load_lpips
from .partition import PartitionConfig
from .partition.run import PlanRequest, run_plan
from .render.tile_views import render_tile_views
from .store.layout import block_id_of, block_run_dirs
from .train.data import load_survey

#: training steps per block, in full batches (a tile block draws ``steps / share`` smaller batches
#: of the same rays, citygen.tile.block_batch), sized once for the 2-core reference machine: 1300
#: keeps the demo near 10 minutes on 2 idle cores (2100 took 15 min once blocks took the smaller,
#: more numerous steps; 26.4 dB held-out there).  Fixed, with no time cap, so a slower or busier
#: machine takes longer but trains the same steps.
BLOCK_STEPS = 1300
BLOCKS = (2, 2)
#: seconds between plain progress lines when stderr is not a terminal (a log file, CI).
PROGRESS_LOG_EVERY_S = 30.0
EXPORT_GSD_M = 1.0
#: held-out views are rendered (and scored) at half resolution: the CPU reference renderer
#: takes about a minute per full 320x240 view of a briefly trained tile on 2 cores.
RENDER_DOWNSCALE = 2


def run_demo(out: str | Path, seed: int = 0, block_steps: int = BLOCK_STEPS,
             lpips_weights: str | Path | None = None) -> dict[str, Any]:
    """Run the demo into ``out``; ``seed`` seeds the synthetic city and the training (sampling,
    initialisation); ``block_steps`` training steps per block."""
    lpips_net = load_lpips(lpips_weights)  # a bad weights file fails now, not after training
    console = Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": seed, "block_steps": block_steps, "timings_s": {}}

    def stage(name: str):
        console.rule(f"[bold]citygen demo: {name}")
        return _Timer(summary["timings_s"], name)

    with stage("synthetic survey"):
        data = _synth(out / "survey", seed)
    with stage("ingest check (EXIF/XMP pose priors)"):
        summary["ingest"] = _ingest_check(data)
    with stage("partition"):
        summary["plan"] = _plan(data, out / "tile")
    with stage("train tile"):
        summary["train"] = _train(out / "tile", data, block_steps, seed, summary["plan"]["blocks"], console)
    with stage("render held-out views"):
        summary["render"] = _render(out / "tile", data, out / "renders", lpips_net)
    with stage("export"):
        summary["export"] = _export(out / "tile", data, out / "export")
    _picture(out, data, summary)
    summary["timings_s"]["total"] = round(sum(summary["timings_s"].values()), 1)
    atomic_write_json(out / "summary.json", summary)
    _print(console, summary, out)
    return summary


class _Timer:
    def __init__(self, sink: dict[str, float], name: str):
        self.sink, self.name = sink, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.sink[self.name] = round(time.perf_counter() - self.t0, 1)


def _synth(folder: Path, seed: int) -> Path:
    data = folder / "transforms.json"
    marker = folder / "synth_done.json"
    if not (data.is_file() and marker.is_file() and json.loads(marker.read_text()).get("seed") == seed):
        make_survey(folder, PRESETS["tiny"], seed=seed)
        atomic_write_json(marker, {"seed": seed, "preset": "tiny"})
    return data


def _ingest_check(data: Path) -> dict[str, Any]:
    """Pose priors from the JPEGs' metadata against the exact cameras."""
    truth = read_transforms(data)
    priors = read_drone_folder(data.parent / "images", georef=truth.georef)
    exact = {Path(im.name).name: im.c2w for im in truth.images}
    pos, rot = [], []
    for im in priors.images:
        gt = exact[Path(im.name).name]
        pos.append(np.linalg.norm(im.c2w[:3, 3] - gt[:3, 3]))
        cos = (np.trace(im.c2w[:3, :3].T @ gt[:3, :3]) - 1.0) / 2.0
        rot.append(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    return {"images": len(priors.images), "position_error_m_max": float(np.max(pos)),
            "rotation_error_deg_max": float(np.max(rot)),
            "note": "priors from EXIF GPS + DJI gimbal XMP; `citygen ingest` refines real surveys with SfM"}


def _plan(data: Path, tile: Path) -> dict[str, Any]:
    report = run_plan(PlanRequest(data=data, out=tile, partition=PartitionConfig(blocks=BLOCKS), train_preset="tiny"))
    s = report["summary"]
    return {"blocks": s["blocks"], "images_per_block": s["images_per_block"], "picture": str(tile / "plan.png")}


def _train(tile: Path, data: Path, block_steps: int, seed: int, n_blocks: int, console) -> dict[str, Any]:
    # a fixed step count and no time cap (the tiny preset's max_seconds is for `citygen train`):
    # the learning-rate schedule always runs to its end and the result does not depend on speed
    overrides = {"steps": block_steps, "max_seconds": 0, "seed": seed, "checkpoint_every": 500}
    with _TrainProgress(tile, block_steps, n_blocks, console):
        # "tiny": what citygen.config.choose_preset picks for the synthetic survey (it has depth maps)
        result = tile_training.train_tile(tile, data, "tiny", executor="local", overrides=overrides)
    result.raise_for_failures()
    return {block_id: {"state": o.state, "attempts": o.attempts,
                       **({"step": o.result.get("step"), "seconds": o.result.get("train_seconds")} if o.result else {})}
            for block_id, o in result.blocks.items()}


def _own_steps(run: Path, default: int) -> int:
    """The steps a block's run folder trains to (its ``config.json``), else ``default``."""
    try:
        return max(1, int(json.loads((run / "config.json").read_text())["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        return default


class _TrainProgress:
    """Progress of the tile's training, read from the blocks' ``metrics.jsonl`` (the trainer's log,
    one line every ``log_every`` steps; the blocks train in worker processes whose own output goes
    to ``worker.log``): steps/s, the current block's train PSNR and the ETA.  A live rich display
    on a terminal, else a plain line every :data:`PROGRESS_LOG_EVERY_S` seconds."""

    def __init__(self, tile: Path, block_steps: int, n_blocks: int, console):
        self.tile, self.block_steps, self.total = tile, block_steps, block_steps * n_blocks
        self.console = console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t0, self._done0 = time.perf_counter(), self.poll()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def poll(self) -> tuple[int, str | None, dict[str, Any] | None]:
        """(steps done over all blocks, the block training now, its last metrics line)."""
        done, current, line = 0, None, None
        for run in block_run_dirs(self.tile):
            path = run / "metrics.jsonl"
            try:
                lines = path.read_text().splitlines()
                last = json.loads(lines[-1]) if lines else None
            except (OSError, ValueError):  # being rewritten: the next poll reads it
                continue
            if last is None:
                continue
            # a tile block spends its rays in more, smaller steps (citygen.tile.block_batch): its
            # own step count is in its config; progress counts in the demo's block steps
            own = _own_steps(run, self.block_steps)
            done += round(self.block_steps * min(int(last["step"]), own) / own)
            if int(last["step"]) < own:
                current, line = block_id_of(run), {**last, "of": own}
        return done, current, line

    def status(self) -> tuple[int, str]:
        done, current, line = self.poll()
        elapsed = time.perf_counter() - self._t0
        rate = (done - self._done0) / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {_clock((self.total - done) / rate)}" if rate > 0 else "ETA --"
        block = (f"block {current} step {line['step']}/{line['of']}, train PSNR {line['psnr_train']:.2f} dB; "
                 if line else "")
        return done, f"{block}{rate:.1f} steps/s, {eta}"

    def _run(self) -> None:
        if self.console.is_terminal:
            with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                          console=self.console, transient=False) as bar:
                task = bar.add_task("", total=self.total)
                while not self._stop.wait(1.0):
                    done, text = self.status()
                    bar.update(task, completed=done, description=text)
                done, text = self.status()
                bar.update(task, completed=done, description=text)
            return
        while not self._stop.wait(PROGRESS_LOG_EVERY_S):
            done, text = self.status()
            self.console.print(f"train: {done}/{self.total} steps, {text}", highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _render(tile: Path, data: Path, out: Path, lpips_net=None) -> dict[str, Any]:
    report = render_tile_views(tile_training.open_tile(tile), load_survey(data), ("test",), out, downscale=RENDER_DOWNSCALE,
                               lpips_weights=lpips_net)
    atomic_write_json(out / "metrics.json", report)
    seams = report.get("seams") or {}
    return {"mean": report["mean"], "seams": {k: v for k, v in seams.items() if k != "views"},
            "views": [v["name"] for v in report["views"]], "metrics": str(out / "metrics.json"),
            "lpips": report["lpips"], "heldout_points": report["heldout_points"]}


def _export(tile: Path, data: Path, out: Path) -> dict[str, Any]:
    options = ExportOptions(what=("ortho", "dsm", "semantics", "las", "ply"), gsd=EXPORT_GSD_M, survey=data)
    manifest = export_tile(tile, out, options)
    files = {kind: out / name for kind, name in manifest["files"].items()}  # names relative to out
    truth = data.parent
    scores = compare_to_ground_truth(files["dsm"], truth / "dsm.tif", files["ortho"], truth / "ortho.tif",
                                     files["semantics"], truth / "ortho_semantics.tif")
    # the checks a real survey gets (no ground truth): DSM coverage of the ground two cameras see,
    # and the DSM against held-out SfM points (the synthetic survey has none: a sentence says so)
    check = manifest.get("survey_check") or {}
    return {"files": {kind: str(path) for kind, path in files.items()}, "vs_ground_truth": scores,
            "survey_check": {"coverage": check.get("coverage"), "heldout_points": check.get("heldout_points")},
            "seconds": manifest.get("timings_s")}


def _picture(out: Path, data: Path, summary: dict[str, Any]) -> None:
    """summary.png: for the first held-out view, ground truth | render | classes | depth."""
    name = Path(summary["render"]["views"][0]).stem
    renders = out / "renders"
    tiles = [Image.open(data.parent / "images" / f"{name}.jpg").convert("RGB")]
    for kind in ("rgb", "semantics", "depth"):
        candidates = sorted(renders.glob(f"*{name}*{kind}*.png"))
        if candidates:
            tiles.append(Image.open(candidates[0]).convert("RGB"))
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h))
    for i, im in enumerate(tiles):
        sheet.paste(im.resize((w, h)), (i * w, 0))
    with atomic_path(out / "summary.png") as tmp:
        sheet.save(tmp, format="PNG")
    summary["picture"] = str(out / "summary.png")


def _print(console, summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"citygen demo — {out}")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    t = summary["timings_s"]
    ing = summary["ingest"]
    mean = summary["render"]["mean"]
    seams = summary["render"]["seams"]
    gt = summary["export"]["vs_ground_truth"]
    rows = [
        ("synthetic survey", "tiny city, EPSG:32651", t["synthetic survey"]),
        ("ingest check", f"{ing['images']} images; prior error ≤ {ing['position_error_m_max']:.3f} m, "
                         f"{ing['rotation_error_deg_max']:.3f}°", t["ingest check (EXIF/XMP pose priors)"]),
        ("partition", f"{summary['plan']['blocks']} blocks", t["partition"]),
        ("train tile", ", ".join(f"{b}: {r.get('step')} steps" for b, r in summary["train"].items()), t["train tile"]),
        ("held-out views", _fmt_mean(mean) + (f"; PSNR near block boundaries {seams['psnr_boundary']:.2f} vs "
                                              f"interior {seams['psnr_interior']:.2f} dB" if seams else "")
         + f"; depth vs held-out points: {_fmt_points(summary['render'].get('heldout_points'))}",
         t["render held-out views"]),
        ("export", f"DSM RMSE {gt['dsm']['rmse_m']:.2f} m, ortho PSNR {gt['ortho']['psnr_db']:.2f} dB"
                   + _fmt_survey_check(summary["export"].get("survey_check") or {}), t["export"]),
    ]
    for row in rows:
        table.add_row(row[0], row[1], f"{row[2]:.1f}")
    console.print(table)
    console.print(f"summary: {out / 'summary.json'}   picture: {out / 'summary.png'}")


def _fmt_points(points: dict[str, Any] | str | None) -> str:
    """Held-out SfM point figures (citygen.metrics.summarize_point_errors), or the sentence saying
    why there are none."""
    if not isinstance(points, dict):
        return str(points)
    return (f"median |error| {points['median_abs_m']:.3g} m, RMSE {points['rmse_m']:.3g} m, "
            f"{100 * points['share_within_2gsd']:.1f} % within 2 GSD")


def _fmt_survey_check(check: dict[str, Any]) -> str:
    cov = check.get("coverage")
    text = f"; DSM covers {100 * cov['share']:.1f} % of the ground 2 cameras see" if cov else ""
    return text + (f"; DSM vs held-out points: {_fmt_points(check['heldout_points'])}" if "heldout_points" in check else "")


def _fmt_mean(mean: dict[str, Any]) -> str:
    parts = []
    for key, label, unit in (("psnr", "PSNR", " dB"), ("ssim", "SSIM", ""), ("lpips", "LPIPS", ""),
                             ("pixel_accuracy", "classes", ""),
                             ("depth_mae_m", "depth MAE", " m")):
        if key in mean and mean[key] is not None:
            parts.append(f"{label} {mean[key]:.3g}{unit}")
    return ", ".join(parts)


__all__ = ["run_demo"]
