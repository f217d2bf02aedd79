"""Drone folder -> georegistered survey: SfM poses aligned onto GPS in the local ENU frame.

The output folder::

    OUT/images/            the input JPEGs, hard-linked (copied across file systems), so
                           that transforms.json's paths stay inside OUT and OUT moves as one
    OUT/transforms.json    registered images, SfM intrinsics and poses in the local frame
                           (nerfstudio convention, with the georef)
    OUT/ingest_report.json registered/total, GPS residuals (horizontal, vertical), SfM error, timings
    OUT/sparse/0/          the COLMAP model (cameras, images, points3D), in the local frame
    OUT/colmap/database.db COLMAP's features and matches

Images that SfM could not register, and (by default) registered images whose SfM
position is a GPS outlier of the robust alignment, are left out of transforms.json, logged
as warnings and listed in the report (``unregistered``, ``gps_outliers``).  The GPS
residual statistics are given over all registered images (``gps_residual_m``) and over
the written ones (``gps_residual_written_m``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .align import AlignmentResult, align_similarity
from .atomic import atomic_path, atomic_write_json
from .colmap import write_georef_sidecar
from .drone import read_drone_folder
from .errors import SurveyError
from .georef import Georef
from .nerfstudio import write_transforms
from .sfm import SfmOptions, colmap_to_camera, import_pycolmap, run_sfm
from .survey import Camera, Survey, SurveyImage

log = logging.getLogger(__name__)


@dataclass
class IngestOptions:
    """Options of :func:`ingest`.

    Attributes:
        sfm: structure-from-motion options.
        vertical_weight: weight of GPS altitude residuals relative to horizontal ones in the
            alignment (consumer GPS altitude often drifts by tens of metres).
        inlier_threshold: GPS inlier threshold in metres (weighted residual); None derives
            it from the data (least median of squares).
        direction_weight: cost (metres per radian) pulling SfM viewing directions towards the
            prior ones (gimbal angles, else nadir).  It keeps the model level where GPS
            altitude drifts (the positions alone then tilt the model to follow the drift),
            and fixes the roll about the flight line when the cameras lie on one line.
        drop_gps_outliers: leave out of transforms.json (and sparse/0) the images whose SfM
            position disagrees with their GPS beyond the robust fit's inlier threshold: with
            GPS noise estimated from the data, these are mostly images SfM registered wrongly.
        seed: seed of the alignment's sampler.
    """

    sfm: SfmOptions = field(default_factory=SfmOptions)
    vertical_weight: float = 0.1
    inlier_threshold: float | None = None
    direction_weight: float = 20.0
    drop_gps_outliers: bool = True
    seed: int = 0


@dataclass
class IngestResult:
    survey: Survey
    alignment: AlignmentResult
    report: dict[str, Any]


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and src.resolve() == dst.resolve():
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, tmp)


def _write_model(reconstruction, folder: Path) -> None:
    """Write a COLMAP model folder as a whole: into a sibling temp folder, then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the model is an ordinary output
    try:
        reconstruction.write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def ingest(folder: str | Path, out: str | Path, options: IngestOptions | None = None,
           georef: Georef | None = None) -> IngestResult:
    """Run SfM on a folder of drone JPEGs and georegister it by its EXIF GPS.

    Args:
        folder: the drone images (see :func:`survey_io.drone.read_drone_folder`).
        out: output folder (created; files in it are replaced).
        options: SfM and alignment options.
        georef: the local frame; made from the GPS positions when None.

    Returns:
        The aligned survey (as written to ``out/transforms.json``), the alignment, the report.

    Raises:
        SurveyError: bad input images, or fewer than 3 images registered.
    """
    pycolmap = import_pycolmap()
    options = options or IngestOptions()
    out = Path(out)
    t_start = time.perf_counter()
    prior = read_drone_folder(folder, georef=georef)
    t_read = time.perf_counter() - t_start

    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for im in prior.images:
        _link_or_copy(prior.image_path(im), images_dir / im.name)
    staged = Survey(root=images_dir, cameras=prior.cameras, images=prior.images, georef=prior.georef)

    sfm = run_sfm(staged, out / "colmap", options.sfm)
    if len(sfm.image_ids) < 3:
        raise SurveyError(folder, f"structure from motion registered only {len(sfm.image_ids)} of "
                                  f"{len(prior.images)} images; at least 3 are needed to georegister")
    for name in sfm.unregistered:
        log.warning("%s: not registered by structure from motion; left out of transforms.json", name)

    t0 = time.perf_counter()
    registered = [im for im in prior.images if im.name in sfm.image_ids]
    sfm_c2w = np.stack([sfm.c2w(im.name) for im in registered])
    gps = np.stack([im.gps for im in registered])
    alignment = align_similarity(
        sfm_c2w[:, :3, 3], gps, vertical_weight=options.vertical_weight, threshold=options.inlier_threshold,
        seed=options.seed, src_dirs=sfm_c2w[:, :3, 2], dst_dirs=np.stack([im.c2w[:3, 2] for im in registered]),
        direction_weight=options.direction_weight)
    sim = alignment.transform
    rec = sfm.reconstruction
    rec.transform(pycolmap.Sim3d(sim.scale, pycolmap.Rotation3d(sim.rotation), sim.translation))
    keep = alignment.inliers if options.drop_gps_outliers else np.ones(len(registered), dtype=bool)
    gps_outliers = [im.name for im, k in zip(registered, keep) if not k]
    for name in gps_outliers:
        r = alignment.residuals[[im.name for im in registered].index(name)]
        log.warning("%s: SfM position is %.1f m from its GPS (inlier threshold %.1f m); left out of "
                    "transforms.json", name, float(np.linalg.norm(r)), alignment.threshold)
        rec.deregister_frame(rec.images[sfm.image_ids[name]].frame_id)
    t_align = time.perf_counter() - t0

    cameras: list[Camera] = []
    cam_of_colmap: dict[int, int] = {}
    images: list[SurveyImage] = []
    for im, c2w, k in zip(registered, sfm_c2w, keep):
        if not k:
            continue
        colmap_id = rec.images[sfm.image_ids[im.name]].camera_id
        if colmap_id not in cam_of_colmap:
            cameras.append(colmap_to_camera(rec.cameras[colmap_id]))
            cam_of_colmap[colmap_id] = len(cameras) - 1
        images.append(SurveyImage(name=im.name, camera=cam_of_colmap[colmap_id], c2w=sim.apply_to_c2w(c2w),
                                  gps=im.gps, pose_is_prior=False))
    survey = Survey(root=images_dir, cameras=cameras, images=images, georef=prior.georef).validate(folder)

    write_transforms(survey, out / "transforms.json")
    _write_model(rec, out / "sparse" / "0")
    write_georef_sidecar(out / "sparse" / "0", survey.georef)  # read_colmap finds the frame by itself
    shutil.rmtree(out / "colmap" / "models", ignore_errors=True)  # unaligned duplicates of sparse/0

    per_image = {}
    for im, r, ok in zip(registered, alignment.residuals, alignment.inliers):
        per_image[im.name] = {"residual_enu_m": [float(v) for v in r], "horizontal_m": float(np.hypot(r[0], r[1])),
                              "vertical_m": float(abs(r[2])), "inlier": bool(ok)}
    report: dict[str, Any] = {
        "input": str(Path(folder).resolve()),
        "registered": len(registered),
        "total": len(prior.images),
        "unregistered": sfm.unregistered,
        "gps_outliers": gps_outliers,
        "written": len(images),
        "num_models": sfm.num_models,
        "georef": prior.georef.to_dict(),
        "gps_residual_m": alignment.stats(),
        "gps_residual_written_m": alignment.stats(keep),
        "per_image": per_image,
        "similarity": sim.to_dict(),
        "sfm": {"mean_reprojection_error_px": sfm.mean_reprojection_error(),
                "num_points3D": int(rec.num_points3D()), "matcher": sfm.matcher,
                "cameras": [asdict(c) for c in cameras], "pycolmap_version": pycolmap.__version__},
        "options": asdict(options),
        "timings_s": {"read": t_read, **sfm.timings, "align": t_align, "total": time.perf_counter() - t_start},
    }
    atomic_write_json(out / "ingest_report.json", report)
    return IngestResult(survey=survey, alignment=alignment, report=report)
