"""A tiny analytic aerial scene for the field/render/train tests: a checkered ground plane
with a few coloured boxes, ray-cast exactly in numpy (RGB, z-depth, labels), seen by a ring
of downward-looking drone cameras; written as a citygen transforms.json survey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from survey_io import Camera, Georef, Survey, SurveyImage, write_transforms

# (min xyz, max xyz, rgb, label): label 2 = building, 3 = vegetation, 5 = vehicle
BOXES = [
    ((-12.0, -10.0, 0.0), (-4.0, -2.0, 10.0), (0.85, 0.30, 0.25), 2),
    ((3.0, 2.0, 0.0), (11.0, 12.0, 6.0), (0.25, 0.45, 0.85), 2),
    ((4.0, -12.0, 0.0), (8.0, -8.0, 3.0), (0.20, 0.70, 0.25), 3),
]
GROUND_COLORS = ((0.55, 0.50, 0.42), (0.35, 0.35, 0.38))  # ground (label 0) / road (label 1) stripes


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world looking from ``eye`` at ``target`` (x right, y down, z forward)."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-6:
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, eye
    return m


def box_entry_exit(origins: np.ndarray, dirs: np.ndarray, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Slab test: the ray parameters (N,) where rays enter and leave the box [lo, hi]
    (a ray misses it where entry > exit)."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        t0, t1 = (lo - origins) / dirs, (hi - origins) / dirs
    return np.nanmax(np.minimum(t0, t1), axis=1), np.nanmin(np.maximum(t0, t1), axis=1)


def cast(origins: np.ndarray, dirs: np.ndarray):
    """Nearest hit of rays (N, 3) with the ground z = 0 and the boxes: (t, rgb, label)."""
    n = len(origins)
    t_best = np.full(n, np.inf)
    rgb = np.zeros((n, 3))
    label = np.full(n, 255, np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 2] < 0, -origins[:, 2] / dirs[:, 2], np.inf)
    hit = t_ground < t_best
    p = origins + t_ground[:, None] * dirs
    stripe = (np.floor(p[:, 0] / 5.0).astype(int) % 3 == 0)
    t_best[hit] = t_ground[hit]
    rgb[hit] = np.where(stripe[hit, None], GROUND_COLORS[1], GROUND_COLORS[0])
    label[hit] = np.where(stripe[hit], 1, 0)
    for lo, hi, color, lab in BOXES:
        tn, tf = box_entry_exit(origins, dirs, lo, hi)
        h = (tf >= tn) & (tn > 0) & (tn < t_best)
        t_best[h] = tn[h]
        q = origins[h] + tn[h, None] * dirs[h]
        shade = np.where(np.abs(q[:, 2] - hi[2]) < 1e-6, 1.0, 0.7)   # lit roof, darker walls
        rgb[h] = np.asarray(color) * shade[:, None]
        label[h] = lab
    return t_best, rgb, label


def make_box_survey(root: Path, n_train: int = 16, n_test: int = 2, width: int = 48, height: int = 36,
                    altitude: float = 40.0) -> Path:
    """Write the scene's survey into ``root``; returns its transforms.json."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cam = Camera(width=width, height=height, fl_x=0.9 * width, fl_y=0.9 * width, cx=width / 2, cy=height / 2)
    images = []
    n = n_train + n_test
    for k in range(n):
        a = 2 * np.pi * (k + 0.5 * (k >= n_train)) / n_train
        radius = 12.0 + 6.0 * (k % 2)
        eye = (radius * np.cos(a), radius * np.sin(a), altitude - 5.0 * (k % 3))
        c2w = look_at(eye, (0.3 * eye[0], 0.3 * eye[1], 0.0))
        j, i = np.mgrid[0:height, 0:width]
        d_cam = np.stack([(i + 0.5 - cam.cx) / cam.fl_x, (j + 0.5 - cam.cy) / cam.fl_y, np.ones_like(i, float)], -1)
        d_cam = d_cam.reshape(-1, 3) / np.linalg.norm(d_cam.reshape(-1, 3), axis=-1, keepdims=True)
        dirs = d_cam @ c2w[:3, :3].T
        t, rgb, label = cast(np.broadcast_to(c2w[:3, 3], dirs.shape).copy(), dirs)
        depth = (t * d_cam[:, 2]).reshape(height, width).astype(np.float32)
        name = f"images/view_{k:02d}.png"
        Image.fromarray((rgb.reshape(height, width, 3) * 255).round().astype(np.uint8)).save(root / name)
        Image.fromarray(label.reshape(height, width)).save(root / f"images/view_{k:02d}_sem.png")
        np.save(root / f"images/view_{k:02d}_depth.npy", depth)
        images.append(SurveyImage(name=name, camera=0, c2w=c2w, semantics=root / f"images/view_{k:02d}_sem.png",
                                  depth=root / f"images/view_{k:02d}_depth.npy"))
    survey = Survey(root=root, cameras=[cam], images=images, georef=Georef("EPSG:32633", (500000.0, 4500000.0, 0.0)),
                    test_names=[im.name for im in images[n_train:]])
    return write_transforms(survey, root / "transforms.json")
