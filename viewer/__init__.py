"""Desktop viewer on moderngl: fly camera, display modes (RGB, depth, classes), block
overlay, measuring, camera paths, screenshots; a glfw window or headless (EGL).

Layers, each usable alone: ``camera`` / ``controls`` (pose and input, numpy only),
``scheduler`` (progressive rendering decisions), ``display`` / ``colormap`` / ``hud`` /
``measure`` / ``camera_path`` / ``ply`` (host-side data), ``gl`` (moderngl drawing),
``edits`` (live edit and style toggles of a tile, imported on use: it needs the engine),
``app`` (the application state and frame loop), ``window`` (glfw) and ``launch``
(what ``citygen view`` calls).  Nothing outside this package imports it.
"""

from .app import HeadlessViewer, SurveyView, ViewerApp
from .camera import FlyCamera
from .camera_path import CameraPath, Keyframe, render_camera_path
from .controls import Controls
from .display import DisplayMode, Frame, colorize
from .ply import PlyModel, read_ply
from .scheduler import RenderJob, RenderScheduler
from .source import TileSource

__all__ = ["CameraPath", "Controls", "DisplayMode", "FlyCamera", "Frame", "HeadlessViewer", "Keyframe", "PlyModel",
           "RenderJob", "RenderScheduler", "SurveyView", "TileSource", "ViewerApp", "colorize", "read_ply",
           "render_camera_path"]
