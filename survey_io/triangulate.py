"""Points for a posed survey that has none: features, matches and triangulation with the poses fixed.

A survey with poses but no SfM points (a ``transforms.json`` from a nerfstudio pipeline or
``citygen synth`` without depth maps, an aerotriangulation export without tie points) would
otherwise get its field boxes from camera heights and no sparse depth supervision nor held-out
points.  :func:`triangulate_survey` runs the coarse pass of every aerotriangulation tool
(:func:`survey_io.sfm.triangulate_known_poses`) and writes what ``citygen ingest`` writes, so
every consumer (field boxes, sparse depth, the held-out point check) reads it unchanged::

    OUT/sparse/0/              the COLMAP model (the survey's cameras and poses, the points with
                               their reprojection errors and tracks), local frame, georef.json
    OUT/points3D_heldout.npz   the fixed evaluation tenth (:func:`survey_io.ingest.heldout_point_mask`)
    OUT/triangulate_report.json  points, errors, matcher, timings

OUT is the survey's folder by default (a BlocksExchange XML needs an OUT).  Another OUT becomes a survey folder of its own: the
images (and label/depth maps) hard-linked (copied across file systems) under their names, and
``transforms.json`` rewritten with the same cameras, poses and held-out views -- consumers find
the model beside ``transforms.json``.  The model folder is written whole (temp folder, rename)
after the held-out points, so an interrupted run leaves no ``sparse/0`` and is simply rerun.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_json
from .blocks_exchange import read_blocks_exchange
from .errors import SurveyError
from .ingest import HELDOUT_POINTS_FILE, SPARSE_MODEL, link_or_copy, write_heldout_points, write_model
from .nerfstudio import read_transforms, write_transforms
from .sfm import SfmOptions, import_pycolmap, triangulate_known_poses
from .survey import Survey

REPORT_FILE = "triangulate_report.json"


def survey_transforms(survey: str | Path) -> Path:
    """The ``transforms.json`` of a survey given as the file or its folder."""
    path = Path(survey)
    return path / "transforms.json" if path.is_dir() else path


def has_points(folder: str | Path) -> bool:
    """Whether a survey folder already has an SfM model (``sparse/0``)."""
    return (Path(folder) / SPARSE_MODEL).is_dir()


def needs_coarse_pass(survey: str | Path) -> bool:
    """Whether a ``transforms.json`` survey (the file or its folder) has neither depth maps (on
    every image) nor points (``sparse/0``): then ``citygen train``, ``train-tile`` and ``plan``
    run :func:`triangulate_survey` on it once (the points are kept in the survey's folder, so
    later runs find them), instead of guessing heights from the cameras.  Raises SurveyError
    for a bad survey or missing image files, as training would, before any pass starts."""
    path = survey_transforms(survey)
    if path.suffix.lower() != ".json" or has_points(path.parent):
        return False
    data = read_transforms(path).check_image_files()
    return bool(data.images) and not all(im.depth is not None for im in data.images)


def _relocated(survey: Survey, out: Path) -> Survey:
    """``survey`` with its files linked under ``out`` (same relative names) and ``out`` as root."""
    root = survey.root.resolve()

    def move(path: Path) -> Path:
        rel = Path(path).resolve().relative_to(root)
        link_or_copy(Path(path), out / rel)
        return out / rel

    images = []
    for im in survey.images:
        move(survey.image_path(im))
        images.append(replace(im, semantics=im.semantics and move(im.semantics), depth=im.depth and move(im.depth)))
    moved = replace(survey, root=out, images=images)
    write_transforms(moved, out / "transforms.json")
    return moved


def triangulate_survey(survey: str | Path, out: str | Path | None = None, force: bool = False,
                       options: SfmOptions | None = None) -> dict[str, Any]:
    """Triangulate the points of a posed survey with its poses held fixed; return the report.

    Args:
        survey: the survey's ``transforms.json`` (or its folder), or a BlocksExchange XML
            (then ``out`` is required and becomes a ``transforms.json`` survey).
        out: where to write (module doc); the survey's folder when None.
        force: replace an existing ``OUT/sparse/0``.
        options: feature and matching options (:class:`survey_io.sfm.SfmOptions`).

    Raises:
        SurveyError: a bad survey, OUT already has points (without ``force``), a camera model
            COLMAP cannot hold, or no point triangulated.
    """
    pycolmap = import_pycolmap()
    t_start = time.perf_counter()
    path = survey_transforms(survey)
    if path.suffix.lower() == ".xml":  # an aerotriangulation export: OUT becomes its transforms.json survey
        if out is None:
            raise SurveyError(path, "a BlocksExchange survey needs --out (a folder for its transforms.json survey)")
        data = read_blocks_exchange(path)
    else:
        data = read_transforms(path)
    data.check_image_files()
    out = Path(out) if out is not None else path.parent
    if has_points(out) and not force:
        raise SurveyError(out / SPARSE_MODEL, "the survey already has points; pass --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != data.root.resolve():
        data = _relocated(data, out)

    # COLMAP's database is scratch: it lives in a temp folder beside the outputs, gone afterwards.
    work = Path(tempfile.mkdtemp(prefix=".triangulate.", dir=out))
    try:
        result = triangulate_known_poses(data, work / "colmap", options)
        rec = result.reconstruction
        heldout = write_heldout_points(rec, out / HELDOUT_POINTS_FILE)
        write_model(rec, out / SPARSE_MODEL, data.georef)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    errors = np.array([p.error for p in rec.points3D.values()])
    tracks = np.array([p.track.length() for p in rec.points3D.values()])
    seen = sum(1 for i in rec.reg_image_ids() if rec.images[i].num_points3D > 0)
    report = {
        "input": str(path.resolve()),
        "out": str(out.resolve()),
        "images": len(data.images),
        "images_with_points": int(seen),
        "num_points3D": int(rec.num_points3D()),
        "mean_reprojection_error_px": float(rec.compute_mean_reprojection_error()),
        "median_reprojection_error_px": float(np.median(errors)),
        "median_track_length": float(np.median(tracks)),
        "height_percentiles_m": {str(q): float(v) for q, v in zip(
            (1, 50, 99), np.percentile([p.xyz[2] for p in rec.points3D.values()], (1, 50, 99)))},
        "matcher": result.matcher,
        "held_out_points": heldout,
        "options": asdict(options or SfmOptions()),
        "pycolmap_version": pycolmap.__version__,
        "timings_s": {**result.timings, "total": time.perf_counter() - t_start},
    }
    atomic_write_json(out / REPORT_FILE, report)
    return report
