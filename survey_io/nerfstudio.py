"""nerfstudio ``transforms.json``: read and write, in its OpenGL convention and field names.

Inside citygen poses are OpenCV camera-to-world (x right, y down, z forward); nerfstudio
stores OpenGL camera-to-world (x right, y up, z back).  The two differ by flipping the
camera's y and z axes: ``c2w_gl = c2w_cv @ diag(1, -1, -1, 1)`` (its own inverse).

citygen writes frames in the tile's local ENU frame and adds two keys nerfstudio ignores:
``georef`` (``{"crs", "origin"}``) and ``frames[].semantics_file_path``.  Held-out views go
in nerfstudio's ``test_filenames`` and, the same list, ``val_filenames``: nerfstudio's trainer
evaluates on the "val" split and refuses a file that lists splits but not that one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_json
from .errors import SurveyError
from .georef import Georef
from .survey import Camera, Survey, SurveyImage, check_pose, check_relative_path

CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])
_INTRINSIC_KEYS = ("w", "h", "fl_x", "fl_y", "cx", "cy", "camera_model", "k1", "k2", "k3", "k4", "p1", "p2")


def _camera_from(d: dict[str, Any], fallback: dict[str, Any], where: str, path: Path) -> Camera:
    merged = {**fallback, **{k: d[k] for k in _INTRINSIC_KEYS if k in d}}
    if "fl_x" in merged and "fl_y" not in merged:
        merged["fl_y"] = merged["fl_x"]
    missing = [k for k in ("w", "h", "fl_x", "fl_y") if k not in merged]
    if missing:
        raise SurveyError(path, f"{where}: missing intrinsics {missing}")
    try:
        w, h = int(merged["w"]), int(merged["h"])
        return Camera(
            width=w, height=h, fl_x=float(merged["fl_x"]), fl_y=float(merged["fl_y"]),
            cx=float(merged.get("cx", w / 2)), cy=float(merged.get("cy", h / 2)),
            camera_model=str(merged.get("camera_model", "OPENCV" if any(merged.get(k) for k in ("k1", "k2", "p1", "p2")) else "PINHOLE")),
            **{k: float(merged.get(k, 0.0)) for k in ("k1", "k2", "k3", "k4", "p1", "p2")},
        )
    except SurveyError as err:
        raise SurveyError(path, f"{where}: {err.reason}") from None
    except (TypeError, ValueError) as err:
        raise SurveyError(path, f"{where}: bad intrinsics ({err})") from None


def read_transforms(path: str | Path, georef: Georef | None = None) -> Survey:
    """Read a nerfstudio ``transforms.json`` into a :class:`Survey`.

    Args:
        path: the JSON file; image paths are relative to its folder and may not leave it.
        georef: used when the file has no ``georef`` key (a plain nerfstudio dataset has none).
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SurveyError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SurveyError(path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise SurveyError(path, "expected an object with a 'frames' list")
    if not meta["frames"]:
        raise SurveyError(path, "'frames' is empty")
    if "georef" in meta:
        try:
            georef = Georef.from_dict(meta["georef"])
        except SurveyError as err:
            raise SurveyError(path, err.reason) from None
    if georef is None:
        raise SurveyError(path, "no 'georef' in the file and none given: cannot place the survey on Earth")

    root = path.parent
    cameras: list[Camera] = []
    images: list[SurveyImage] = []
    for i, frame in enumerate(meta["frames"]):
        where = f"frames[{i}]"
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise SurveyError(path, f"{where} needs 'file_path' and 'transform_matrix'")
        name = str(frame["file_path"])
        check_relative_path(root, name, path)
        cam = _camera_from(frame, meta, f"{where} ({name})", path)
        if cam not in cameras:
            cameras.append(cam)
        try:
            c2w_gl = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise SurveyError(path, f"{where} ({name}): transform_matrix is not numeric") from None
        c2w_gl = check_pose(c2w_gl, path, what=f"{where} ({name}) transform_matrix")
        extra = {}
        for key, attr in (("semantics_file_path", "semantics"), ("depth_file_path", "depth")):
            if frame.get(key):
                extra[attr] = check_relative_path(root, str(frame[key]), path)
        images.append(SurveyImage(name=name, camera=cameras.index(cam), c2w=c2w_gl @ CV_TO_GL, **extra))

    names = {im.name for im in images}
    test = [n for n in meta.get("test_filenames", []) if n in names]
    if len(test) != len(meta.get("test_filenames", [])):
        raise SurveyError(path, "test_filenames names images that are not in 'frames'")
    return Survey(root=root, cameras=cameras, images=images, georef=georef, test_names=test).validate(path)


def write_transforms(survey: Survey, path: str | Path) -> Path:
    """Write ``survey`` as nerfstudio ``transforms.json`` (atomically).

    Image paths are written relative to ``path``'s folder, which must contain them.  The
    survey is validated first, so an invalid one never replaces an existing file.
    """
    path = Path(path)
    survey.validate(path)
    out_root = path.parent.resolve()
    shared = survey.cameras[0] if len(survey.cameras) == 1 else None

    def intrinsics(cam: Camera) -> dict[str, Any]:
        d: dict[str, Any] = {"w": cam.width, "h": cam.height, "fl_x": cam.fl_x, "fl_y": cam.fl_y,
                             "cx": cam.cx, "cy": cam.cy, "camera_model": cam.camera_model}
        for k in ("k1", "k2", "k3", "k4", "p1", "p2"):
            d[k] = getattr(cam, k)
        return d

    def rel(p: Path) -> str:
        try:
            return Path(p).resolve().relative_to(out_root).as_posix()
        except ValueError:
            raise SurveyError(path, f"{p} is outside {out_root}; write transforms.json into the dataset folder") from None

    frames = []
    for im in survey.images:
        frame: dict[str, Any] = {"file_path": rel(survey.image_path(im)),
                                 "transform_matrix": (np.asarray(im.c2w) @ CV_TO_GL).tolist()}
        if shared is None:
            frame.update(intrinsics(survey.cameras[im.camera]))
        if im.semantics is not None:
            frame["semantics_file_path"] = rel(im.semantics)
        if im.depth is not None:
            frame["depth_file_path"] = rel(im.depth)
        frames.append(frame)
    meta: dict[str, Any] = intrinsics(shared) if shared is not None else {}
    meta["georef"] = survey.georef.to_dict()
    meta["frames"] = frames
    if survey.test_names:
        # Split lists name frames by their written file_path (what read_transforms matches them
        # against), which differs from the image name when the images lie below this folder.
        path_of = {im.name: frame["file_path"] for im, frame in zip(survey.images, frames)}
        meta["test_filenames"] = [path_of[n] for n in survey.test_names]
        meta["val_filenames"] = list(meta["test_filenames"])
        meta["train_filenames"] = [path_of[im.name] for im in survey.train_images]
    atomic_write_json(path, meta)
    return path
