"""The viewer's camera: a fly camera over a local ENU scene, with an orbit mode.

Pure numpy, no GL: the pose is a position plus heading / pitch / roll, and everything the
renderer needs (an OpenCV camera-to-world, pinhole intrinsics for a window size) is derived
from it.  Angles are in degrees:

- ``yaw``: heading, clockwise from grid north (+Y) towards east (+X);
- ``pitch``: elevation of the optical axis above the horizon (-90 looks straight down);
- ``roll``: rotation about the optical axis (0 keeps the image's x axis horizontal).

The right vector depends on ``yaw`` only, so a nadir view (pitch -90) is as well defined as
any other: there is no gimbal lock to avoid, and pitch spans the closed range [-90, 90].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from survey_io import Camera


def _basis(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """3x3 rotation, OpenCV camera axes (x right, y down, z forward) as columns in ENU."""
    y, p = math.radians(yaw), math.radians(pitch)
    forward = np.array([math.sin(y) * math.cos(p), math.cos(y) * math.cos(p), math.sin(p)])
    right = np.array([math.cos(y), -math.sin(y), 0.0])
    down = np.cross(forward, right)
    if roll:
        r = math.radians(roll)
        # rotating the image plane by +roll about the optical axis (clockwise as seen on screen)
        right, down = math.cos(r) * right + math.sin(r) * down, -math.sin(r) * right + math.cos(r) * down
    return np.stack([right, down, forward], axis=1)


def angles_from_rotation(R: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of an OpenCV camera-to-world rotation; inverse of the
    camera's convention (exact for any rotation; at nadir/zenith the roll is folded into yaw)."""
    R = np.asarray(R, np.float64)
    right, forward = R[:, 0], R[:, 2]
    pitch = math.degrees(math.asin(float(np.clip(forward[2], -1.0, 1.0))))
    horizontal = math.hypot(forward[0], forward[1])
    if horizontal > 1e-9:
        yaw = math.degrees(math.atan2(forward[0], forward[1]))
    else:  # looking straight up or down: take the heading from the right vector (roll = 0)
        yaw = math.degrees(math.atan2(-right[1], right[0]))
    base = _basis(yaw, pitch)
    # roll: angle from the unrolled right vector to the actual one, about the forward axis
    roll = math.degrees(math.atan2(float(np.dot(right, base[:, 1])), float(np.dot(right, base[:, 0]))))
    return yaw, pitch, roll


def intrinsics(width: int, height: int, fov_y_deg: float) -> Camera:
    """A centred pinhole camera for a ``width`` x ``height`` image with vertical field of view
    ``fov_y_deg`` (square pixels; the principal point at the image centre)."""
    focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2.0)
    return Camera(width=int(width), height=int(height), fl_x=focal, fl_y=focal, cx=width / 2.0, cy=height / 2.0)


def fov_from_focal(focal: float, size: int) -> float:
    """Field of view (degrees) of ``size`` pixels seen with focal length ``focal`` pixels."""
    return math.degrees(2.0 * math.atan(0.5 * size / focal))


@dataclass
class FlyCamera:
    """A free-flying camera in the local ENU frame (metres).

    Attributes:
        position: camera centre, local ENU.
        yaw, pitch, roll: orientation, degrees (see the module docstring).
        fov_y: vertical field of view, degrees.
        speed: translation speed, metres per second (scaled to the scene by :meth:`fit_scene`).
        orbit_target: the point orbited in orbit mode, else None (fly mode).
    """

    position: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    fov_y: float = 50.0
    speed: float = 10.0
    orbit_target: np.ndarray | None = None

    MIN_FOV = 5.0
    MAX_FOV = 120.0

    def __post_init__(self) -> None:
        self.position = np.asarray(self.position, np.float64).copy()

    # -- derived quantities ---------------------------------------------------------------
    @property
    def rotation(self) -> np.ndarray:
        return _basis(self.yaw, self.pitch, self.roll)

    @property
    def forward(self) -> np.ndarray:
        return self.rotation[:, 2]

    @property
    def right(self) -> np.ndarray:
        return self.rotation[:, 0]

    @property
    def heading(self) -> float:
        """Compass heading of the view, degrees in [0, 360) clockwise from grid north."""
        return self.yaw % 360.0

    def c2w(self) -> np.ndarray:
        """4x4 float64 camera-to-world, OpenCV convention, local ENU frame."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.position
        return m

    def intrinsics(self, width: int, height: int) -> Camera:
        return intrinsics(width, height, self.fov_y)

    def copy(self) -> FlyCamera:
        return FlyCamera(self.position.copy(), self.yaw, self.pitch, self.roll, self.fov_y, self.speed,
                         None if self.orbit_target is None else self.orbit_target.copy())

    def pose_key(self) -> tuple:
        """Hashable summary of everything that changes the rendered image."""
        return (*np.round(self.position, 9).tolist(), round(self.yaw, 9), round(self.pitch, 9),
                round(self.roll, 9), round(self.fov_y, 9))

    # -- setting the pose -------------------------------------------------------------------
    def set_c2w(self, c2w: np.ndarray) -> None:
        """Take the pose of an OpenCV camera-to-world (leaves orbit mode)."""
        c2w = np.asarray(c2w, np.float64)
        self.position = c2w[:3, 3].copy()
        self.yaw, self.pitch, self.roll = angles_from_rotation(c2w[:3, :3])
        self.orbit_target = None

    def look_at(self, target: np.ndarray) -> None:
        """Turn (keeping the position, roll 0) to look at ``target``."""
        d = np.asarray(target, np.float64) - self.position
        n = float(np.linalg.norm(d))
        if n == 0.0:
            return
        d /= n
        self.pitch = math.degrees(math.asin(float(np.clip(d[2], -1.0, 1.0))))
        if math.hypot(d[0], d[1]) > 1e-9:
            self.yaw = math.degrees(math.atan2(d[0], d[1]))
        self.roll = 0.0

    def fit_scene(self, bounds: np.ndarray, speed_fraction: float = 0.1) -> None:
        """Scale the speed to the scene: ``speed_fraction`` of the bounds' diagonal per second."""
        diag = float(np.linalg.norm(np.asarray(bounds)[1] - np.asarray(bounds)[0]))
        self.speed = max(diag * speed_fraction, 1e-3)

    def frame_bounds(self, bounds: np.ndarray, aspect: float = 16 / 9, yaw: float = 0.0, pitch: float = -50.0) -> None:
        """The survey view: look at the centre of ``bounds`` (2x3 local min/max) from heading
        ``yaw`` at ``pitch``, far enough back for its bounding sphere to fill the view."""
        lo, hi = np.asarray(bounds, np.float64)
        centre = (lo + hi) / 2.0
        radius = 0.5 * float(np.linalg.norm(hi - lo))
        half_v = math.radians(self.fov_y) / 2.0
        half_h = math.atan(math.tan(half_v) * aspect)
        dist = radius / math.sin(min(half_v, half_h))
        self.yaw, self.pitch, self.roll = yaw, pitch, 0.0
        self.position = centre - self.forward * dist
        self.orbit_target = None

    # -- motion ------------------------------------------------------------------------
    def move(self, forward: float = 0.0, right: float = 0.0, up: float = 0.0) -> None:
        """Translate by metres along the view direction, the image's right and world up
        (leaves orbit mode)."""
        R = self.rotation
        self.position = self.position + forward * R[:, 2] + right * R[:, 0] + up * np.array([0.0, 0.0, 1.0])
        self.orbit_target = None

    def turn(self, d_yaw: float, d_pitch: float) -> None:
        """Mouse-look: change heading and pitch (degrees); pitch is clamped to [-90, 90].
        In orbit mode the camera swings around the target at a constant distance instead."""
        if self.orbit_target is not None:
            dist = float(np.linalg.norm(self.position - self.orbit_target))
            self.yaw += d_yaw
            self.pitch = float(np.clip(self.pitch + d_pitch, -90.0, 90.0))
            self.position = self.orbit_target - self.forward * dist
            return
        self.yaw += d_yaw
        self.pitch = float(np.clip(self.pitch + d_pitch, -90.0, 90.0))

    def start_orbit(self, target: np.ndarray) -> None:
        """Orbit around ``target``: turn to face it; later turns swing around it."""
        self.look_at(target)
        self.orbit_target = np.asarray(target, np.float64).copy()

    def zoom(self, factor: float) -> None:
        """Orbit mode: scale the distance to the target by ``factor``."""
        if self.orbit_target is None:
            return
        self.position = self.orbit_target + (self.position - self.orbit_target) * factor
