"""Opening the viewer on a tile folder or a baked PLY (what ``citygen view`` calls).

The command line lives in ``citygen/cli.py``; these are plain typed functions.
"""

from __future__ import annotations

from pathlib import Path

from citygen.errors import CitygenError
from citygen.store.layout import trained_survey
from citygen.tile import open_tile
from survey_io import read_transforms

from .app import HeadlessViewer, SurveyView, ViewerApp
from .display import DisplayMode
from .edits import live_edits_for_tile
from .ply import read_ply
from .source import TileSource
from .window import ViewerWindow


def survey_views_from(transforms: str | Path) -> list[SurveyView]:
    """Training cameras of a survey (``transforms.json``) to jump between."""

    survey = read_transforms(transforms)
    return [SurveyView(im.name, survey.camera_of(im), im.c2w) for im in survey.train_images]


def open_app(target: str | Path, *, ply: str | Path | None = None, survey: str | Path | None = None,
             size: tuple[int, int] = (1280, 720), device: str = "cpu", out_dir: str | Path | None = None,
             max_cached_blocks: int = 8) -> ViewerApp:
    """A :class:`ViewerApp` on a tile folder (neural rendering) or a ``.ply`` file (baked
    preview).  ``ply`` adds a baked model to a tile; ``survey`` a transforms.json whose
    training cameras ``n`` / ``p`` jump to (default: the survey the tile was trained on).
    A tile opens with its edit stack applied and live toggles for it (``t`` / ``c``)."""
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
    return ViewerApp(source, baked, size=size, georef=georef, survey_views=views, out_dir=out, live_edits=live)


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


__all__ = ["headless_screenshot", "open_app", "run_window", "survey_views_from"]
