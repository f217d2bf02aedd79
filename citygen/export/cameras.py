"""Export the survey's aligned cameras as a nerfstudio ``transforms.json`` beside the other exports.

Poses stay in the tile's local frame (with its ``georef``), in nerfstudio's OpenGL
convention, as ``survey_io.write_transforms`` writes them.  ``images`` picks how the frames
reach their pictures from the export folder:

* ``"link"``: hard-link (or, across file systems, copy) the images, depth and label maps
  into ``<out>/`` under their dataset names: a self-contained dataset that
  ``survey_io.read_transforms`` and nerfstudio both load.
* ``"copy"``: the same with copies.
* ``"none"``: poses only; ``file_path`` points back into the dataset relative to ``<out>``
  (``../..``-style paths, which nerfstudio follows but ``read_transforms`` refuses).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from survey_io import Georef, Survey, read_transforms, write_transforms
from survey_io.atomic import atomic_path, atomic_write_json
from survey_io.nerfstudio import CV_TO_GL

from ..errors import CitygenError


def _place(src: Path, dst: Path, how: str) -> None:
    """Hard-link (falling back to a copy) or copy ``src`` to ``dst``, atomically."""
    if not src.is_file():
        raise CitygenError(src, "file not found (needed by the camera export)")
    if dst.exists() and os.path.samefile(src, dst):
        return
    if how == "link":
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return
        except OSError:  # another file system, or no hard links there: copy instead
            tmp.unlink(missing_ok=True)
    with atomic_path(dst, suffix=dst.suffix) as tmp:
        shutil.copyfile(src, tmp)


def select_cameras(survey: Survey, rect: tuple[float, float, float, float] | None) -> Survey:
    """The survey restricted to images whose camera centre lies over ``rect`` (local x0, y0, x1, y1)."""
    if rect is None:
        return survey
    x0, y0, x1, y1 = rect
    keep = [im for im in survey.images if x0 <= im.c2w[0, 3] <= x1 and y0 <= im.c2w[1, 3] <= y1]
    if not keep:
        raise CitygenError(survey.root, f"no camera lies over the export bounds {rect}")
    names = {im.name for im in keep}
    return replace(survey, images=keep, test_names=[n for n in survey.test_names if n in names])


def export_cameras(survey: Survey | str | Path, out_dir: str | Path, *, georef: Georef | None = None,
                   images: Literal["link", "copy", "none"] = "link",
                   rect: tuple[float, float, float, float] | None = None) -> Path:
    """Write ``<out_dir>/transforms.json`` with the survey's cameras (see the module doc).

    Args:
        survey: a :class:`Survey` or its ``transforms.json`` (or folder).
        georef: the tile's georef; the survey must be in the same frame.
        images: ``link``, ``copy`` or ``none`` (see the module doc).
        rect: keep only cameras over this local (x0, y0, x1, y1).

    Returns:
        the written ``transforms.json``.
    """
    if not isinstance(survey, Survey):
        p = Path(survey)
        survey = read_transforms(p / "transforms.json" if p.is_dir() else p)
    if georef is not None and (survey.georef.crs != georef.crs or
                               not np.allclose(survey.georef.origin, georef.origin, atol=1e-6)):
        raise CitygenError(survey.root, f"the survey's georef {survey.georef.to_dict()} is not the tile's "
                                        f"{georef.to_dict()}: cameras would land in another frame")
    if images not in ("link", "copy", "none"):
        raise CitygenError(None, f"unknown images mode {images!r} (known: link, copy, none)")
    survey = select_cameras(survey, rect)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if images == "none":
        return _write_poses_only(survey, out_dir / "transforms.json")
    root = Path(survey.root).resolve()
    moved = []
    for im in survey.images:
        _place(survey.image_path(im), out_dir / im.name, images)
        extra = {}
        for attr in ("semantics", "depth"):
            src = getattr(im, attr)
            if src is not None:
                rel = Path(src).resolve().relative_to(root)
                _place(Path(src), out_dir / rel, images)
                extra[attr] = out_dir / rel
        moved.append(replace(im, **extra))
    return write_transforms(replace(survey, root=out_dir, images=moved), out_dir / "transforms.json")


def _write_poses_only(survey: Survey, path: Path) -> Path:
    """nerfstudio JSON whose paths lead back into the dataset, relative to ``path``'s folder."""
    survey.validate(survey.root)
    base = path.parent.resolve()

    def rel(p) -> str:
        return Path(os.path.relpath(Path(p).resolve(), base)).as_posix()

    def intrinsics(cam) -> dict:
        d = {"w": cam.width, "h": cam.height, "fl_x": cam.fl_x, "fl_y": cam.fl_y, "cx": cam.cx, "cy": cam.cy,
             "camera_model": cam.camera_model}
        d.update({k: getattr(cam, k) for k in ("k1", "k2", "k3", "k4", "p1", "p2")})
        return d

    frames = []
    for im in survey.images:
        frame = {"file_path": rel(survey.image_path(im)), "transform_matrix": (np.asarray(im.c2w) @ CV_TO_GL).tolist(),
                 **intrinsics(survey.camera_of(im))}
        if im.semantics is not None:
            frame["semantics_file_path"] = rel(im.semantics)
        if im.depth is not None:
            frame["depth_file_path"] = rel(im.depth)
        frames.append(frame)
    meta = {"georef": survey.georef.to_dict(), "frames": frames}
    if survey.test_names:
        meta["test_filenames"] = [rel(survey.root / n) for n in survey.test_names]
    atomic_write_json(path, meta)
    return path
