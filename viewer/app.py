"""The viewer application: state, input actions, progressive rendering and drawing.

:class:`ViewerApp` knows nothing of windows: a window (``viewer.window``) or the headless
driver (:class:`HeadlessViewer`) feeds it input events and the time, and it draws into
whatever framebuffer it is given.  It shows a neural tile (through a
:class:`~viewer.source.TileSource`), a baked model drawn natively by GL (a PLY preview, or the
tile's envelope: ``viewer.launch``), or both: the baked model while the camera moves, the neural
render refining the view at rest (the HUD names the layer on screen).

Keys (besides the camera's W/A/S/D/Q/E, Shift, drag and scroll):

    1 / 2 / 3   display mode: RGB / depth / semantic classes
    b           block boundaries overlay          h   HUD on/off
    r           reset to the survey view           n / p   next / previous training camera
    m           measuring tool (click two points)  right click   orbit around the clicked point
    k           add a camera-path keyframe         x   clear the keyframes
    l           play the camera path               j   save the camera path (JSON)
    t           tile's edits on / off              c   next style (none, named, the tile's)
    f           screenshot (PNG)                   escape   quit
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from citygen.errors import CitygenError
from survey_io import Camera, Georef
from survey_io.atomic import atomic_path

from .camera import FlyCamera, fov_from_focal
from .camera_path import CameraPath
from .colormap import depth_range
from .controls import Controls
from .display import DisplayMode, Frame, block_outlines, plan_ground_height
from .gl import Drawer, Offscreen, create_headless_context, linearize_depth
from .hud import HudInfo, Overlay, hud_overlays
from .measure import Measurement, Pick, ground_sample_distance, pick
from .ply import PlyModel
from .scheduler import RenderJob, RenderScheduler

BLOCK_LINE_COLOR = (1.0, 0.85, 0.1, 1.0)
MEASURE_LINE_COLOR = (1.0, 0.2, 0.9, 1.0)
#: while flying the HUD's text is refreshed at most this often (10 Hz: readable, and Pillow's
#: text and the texture upload are not paid every frame)
HUD_REFRESH_S = 0.1
MODE_KEYS = {"1": DisplayMode.RGB, "2": DisplayMode.DEPTH, "3": DisplayMode.SEMANTICS}


@dataclass
class SurveyView:
    """A training camera to jump to."""

    name: str
    camera: Camera
    c2w: np.ndarray


class ViewerApp:
    """Viewer state and behaviour.

    Args:
        source: a :class:`~viewer.source.TileSource` (neural tile), or None.
        baked: a baked model drawn natively (a PLY preview, or the tile's envelope), or None.
            One of the two is needed; with both, ``baked`` draws while the camera moves and the
            tile's neural render refines the view when it rests.
        baked_label: what the HUD calls the baked layer ("envelope", "baked PLY").
        min_neural_scale: with both layers, the baked one stays on screen at rest until a
            neural pass at this scale or finer is complete (a 1/32 neural frame looks worse
            than the envelope); None: the first neural pass replaces it.
        cull_baked: the baked mesh is closed and oriented (the envelope): skip back faces.
        size: window size (width, height) in pixels.
        georef: the tile's georeferencing (default: the source's).
        survey_views: training cameras for jumping (``n`` / ``p``).
        edit_state: text for the HUD's edit/style line, or a function returning it.
        live_edits: the edit/style toggles of the tile (:class:`~viewer.edits.LiveEdits`),
            switched by ``t`` / ``c``; they then give the HUD's edit line.
        out_dir: where screenshots and camera paths are saved.
        clock: time source (seconds); tests pass a fake one.
    """

    def __init__(self, source=None, baked: PlyModel | None = None, size: tuple[int, int] = (1280, 720),
                 georef: Georef | None = None, survey_views: list[SurveyView] | None = None,
                 edit_state: str | Callable[[], str] = "", out_dir: str | Path = ".",
                 clock: Callable[[], float] = time.perf_counter, scheduler: RenderScheduler | None = None,
                 live_edits=None, baked_label: str = "baked PLY", min_neural_scale: int | None = None,
                 cull_baked: bool = False):
        if source is None and baked is None:
            raise CitygenError(None, "the viewer needs a tile or a baked PLY to show")
        self.source, self.baked = source, baked
        self.baked_label = baked_label
        self.min_neural_scale = min_neural_scale
        self.cull_baked = cull_baked
        #: a driver moves the camera (benchmarks, scripted fly-throughs): the baked layer draws
        self.external_motion = False
        self._neural_view: tuple | None = None   # view whose neural pass reached min_neural_scale
        self.size = (int(size[0]), int(size[1]))
        self.georef = georef or (source.georef if source is not None else None)
        self.classes = source.classes if source is not None and source.classes else ()
        self.bounds = source.bounds if source is not None else baked.bounds
        self.plan = source.plan if source is not None else None
        self.survey_views = survey_views or []
        self.edit_state = edit_state
        self.live_edits = live_edits
        self.out_dir = Path(out_dir)
        self.clock = clock
        self.scheduler = scheduler or RenderScheduler()

        self.camera = FlyCamera()
        self.camera.fit_scene(self.bounds)
        self.controls = Controls(self.camera)
        self.mode = DisplayMode.RGB
        self.show_blocks = False
        self.show_hud = True
        self.measuring = False
        self.measurement = Measurement()
        self.last_pick: Pick | None = None
        self.message = ""
        self.path = CameraPath(width=self.size[0], height=self.size[1],
                               georef=self.georef.to_dict() if self.georef else None)
        self.path_file = self.out_dir / "camera_path.json"
        self._playing_since: float | None = None
        self._view_index = -1
        self.quit_requested = False

        self.frame: Frame | None = None          # what is on screen (neural), at the pass resolution
        self.frame_scale: int | None = None
        self.near_far = (1.0, 2.0)               # depth colour range of the depth mode
        self._pass: Frame | None = None          # the pass being refined
        self._frame_dirty = False
        self._cursor: tuple[float, float] | None = None
        self._last_update: float | None = None
        self._fps: float | None = None
        self.overlays: list[Overlay] = []        # HUD panels of the last draw (window rects)
        self.drawer = None
        self.hud_seconds = 0.0
        self._hud_key: tuple | None = None
        self._hud_time = 0.0
        self.reset_view()

    # -- GL ----------------------------------------------------------------------------------
    def attach_gl(self, ctx) -> None:
        """Create the GL resources on ``ctx`` (call once the context exists)."""
        self.drawer = Drawer(ctx)
        if self.baked is not None:
            self.drawer.set_mesh(self.baked, cull_back=self.cull_baked)

    @property
    def window_camera(self) -> Camera:
        return self.camera.intrinsics(*self.size)

    def clip_range(self, c2w: np.ndarray | None = None) -> tuple[float, float]:
        """GL near/far planes that hold the whole tile from the camera."""
        pos = (self.camera.c2w() if c2w is None else c2w)[:3, 3]
        lo, hi = self.bounds
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        far = float(np.linalg.norm(corners - pos, axis=1).max()) * 1.5 + 1.0
        return max(far * 1e-4, 1e-3), far

    # -- camera actions -------------------------------------------------------------------
    def reset_view(self) -> None:
        """The survey overview: the tile's bounds framed from the south."""
        self.camera.frame_bounds(self.bounds, aspect=self.size[0] / self.size[1])

    def jump_to_view(self, index: int) -> SurveyView | None:
        """Take the pose and field of view of training camera ``index`` (wraps around)."""
        if not self.survey_views:
            self.message = "no training cameras loaded"
            return None
        self._view_index = index % len(self.survey_views)
        view = self.survey_views[self._view_index]
        self.camera.set_c2w(view.c2w)
        self.camera.fov_y = fov_from_focal(view.camera.fl_y, view.camera.height)
        self.message = f"camera {self._view_index + 1}/{len(self.survey_views)}: {view.name}"
        return view

    def resize(self, width: int, height: int) -> None:
        self.size = (max(1, int(width)), max(1, int(height)))

    # -- input ----------------------------------------------------------------------------
    def key_down(self, key: str) -> None:
        """A key was pressed (names: lower-case letters, digits, 'shift', 'escape', ...)."""
        key = key.lower()
        self.controls.key_down(key)
        if key in MODE_KEYS:
            self.mode = MODE_KEYS[key]
        elif key == "b":
            self.show_blocks = not self.show_blocks
            if self.show_blocks and self.plan is None:
                self.message = "no block plan in this tile"
        elif key == "h":
            self.show_hud = not self.show_hud
        elif key == "r":
            self.reset_view()
        elif key == "n":
            self.jump_to_view(self._view_index + 1)
        elif key == "p":
            self.jump_to_view(self._view_index - 1)
        elif key == "m":
            self.measuring = not self.measuring
            self.measurement.clear()
            self.message = "measuring: click two points" if self.measuring else ""
        elif key == "k":
            self.path.add(self.camera.c2w(), self.camera.fov_y)
            self.message = f"keyframe {len(self.path.keyframes)} added"
        elif key == "x":
            self.path = CameraPath(width=self.size[0], height=self.size[1], georef=self.path.georef)
            self.message = "keyframes cleared"
        elif key == "l":
            self.play_path()
        elif key == "j":
            self.save_path()
        elif key == "t":
            self.toggle_edits()
        elif key == "c":
            self.next_style(-1 if "shift" in self.controls.held else 1)
        elif key == "f":
            self.screenshot()
        elif key == "escape":
            self.quit_requested = True

    def key_up(self, key: str) -> None:
        self.controls.key_up(key)

    def mouse_down(self, x: float, y: float, button: str = "left") -> None:
        self.controls.mouse_down(x, y, button)

    def mouse_move(self, x: float, y: float) -> None:
        self._cursor = (x, y)
        self.controls.mouse_move(x, y)

    def mouse_up(self, x: float, y: float, button: str = "left") -> None:
        self.controls.mouse_up(x, y, button)

    def scroll(self, notches: float) -> None:
        self.controls.scroll(notches)

    # -- picking and measuring ---------------------------------------------------------------
    def pick_at(self, x: float, y: float) -> Pick | None:
        """The 3D point under window position (x, y), from the current depth."""
        frame = self.depth_frame()
        if frame is None:
            return None
        return pick(frame, self.window_camera, self.camera.c2w(), x, y, self.georef, self.classes)

    def depth_frame(self) -> Frame | None:
        """Depth of the current view: the neural frame, or the baked model's depth buffer when
        that is what is on screen (flying over the envelope)."""
        if self.source is not None and not self._uses_baked():
            return self.frame
        if self.drawer is None:
            return None
        off = Offscreen(self.drawer.ctx, self.size)
        off.fbo.use()
        off.fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
        near, far = self.clip_range()
        self.drawer.draw_mesh(self.window_camera, self.camera.c2w(), near, far, self.mode, self.near_far)
        depth = linearize_depth(off.read_depth(), near, far).astype(np.float32)
        off.release()
        return Frame(np.zeros(depth.shape + (3,), np.float32), depth, (depth > 0).astype(np.float32), None)

    def click(self, x: float, y: float, button: str = "left") -> Pick | None:
        """A click: right = orbit around the point; left = show it (and measure)."""
        p = self.pick_at(x, y)
        if p is None:
            self.message = "nothing under the cursor"
            return None
        if button == "right":
            self.camera.start_orbit(p.local)
            self.message = "orbit: drag to swing, scroll to zoom, W/A/S/D to fly again"
            return p
        self.last_pick = p
        if self.measuring:
            self.measurement.add(p.local)
        return p

    # -- edits and styles ----------------------------------------------------------------------
    def toggle_edits(self) -> bool | None:
        """The tile's edit stack on/off; the view is rendered again.  None without toggles."""
        if self.live_edits is None:
            self.message = "no edit stack to toggle (a tile folder has one)"
            return None
        on = self.live_edits.toggle_edits()
        self._scene_changed(f"edits {'on' if on else 'off'}")
        return on

    def next_style(self, step: int = 1):
        """Next (``step`` -1: previous) style of the cycle; the view is rendered again."""
        if self.live_edits is None:
            self.message = "no styles here (a tile folder has them)"
            return None
        style = self.live_edits.next_style(step)
        self._scene_changed(f"style {style.name}")
        return style

    def _scene_changed(self, message: str) -> None:
        self.message = message
        self.scheduler.invalidate()  # a fresh coarse pass at once, refined as usual

    # -- camera paths ----------------------------------------------------------------------------
    def play_path(self) -> None:
        if len(self.path.keyframes) < 2:
            self.message = "add at least two keyframes (k) to play a path"
            return
        self._playing_since = self.clock()

    def save_path(self, path: str | Path | None = None) -> Path | None:
        target = Path(path) if path else self.path_file
        if not self.path.keyframes:
            self.message = "no keyframes to save"
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path.save(target)
        self.message = f"camera path saved: {target}"
        return target

    # -- the frame loop --------------------------------------------------------------------------
    def update(self) -> bool:
        """Advance one display frame: input, path playback, clicks, rendering work.
        True when something new is to be drawn."""
        now = self.clock()
        dt = 0.0 if self._last_update is None else now - self._last_update
        if dt > 0:
            self._fps = 1.0 / dt if self._fps is None else 0.9 * self._fps + 0.1 / dt
        self._last_update = now
        self.controls.update(min(dt, 0.25))
        if self._playing_since is not None:
            t = now - self._playing_since
            key = self.path.pose_at(self.path.keyframes[0].time + t)
            self.camera.set_c2w(key.c2w)
            self.camera.fov_y = key.fov
            if t >= self.path.keyframes[-1].time - self.path.keyframes[0].time:
                self._playing_since = None
        for c in self.controls.take_clicks():
            self.click(c.x, c.y, c.button)
        return self._render_step(now)

    @property
    def in_motion(self) -> bool:
        """The camera is being moved (input, a playing camera path, or a driver)."""
        return self.controls.moving or self._playing_since is not None or self.external_motion

    def _view_key(self) -> tuple:
        return self.camera.pose_key(), self.size

    def _uses_baked(self) -> bool:
        """Draw the baked model now: it is all there is, or the camera moves and a neural
        frame could not keep up (the tile is rendered again once the camera rests), or the
        neural passes of this view are still coarser than ``min_neural_scale``."""
        if self.baked is None:
            return False
        if self.source is None or self.in_motion or self.frame is None:
            return True
        return self.min_neural_scale is not None and self._neural_view != self._view_key()

    def layer(self) -> str:
        """What the HUD says is on screen: the baked layer while flying, then the neural render
        as it refines ("neural (refining k%)", k the share of the rays rendered) and when done."""
        if self.source is None or (self.baked is not None and self.in_motion):
            return self.baked_label
        if self.scheduler.done:
            return "neural"
        return f"neural (refining {int(100 * self.scheduler.progress)}%)"

    def _render_step(self, now: float) -> bool:
        if self.source is not None and self.baked is not None and self.in_motion:
            return True  # fly over the baked model; refine the neural view when resting
        if self.source is None:
            lo, hi = self.bounds
            dist = float(np.linalg.norm((lo + hi) / 2 - self.camera.position))
            radius = 0.5 * float(np.linalg.norm(hi - lo))
            self.near_far = (max(dist - radius, radius * 0.05), dist + radius)
            return True
        job = self.scheduler.next_job(now, self.camera.pose_key(), *self.size)
        if job is None:
            return False
        self._run_job(job)
        return True

    def _run_job(self, job: RenderJob) -> None:
        cam = self.camera.intrinsics(job.width, job.height)
        c2w = self.camera.c2w()
        t0 = time.perf_counter()
        if job.row0 == 0 and job.row1 == job.height:
            band = self.source.render_view(cam, c2w)
        else:
            band = self.source.render_band(cam, c2w, job.row0, job.row1)
        self.scheduler.report(job, time.perf_counter() - t0)
        if job.new_pass:
            if self.frame is not None and job.row1 < job.height and self.frame_scale is not None:
                # refine over the previous, coarser pass so the view never goes blank
                self._pass = self.frame.resized_nearest(job.width, job.height)
            else:
                self._pass = Frame.empty(job.width, job.height)
        self._pass.paste_rows(job.row0, band)
        self.frame, self.frame_scale = self._pass, job.scale
        if job.row1 >= job.height and self.min_neural_scale is not None and job.scale <= self.min_neural_scale:
            self._neural_view = self._view_key()
        if job.row1 >= job.height:
            self.near_far = depth_range(self.frame.depth, self.frame.acc)
        elif job.new_pass and job.scale == self.scheduler.interactive_scale(*self.size):
            self.near_far = depth_range(band.depth, band.acc)
        self._frame_dirty = True

    def settle(self, max_jobs: int = 1000) -> None:
        """Render until the current view is complete at full resolution (headless use)."""
        if self.source is None:
            self._render_step(self.clock())
            return
        for _ in range(max_jobs):
            job = self.scheduler.next_job(self.clock(), self.camera.pose_key(), *self.size)
            if job is None:
                if self.scheduler.done:
                    return
                self.scheduler.refine_now()  # a headless caller wants the final view, no resting delay
                continue
            self._run_job(job)

    # -- drawing ----------------------------------------------------------------------------------
    def hud_info(self) -> HudInfo:
        lines = []
        if self.last_pick is not None:
            lines.append(self.last_pick.describe(f"EPSG:{self.georef.epsg}" if self.georef and self.georef.epsg
                                                 else "CRS"))
        if self.measuring or self.measurement.points:
            lines.append(self.measurement.describe() or "measure: click the first point")
        if self.path.keyframes:
            lines.append(f"path: {len(self.path.keyframes)} keyframes")
        if self.message:
            lines.append(self.message)
        gsd = None
        frame = self.frame if self.source is not None else None
        if self._cursor is not None and frame is not None:
            h, w = frame.depth.shape
            i = int(np.clip(self._cursor[0] * w / self.size[0], 0, w - 1))
            j = int(np.clip(self._cursor[1] * h / self.size[1], 0, h - 1))
            if frame.depth[j, i] > 0:
                gsd = ground_sample_distance(self.window_camera, float(frame.depth[j, i]))
        if self.live_edits is not None:
            edit = self.live_edits.describe()
        else:
            edit = self.edit_state() if callable(self.edit_state) else self.edit_state
        scale = self.frame_scale if self.source is not None and not self._uses_baked() else None
        return HudInfo(self.camera.position, self.camera.heading, self.camera.pitch, self.georef, self._fps,
                       self.mode.value, scale, gsd, edit, self.layer(), lines)

    def draw(self, fbo, size: tuple[int, int] | None = None, frame: Frame | None = None, hud: bool | None = None,
             near_far: tuple[float, float] | None = None) -> None:
        """Draw the current view into ``fbo`` (the window's screen or an offscreen buffer).

        ``size`` defaults to the window size; ``frame`` to the current neural frame.
        """
        if self.drawer is None:
            raise CitygenError(None, "attach_gl() must be called before drawing")
        size = size or self.size
        fbo.use()
        fbo.viewport = (0, 0, *size)
        fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
        camera = self.camera.intrinsics(*size)
        c2w = self.camera.c2w()
        near, far = self.clip_range()
        near_far = near_far or self.near_far
        if frame is None and self._uses_baked():
            self.drawer.draw_mesh(camera, c2w, near, far, self.mode, near_far)
        elif self.source is not None:
            frame = frame or self.frame
            if frame is not None:
                if frame is not self.frame or self._frame_dirty:
                    self.drawer.upload_frame(frame)
                    self._frame_dirty = frame is not self.frame
                self.drawer.draw_frame(size, self.mode, near_far)
        if self.show_blocks and self.plan is not None:
            segs = block_outlines(self.plan, plan_ground_height(self.plan, self.bounds))
            self.drawer.draw_lines(segs, camera, c2w, near, far, BLOCK_LINE_COLOR)
        if self.measurement.points:
            pts = self.measurement.points
            segs = np.array([[pts[0], pts[-1]]]) if len(pts) == 2 else np.array([[pts[0], pts[0] + [0, 0, 1e-3]]])
            self.drawer.draw_lines(segs, camera, c2w, near, far, MEASURE_LINE_COLOR)
        t0 = time.perf_counter()
        if self.show_hud if hud is None else hud:
            # while the camera moves the text changes every frame: it is rasterised (Pillow) and
            # uploaded at most every HUD_REFRESH_S, the panels drawn again in between
            now, key = self.clock(), (size, self.mode)
            if key != self._hud_key or not self.in_motion or not now - self._hud_time < HUD_REFRESH_S:
                self.overlays = hud_overlays(self.hud_info(), size, self.classes,
                                             legend=self.mode is DisplayMode.SEMANTICS)
                self._hud_key, self._hud_time = key, now
                self.drawer.draw_overlays(self.overlays, size)
            else:
                self.drawer.draw_overlays(None, size)
        else:
            self.overlays, self._hud_key = [], None
        self.hud_seconds = time.perf_counter() - t0   # the HUD's share of the frame (bench view)

    # -- screenshots -------------------------------------------------------------------------------
    def render_image(self, size: tuple[int, int] | None = None, hud: bool = False) -> np.ndarray:
        """(H, W, 3) uint8 of the current view at ``size`` (default the window size), at full
        resolution: a neural tile is re-rendered through the renderer at that size."""
        if self.drawer is None:
            raise CitygenError(None, "attach_gl() must be called before rendering images")
        size = (int(size[0]), int(size[1])) if size else self.size
        frame, near_far = None, None
        if self.source is not None:
            if size == self.size and self.scheduler.done and self.frame is not None:
                frame = self.frame
            else:
                frame = self.source.render_view(self.camera.intrinsics(*size), self.camera.c2w())
            near_far = depth_range(frame.depth, frame.acc)
        off = Offscreen(self.drawer.ctx, size)
        try:
            self.draw(off.fbo, size, frame=frame, hud=hud, near_far=near_far)
            return off.read_rgb()
        finally:
            off.release()

    def screenshot(self, path: str | Path | None = None, size: tuple[int, int] | None = None,
                   hud: bool = True) -> Path:
        """Save the current view as PNG (at the window size or any other size)."""
        if path is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / time.strftime("citygen_%Y%m%d_%H%M%S.png")
        path = Path(path)
        img = self.render_image(size, hud=hud)
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        self.message = f"screenshot: {path}"
        return path


class HeadlessViewer:
    """A viewer without a window: an EGL context and an offscreen framebuffer of the window
    size, driven by explicit calls (tests, servers, scripted screenshots)."""

    def __init__(self, app: ViewerApp, ctx=None):
        self.app = app
        self._owns_ctx = ctx is None
        self.ctx = ctx or create_headless_context()
        app.attach_gl(self.ctx)
        self.target = Offscreen(self.ctx, app.size)

    def frame(self) -> np.ndarray:
        """One display frame (input, a render job, drawing); returns the window's pixels."""
        self.app.update()
        return self.draw()

    def draw(self) -> np.ndarray:
        if self.target.size != self.app.size:
            self.target.release()
            self.target = Offscreen(self.ctx, self.app.size)
        self.app.draw(self.target.fbo)
        return self.target.read_rgb()

    def settle(self) -> np.ndarray:
        """Render the view to full resolution, draw it, return the pixels."""
        self.app.settle()
        return self.draw()

    def release(self) -> None:
        self.target.release()
        if self._owns_ctx:
            self.ctx.release()
