"""Camera paths: keyframes recorded in the viewer, smooth interpolation, nerfstudio's
``camera_path.json`` format, and headless rendering of a path to PNG frames (and MP4).

File format (what ``ns-render camera-path`` reads, plus a ``citygen`` block)::

    {"camera_type": "perspective", "render_width": W, "render_height": H, "fps": 24, "seconds": 6,
     "camera_path": [{"camera_to_world": [16 floats, row-major, OpenGL c2w], "fov": deg, "aspect": W/H}, ...],
     "citygen": {"version": 1, "georef": {...}, "interpolation": "catmull-rom",
                 "keyframes": [{"camera_to_world": [...], "fov": deg, "time": s}, ...]}}

``camera_path`` holds one entry per output frame (``fps * seconds`` of them), like
nerfstudio's viewer writes; ``fov`` is vertical, in degrees.  Poses are in the tile's local
ENU frame (metres) in OpenGL convention (x right, y up, z backward), the convention of
``transforms.json``.  A path without the ``citygen`` block (e.g. from nerfstudio) is
rendered frame by frame as it stands.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from citygen.cameras import opencv_to_opengl, opengl_to_opencv
from citygen.errors import CitygenError
from survey_io.atomic import atomic_path, atomic_write_json

from .camera import intrinsics
from .display import colorize


# -- rotations -----------------------------------------------------------------------------
def quat_from_matrix(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a 3x3 rotation (Shepperd's method)."""
    R = np.asarray(R, np.float64)
    t = np.trace(R)
    if t > 0:
        s = 2.0 * math.sqrt(t + 1.0)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(max(1.0 + R[i, i] - R[j, j] - R[k, k], 1e-300))
        q = [0.0] * 4
        q[0] = (R[k, j] - R[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (R[j, i] + R[i, j]) / s
        q[1 + k] = (R[k, i] + R[i, k]) / s
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def matrix_from_quat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions along the shorter arc."""
    q0, q1 = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    d = float(np.dot(q0, q1))
    if d < 0:
        q1, d = -q1, -d
    if d > 0.9995:
        q = q0 + t * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = math.acos(d)
    return (math.sin((1 - t) * theta) * q0 + math.sin(t * theta) * q1) / math.sin(theta)


def catmull_rom(p0, p1, p2, p3, t: float) -> np.ndarray:
    """Uniform Catmull-Rom spline between p1 (t=0) and p2 (t=1)."""
    t2, t3 = t * t, t * t * t
    return 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)


# -- keyframes and paths ---------------------------------------------------------------------
@dataclass
class Keyframe:
    """A camera pose (4x4 OpenCV c2w, local frame), vertical field of view (degrees), time (s)."""

    c2w: np.ndarray
    fov: float
    time: float = 0.0


def _c2w_to_json(c2w_cv: np.ndarray) -> list[float]:
    return opencv_to_opengl(c2w_cv).reshape(-1).tolist()


def _c2w_from_json(values: Any, path: Path | None, where: str) -> np.ndarray:
    try:
        m = np.asarray(values, np.float64).reshape(4, 4)
    except (TypeError, ValueError):
        raise CitygenError(path, f"{where}: camera_to_world must be 16 numbers") from None
    if not np.all(np.isfinite(m)):
        raise CitygenError(path, f"{where}: camera_to_world is not finite")
    R = m[:3, :3]
    if abs(np.linalg.det(R) - 1.0) > 1e-3 or not np.allclose(R.T @ R, np.eye(3), atol=1e-3):
        raise CitygenError(path, f"{where}: camera_to_world has no orthonormal rotation")
    return opengl_to_opencv(m)


@dataclass
class CameraPath:
    """An editable camera path.

    Attributes:
        keyframes: recorded poses, time ascending.
        fps, seconds: output frame rate and duration.
        width, height: render resolution written to the file.
        interpolation: "catmull-rom" or "linear" for positions (rotations always slerp).
        frames: explicit per-frame poses (a path loaded from a foreign file); when set,
            they are rendered as they stand instead of interpolating keyframes.
    """

    keyframes: list[Keyframe] = field(default_factory=list)
    fps: float = 24.0
    seconds: float = 5.0
    width: int = 1920
    height: int = 1080
    interpolation: str = "catmull-rom"
    frames: list[Keyframe] | None = None
    georef: dict | None = None

    def add(self, c2w: np.ndarray, fov: float) -> Keyframe:
        """Append a keyframe; keyframe times are then spread evenly over ``seconds``."""
        self.keyframes.append(Keyframe(np.asarray(c2w, np.float64).copy(), float(fov)))
        self.frames = None
        self.retime()
        return self.keyframes[-1]

    def retime(self) -> None:
        n = len(self.keyframes)
        for i, k in enumerate(self.keyframes):
            k.time = self.seconds * i / (n - 1) if n > 1 else 0.0

    @property
    def n_frames(self) -> int:
        if self.frames is not None:
            return len(self.frames)
        return max(2, round(self.fps * self.seconds)) if len(self.keyframes) > 1 else len(self.keyframes)

    def pose_at(self, t: float) -> Keyframe:
        """The interpolated camera at time ``t`` seconds (clamped to the keyframes' span)."""
        keys = self.keyframes
        if not keys:
            raise CitygenError(None, "camera path has no keyframes")
        if len(keys) == 1 or t <= keys[0].time:
            return Keyframe(keys[0].c2w.copy(), keys[0].fov, t)
        if t >= keys[-1].time:
            return Keyframe(keys[-1].c2w.copy(), keys[-1].fov, t)
        i = int(np.searchsorted([k.time for k in keys], t, side="right")) - 1
        k1, k2 = keys[i], keys[i + 1]
        s = (t - k1.time) / max(k2.time - k1.time, 1e-12)
        p1, p2 = k1.c2w[:3, 3], k2.c2w[:3, 3]
        if self.interpolation == "linear":
            pos = (1 - s) * p1 + s * p2
        else:
            p0 = keys[i - 1].c2w[:3, 3] if i > 0 else 2 * p1 - p2
            p3 = keys[i + 2].c2w[:3, 3] if i + 2 < len(keys) else 2 * p2 - p1
            pos = catmull_rom(p0, p1, p2, p3, s)
        m = np.eye(4)
        m[:3, :3] = matrix_from_quat(slerp(quat_from_matrix(k1.c2w[:3, :3]), quat_from_matrix(k2.c2w[:3, :3]), s))
        m[:3, 3] = pos
        return Keyframe(m, (1 - s) * k1.fov + s * k2.fov, t)

    def sample(self) -> list[Keyframe]:
        """The output frames: explicit ones, or ``fps * seconds`` samples from the first to the
        last keyframe (both included)."""
        if self.frames is not None:
            return list(self.frames)
        n = self.n_frames
        if n == 1:
            return [self.pose_at(0.0)]
        t0, t1 = self.keyframes[0].time, self.keyframes[-1].time
        return [self.pose_at(t0 + (t1 - t0) * i / (n - 1)) for i in range(n)]

    # -- JSON -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        aspect = self.width / self.height
        out = {
            "camera_type": "perspective",
            "render_height": int(self.height),
            "render_width": int(self.width),
            "camera_path": [{"camera_to_world": _c2w_to_json(k.c2w), "fov": float(k.fov), "aspect": aspect}
                            for k in self.sample()],
            "fps": float(self.fps),
            "seconds": float(self.seconds),
            "smoothness_value": 0.0,
            "is_cycle": False,
        }
        if self.frames is None:
            out["citygen"] = {
                "version": 1, "interpolation": self.interpolation, "georef": self.georef,
                "frame": "tile local ENU metres; camera_to_world in OpenGL convention",
                "keyframes": [{"camera_to_world": _c2w_to_json(k.c2w), "fov": float(k.fov), "time": float(k.time)}
                              for k in self.keyframes],
            }
        return out

    def save(self, path: str | Path) -> Path:
        if not self.keyframes and not self.frames:
            raise CitygenError(path, "camera path has no keyframes to save")
        atomic_write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def from_json(cls, d: Any, path: Path | None = None) -> CameraPath:
        if not isinstance(d, dict):
            raise CitygenError(path, "camera path must be a JSON object")
        try:
            width, height = int(d["render_width"]), int(d["render_height"])
            fps, seconds = float(d.get("fps", 24.0)), float(d.get("seconds", 0.0))
            entries = d["camera_path"]
        except (KeyError, TypeError, ValueError) as err:
            raise CitygenError(path, f"not a camera path: needs render_width, render_height, camera_path ({err})") \
                from None
        if d.get("camera_type", "perspective") != "perspective":
            raise CitygenError(path, f"camera_type {d.get('camera_type')!r} is not supported (perspective only)")
        if width <= 0 or height <= 0 or not (fps > 0):
            raise CitygenError(path, "render_width, render_height and fps must be positive")

        def keyframe(e: Any, where: str, time: float) -> Keyframe:
            if not isinstance(e, dict) or "camera_to_world" not in e or "fov" not in e:
                raise CitygenError(path, f"{where}: needs camera_to_world and fov")
            fov = float(e["fov"])
            if not 0 < fov < 180:
                raise CitygenError(path, f"{where}: fov {fov} is not in (0, 180) degrees")
            return Keyframe(_c2w_from_json(e["camera_to_world"], path, where), fov, float(e.get("time", time)))

        cg = d.get("citygen")
        out = cls(fps=fps, seconds=seconds, width=width, height=height)
        if isinstance(cg, dict) and cg.get("keyframes"):
            out.interpolation = str(cg.get("interpolation", "catmull-rom"))
            if out.interpolation not in ("catmull-rom", "linear"):
                raise CitygenError(path, f"unknown interpolation {out.interpolation!r} (catmull-rom, linear)")
            out.georef = cg.get("georef")
            out.keyframes = [keyframe(e, f"citygen.keyframes[{i}]", 0.0) for i, e in enumerate(cg["keyframes"])]
            if any(b.time < a.time for a, b in zip(out.keyframes, out.keyframes[1:])):
                raise CitygenError(path, "citygen.keyframes times must be ascending")
        else:
            if not isinstance(entries, list) or not entries:
                raise CitygenError(path, "camera_path is empty")
            dt = 1.0 / fps
            out.frames = [keyframe(e, f"camera_path[{i}]", i * dt) for i, e in enumerate(entries)]
            out.keyframes = list(out.frames)
        return out

    @classmethod
    def load(cls, path: str | Path) -> CameraPath:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except OSError as err:
            raise CitygenError(path, f"cannot read camera path ({err.strerror or err})") from None
        except ValueError as err:
            raise CitygenError(path, f"not valid JSON ({err})") from None
        return cls.from_json(d, path)


# -- headless rendering of a path -------------------------------------------------------------
def render_camera_path(renderer, path_json: str | Path, out_dir: str | Path, resolution: tuple[int, int] | None = None,
                       mode: str = "rgb", video: bool = True, progress: bool = True) -> dict[str, Any]:
    """Render every frame of a ``camera_path.json`` through ``renderer`` (a TileRenderer, or
    anything with its ``render_view``) into ``out_dir/frame_00000.png``...; with ``video``
    also ``out_dir/path.mp4`` when ffmpeg (imageio-ffmpeg or an ``ffmpeg`` on PATH) exists.

    Args:
        resolution: (width, height) of the frames; default the file's render size.  The
            vertical field of view is kept, so another aspect ratio widens or narrows the view.
        mode: "rgb", "depth" or "semantics" (the viewer's display modes).

    Returns a summary: frames, out_dir, video path (or None) and a message.
    """
    path = CameraPath.load(path_json)
    width, height = resolution or (path.width, path.height)
    if width <= 0 or height <= 0:
        raise CitygenError(path_json, f"resolution must be positive, got {width}x{height}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = path.sample()
    written = []
    for i, key in enumerate(frames):
        camera = intrinsics(width, height, key.fov)
        out = renderer.render_view(camera, key.c2w)
        img = colorize(out, mode)
        target = out_dir / f"frame_{i:05d}.png"
        with atomic_path(target, suffix=".png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        written.append(target)
        if progress:
            print(f"\rrendered frame {i + 1}/{len(frames)}", end="", flush=True)
    if progress:
        print()
    video_path, message = None, f"{len(written)} PNG frames in {out_dir}"
    if video:
        video_path, note = _encode_mp4(written, out_dir / "path.mp4", path.fps)
        message += f"; {note}"
    summary = {"frames": len(written), "out_dir": str(out_dir), "resolution": [width, height],
               "video": None if video_path is None else str(video_path), "message": message}
    atomic_write_json(out_dir / "render_path.json", summary)
    return summary


def _ffmpeg_exe() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


def _encode_mp4(frames: list[Path], target: Path, fps: float) -> tuple[Path | None, str]:
    exe = _ffmpeg_exe()
    if exe is None:
        return None, "no MP4: ffmpeg not found (pip install imageio-ffmpeg); PNG frames only"
    with atomic_path(target, suffix=".mp4") as tmp:
        cmd = [exe, "-y", "-loglevel", "error", "-framerate", f"{fps:g}", "-i", str(frames[0].parent / "frame_%05d.png"),
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise CitygenError(target, f"ffmpeg failed: {res.stderr.strip()[:300]}")
    return target, f"video {target}"
