"""Opening the viewer on a tile folder or a baked PLY (what ``citygen view`` calls).

The command line lives in ``citygen/cli.py``; these are plain typed functions.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from citygen.bench_render import fly_path
from citygen.errors import CitygenError
from citygen.export.envelope import tile_view_levels
from citygen.store.layout import discover, trained_survey
from citygen.tile import open_tile
from survey_io import read_transforms
from survey_io.atomic import atomic_path

from .app import HeadlessViewer, SurveyView, ViewerApp
from .display import DisplayMode
from .edits import live_edits_for_tile
from .lod import LodMesh, build_lod_mesh
from .ply import read_ply
from .source import TileSource
from .window import ViewerWindow


def survey_views_from(transforms: str | Path) -> list[SurveyView]:
    """Training cameras of a survey (``transforms.json``) to jump between."""

    survey = read_transforms(transforms)
    return [SurveyView(im.name, survey.camera_of(im), im.c2w) for im in survey.train_images]


#: the neural render replaces the envelope at rest once a pass this coarse is complete
ENVELOPE_MIN_NEURAL_SCALE = 4


def envelope_model(blocks: dict) -> LodMesh:
    """The blocks' display levels (:func:`citygen.export.envelope.view_levels`: the inner shell of
    :mod:`citygen.render.envelope` decimated, tile-local metres; why the inner: that module's
    docstring), or one shell per block, as one chunked level-of-detail mesh for the GL drawer
    (:mod:`viewer.lod`)."""
    blocks = {name: levels if isinstance(levels, (list, tuple)) else [levels] for name, levels in blocks.items()}
    if not any(len(getattr(lv, "shell", lv).triangles) for levels in blocks.values() for lv in levels):
        raise CitygenError(None, "the tile's envelopes are empty (the fields are nowhere opaque)")
    return build_lod_mesh(blocks)


def open_app(target: str | Path, *, ply: str | Path | None = None, survey: str | Path | None = None,
             size: tuple[int, int] = (1280, 720), device: str = "cpu", out_dir: str | Path | None = None,
             max_cached_blocks: int = 8, layer: Literal["auto", "envelope", "neural"] = "auto") -> ViewerApp:
    """A :class:`ViewerApp` on a tile folder (neural rendering) or a ``.ply`` file (baked
    preview).  ``ply`` adds a baked model to a tile; ``survey`` a transforms.json whose
    training cameras ``n`` / ``p`` jump to (default: the survey the tile was trained on).
    A tile opens with its edit stack applied and live toggles for it (``t`` / ``c``).

    ``layer``: what draws while the camera moves over a tile.  ``envelope``: the blocks' baked
    envelopes (baked first where missing or stale, about a minute per block on a CPU), the
    neural render refining the view at rest; ``neural``: the neural render every frame (what a
    CUDA device keeps up with); ``auto``: ``neural`` on CUDA, else the envelopes already baked
    (``citygen bake-envelope TILE``), or ``neural`` with a hint when there are none."""
    target = Path(target)
    if not target.exists():
        raise CitygenError(target, "no such tile folder or PLY file")
    source, baked, georef, live = None, None, None, None
    if target.is_dir():
        renderer = open_tile(target, edited=False, device=device, max_cached_blocks=max_cached_blocks)
        live = live_edits_for_tile(renderer, target)
        source = TileSource(renderer)
        georef = source.georef
        survey = survey or trained_survey(target)
        use_envelope = layer == "envelope" or (layer == "auto" and not str(device).startswith("cuda"))
        if ply is None and use_envelope:
            envelopes = tile_view_levels(target, bake=layer == "envelope", device=device,
                                       log=lambda line: print(line, file=sys.stderr))
            if envelopes:
                baked = envelope_model(envelopes)
                missing = sorted(set(discover(target).trained) - set(envelopes))
                if missing:
                    print(f"citygen: blocks without a current envelope (not drawn while flying): "
                          f"{', '.join(missing)}; `citygen bake-envelope {target}` bakes them", file=sys.stderr)
            elif layer == "auto":
                print(f"citygen: no baked envelope in {target}: each frame is rendered neurally; "
                      f"`citygen bake-envelope {target}` bakes one to fly over", file=sys.stderr)
    elif target.suffix.lower() == ".ply":
        ply = target
    else:
        raise CitygenError(target, "the viewer opens a tile folder (with plan.json) or a .ply file")
    if ply is not None:
        model = read_ply(ply)
        georef = georef or model.georef()
        baked = model.localized(georef)
    views = survey_views_from(survey) if survey else []
    out = Path(out_dir) if out_dir else (target if target.is_dir() else target.parent)
    envelope = baked is not None and ply is None
    return ViewerApp(source, baked, size=size, georef=georef, survey_views=views, out_dir=out, live_edits=live,
                     baked_label="envelope" if envelope else "baked PLY",
                     min_neural_scale=ENVELOPE_MIN_NEURAL_SCALE if envelope else None, cull_baked=envelope)


def run_window(app: ViewerApp, title: str = "citygen viewer") -> None:
    """Open the desktop window and run until it closes."""

    win = ViewerWindow(app, title=title)
    try:
        win.run()
    finally:
        win.close()


def headless_screenshot(app: ViewerApp, path: str | Path, size: tuple[int, int] | None = None,
                        view: int | None = None, mode: str = "rgb", hud: bool = True) -> Path:
    """Render the survey view (or training camera ``view``) without a display and save a PNG."""

    hv = HeadlessViewer(app)
    try:
        if view is not None:
            app.jump_to_view(view)
        app.mode = DisplayMode(mode)
        # one full-resolution render straight through the renderer (no progressive passes)
        return app.screenshot(path, size=size or app.size, hud=hud)
    finally:
        hv.release()


def bench_view(app: ViewerApp, frames: int = 120, screenshot: str | Path | None = None, rest_jobs: int = 0,
               hud: bool = True, lod: bool = True) -> dict[str, Any]:
    """Frame times of the baked layer (``citygen bench view``): the camera flies a straight path
    over the tile (:func:`citygen.bench_render.fly_path`, 40 degrees down) and each frame is
    drawn headless (EGL; Mesa llvmpipe on a CPU) into an offscreen framebuffer of the window
    size, timed from the draw call to ``glFinish`` (the pixels a window would swap; reading them
    back is reported apart).  The frame's time is split into the host side of the draw call
    (``submit``: Python, the level-of-detail selection, the HUD's Pillow text and its upload, GL
    command submission; llvmpipe shades vertices and bins triangles here too) and the wait in
    ``glFinish`` (llvmpipe's rasteriser threads).  ``lod=False`` draws every chunk at the finest
    level unculled (the baseline).  The load average is sampled before and after: on a shared
    box the figures are only as good as it is idle.  With ``rest_jobs`` the camera then rests
    mid-path and the neural render refines that many jobs (seconds until it replaces the
    envelope reported).  ``screenshot`` saves the frame at the middle of the path as PNG (and
    ``*_rest.png``, the same view after the rest)."""
    if app.baked is None:
        raise CitygenError(None, "bench view: nothing baked to fly over (bake the envelope first)")
    load_before = os.getloadavg()
    hv = HeadlessViewer(app)
    try:
        drawer = app.drawer
        drawer.lod = lod
        lo, hi = np.asarray(app.bounds, np.float64)
        altitude = 0.25 * float(max(hi[0] - lo[0], hi[1] - lo[1]))
        path = fly_path(np.stack([lo, hi]), frames, altitude)
        app.external_motion = True
        rows, cpu = [], time.process_time()
        for i, c2w in enumerate([path[0]] * 3 + path):   # 3 warm-up frames (shader and buffer set-up)
            app.camera.set_c2w(c2w)
            app.update()
            t0 = time.perf_counter()
            app.draw(hv.target.fbo, hud=hud)
            t1 = time.perf_counter()
            hv.ctx.finish()
            t2 = time.perf_counter()
            img = hv.target.read_rgb()
            if i == 3 + len(path) // 2:
                shot = img                                # the middle of the path: the tile ahead
            if i >= 3:
                d = drawer.last_draw
                rows.append((t2 - t0, t1 - t0, t2 - t1, drawer.last_select_s, app.hud_seconds,
                             time.perf_counter() - t2, d.triangles if d else len(app.baked.faces),
                             d.chunks_culled if d else 0, d.level_chunks if d else [1]))
        cpu = time.process_time() - cpu    # every thread of the process: llvmpipe's too
        ms = np.asarray([r[:6] for r in rows]) * 1e3
        frame = ms[:, 0]
        tris = np.asarray([r[6] for r in rows])
        levels = np.sum([r[8] for r in rows], axis=0)
        lod_mesh = app.baked if isinstance(app.baked, LodMesh) else None
        result: dict[str, Any] = {
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "layer": app.layer(), "size": list(app.size), "frames": len(rows), "hud": hud, "lod": lod,
            "gl_renderer": hv.ctx.info.get("GL_RENDERER"), "lp_num_threads": os.environ.get("LP_NUM_THREADS"),
            "frame_ms_median": float(np.median(frame)), "frame_ms_p95": float(np.percentile(frame, 95)),
            "frame_ms_max": float(frame.max()),
            "fps_median": 1e3 / float(np.median(frame)), "fps_p95": 1e3 / float(np.percentile(frame, 95)),
            # where the time goes (medians, ms): submit = select + hud + the rest of the host side
            "split_ms_median": {"submit": float(np.median(ms[:, 1])), "gl_finish": float(np.median(ms[:, 2])),
                                "lod_select": float(np.median(ms[:, 3])), "hud": float(np.median(ms[:, 4])),
                                "readback": float(np.median(ms[:, 5]))},
            "triangles": int(len(app.baked.faces)) if app.baked.faces is not None else 0,
            "triangles_drawn_median": float(np.median(tris)), "triangles_drawn_max": int(tris.max()),
            "chunks_culled_median": float(np.median([r[7] for r in rows])),
            "lod_levels_used": [int(v) for v in np.atleast_1d(levels)],   # chunk-frames drawn at each level
            "cpu_ms_per_frame": 1e3 * cpu / (len(path) + 3),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "altitude_above_top_m": altitude}
        if lod_mesh is not None:
            result.update(chunks=int(len(lod_mesh.ranges)), lod_level_triangles=lod_mesh.level_triangles(),
                          lod_level_error_m=[round(float(e), 3) for e in lod_mesh.errors.max(0)],
                          lod_pixel_error=drawer.pixel_error, lod_max_triangles=drawer.max_triangles)
        if screenshot is not None:
            _save_png(shot, Path(screenshot))
            result["screenshot"] = str(screenshot)
        if rest_jobs and app.source is not None:
            app.camera.set_c2w(path[len(path) // 2])         # rest where the screenshot was taken
            app.external_motion = False
            t0, jobs, shown = time.perf_counter(), 0, None
            app.scheduler.refine_now()
            while jobs < rest_jobs:
                job = app.scheduler.next_job(app.clock(), app.camera.pose_key(), *app.size)
                if job is None:
                    if app.scheduler.done:
                        break
                    app.scheduler.refine_now()
                    continue
                app._run_job(job)
                jobs += 1
                if shown is None and not app._uses_baked():
                    shown = time.perf_counter() - t0
            rest = hv.draw()
            result["rest"] = {"jobs": jobs, "layer": app.layer(), "neural_shown_after_s": shown,
                              "seconds": time.perf_counter() - t0, "scale": app.frame_scale}
            if screenshot is not None:
                p = Path(screenshot)
                _save_png(rest, p.with_name(f"{p.stem}_rest{p.suffix}"))
        return result
    finally:
        app.external_motion = False
        hv.release()


def _save_png(img: np.ndarray, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


__all__ = ["bench_view", "envelope_model", "headless_screenshot", "open_app", "run_window", "survey_views_from"]
