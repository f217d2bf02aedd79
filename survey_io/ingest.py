"""Drone folder -> georegistered survey: SfM poses aligned onto GPS in the local ENU frame.

The output folder::

    OUT/images/            the input JPEGs, hard-linked (copied across file systems), so
                           that transforms.json's paths stay inside OUT and OUT moves as one
    OUT/transforms.json    registered images, SfM intrinsics and poses in the local frame
                           (nerfstudio convention, with the georef)
    OUT/ingest_report.json registered/total (and why each unregistered image is missing), GPS
                           residuals (horizontal, vertical), the GPS time lag, the focal length
                           used and its source, held-out views and points, SfM error, timings
    OUT/points3D_heldout.npz  a fixed tenth of the SfM points (local frame) with their
                           reprojection error, track length and observations, for evaluation
    OUT/sparse/0/          the COLMAP model (cameras, images, points3D), in the local frame
    OUT/colmap/database.db COLMAP's features and matches

Images that SfM could not register, and (by default) registered images whose SfM
position is a GPS outlier of the robust alignment, are left out of transforms.json, logged
as warnings and listed in the report (``unregistered``, ``gps_outliers``).  The GPS
residual statistics are given over all registered images (``gps_residual_m``) and over
the written ones (``gps_residual_written_m``).

Focal length: the EXIF value (focal-plane resolution, 35 mm equivalent, DJI calibration) is a
prior that bundle adjustment keeps fixed unless the viewing directions spread enough to make
focal length observable (:func:`focal_is_observable`): a nadir-only flight at constant height
cannot tell a longer focal length from a deeper scene, and self-calibration there drifts
(measured on a real DJI survey: 673 px against 556 px from EXIF, ground 9 m too deep).  The
spread is taken from the gimbal XMP when every image has it, else from the SfM poses of a
fixed-focal run, followed by one global bundle adjustment with the focal length free when
they spread enough.  An image set without any EXIF focal length is always self-calibrated.

Held-out views: every 8th written image in name order (nerfstudio's interval rule) goes into
``test_filenames``/``val_filenames``, so that training reports held-out PSNR.

Held-out points: the SfM points whose id hashes to 0 mod 10 (:func:`heldout_point_mask`).
They stay in ``sparse/0`` (training does not read SfM points) and are copied into
``points3D_heldout.npz`` for depth/DSM checks against rendered depth.

Local frame height: without a given georef or DJI take-off altitudes, the frame's origin height
is moved to the median SfM point height (the ground), so that local z ~ 0 is the ground as
everywhere else in citygen (the origin height is otherwise 0 and the ground at GPS altitude).

GPS time lag: consumer cameras often tag a frame with a stale fix.  The shift k (frames in
capture order; image i takes the fix recorded with frame i+k, extrapolated linearly past the
ends) minimising the median horizontal alignment residual is applied when it lowers that
median by at least :data:`LAG_MIN_GAIN` (:func:`estimate_gps_lag`); both are reported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .align import AlignmentResult, Similarity, align_similarity
from .atomic import atomic_path, atomic_write_json
from .colmap import write_georef_sidecar
from .drone import capture_order, read_drone_folder_metadata
from .errors import SurveyError
from .exif import ImageMetadata
from .georef import Georef
from .nerfstudio import write_transforms
from .sfm import SfmOptions, colmap_to_camera, import_pycolmap, refine_focal_length, run_sfm
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
        holdout_every: every n-th written image (name order, from the first) is held out for
            evaluation; 0 holds out none.
        max_gps_lag_frames: largest GPS time lag (frames, either sign) tried; 0 turns the
            estimate off.
        focal: "auto" (fixed EXIF prior unless observable, see the module doc), "fixed", "refine".
    """

    sfm: SfmOptions = field(default_factory=SfmOptions)
    vertical_weight: float = 0.1
    inlier_threshold: float | None = None
    direction_weight: float = 20.0
    drop_gps_outliers: bool = True
    seed: int = 0
    holdout_every: int = 8
    max_gps_lag_frames: int = 3
    focal: str = "auto"

    def __post_init__(self) -> None:
        if self.focal not in ("auto", "fixed", "refine"):
            raise SurveyError(None, f"focal mode {self.focal!r} is not one of auto, fixed, refine")
        if self.holdout_every < 0 or self.max_gps_lag_frames < 0:
            raise SurveyError(None, "holdout_every and max_gps_lag_frames must be >= 0")


@dataclass
class IngestResult:
    survey: Survey
    alignment: AlignmentResult
    report: dict[str, Any]


#: Focal length is treated as observable when the 90th percentile of the angle between the
#: cameras' optical axes and their mean axis reaches this (degrees): obliques looking from
#: several sides, or crossed oblique strips.  Nadir flights stay within a few degrees.
FOCAL_OBSERVABLE_SPREAD_DEG = 15.0

#: Where a prior focal length came from (survey_io.exif's focal_source), as reported.
FOCAL_SOURCES = {"focal_plane_resolution": "exif focal-plane resolution",
                 "35mm_equivalent": "exif 35mm-equivalent",
                 "dji_calibrated": "dji xmp calibrated focal length",
                 "sensor_table": "exif focal length + sensor-width table",
                 "": "default guess (1.2 x long side)"}

#: A GPS lag is applied only when it lowers the median horizontal residual by this fraction.
LAG_MIN_GAIN = 0.2

#: One SfM point in this many is held out for evaluation.
HELDOUT_POINT_MODULUS = 10


def view_spread_deg(directions: np.ndarray) -> float:
    """90th percentile of the angle (degrees) between unit optical axes (N, 3) and their mean axis."""
    d = np.asarray(directions, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    mean = d.mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-9:  # axes cancel out (views from all around): as spread as it gets
        return 180.0
    cos = np.clip(d @ (mean / norm), -1.0, 1.0)
    return float(np.percentile(np.degrees(np.arccos(cos)), 90))


def focal_is_observable(directions: np.ndarray) -> bool:
    """Whether viewing directions spread enough for bundle adjustment to separate focal length from depth."""
    return view_spread_deg(directions) >= FOCAL_OBSERVABLE_SPREAD_DEG


def holdout_names(names: list[str], every: int = 8) -> list[str]:
    """Every ``every``-th name in sorted order, starting with the first (nerfstudio's "interval" split)."""
    if every <= 0:
        return []
    return [n for i, n in enumerate(sorted(names)) if i % every == 0]


#: where ingest (and ``citygen triangulate``) put the COLMAP model and the held-out points, relative
#: to the survey folder: every consumer looks for them there.
SPARSE_MODEL = "sparse/0"
HELDOUT_POINTS_FILE = "points3D_heldout.npz"


def heldout_point_mask(point_ids: np.ndarray, modulus: int = HELDOUT_POINT_MODULUS) -> np.ndarray:
    """Points held out for evaluation: a multiplicative hash (Knuth's 2654435761) of the id is 0 mod ``modulus``.

    Ids are COLMAP's (deterministic for a seed); the hash decorrelates them from the order of
    triangulation, so the held-out tenth is spread over the scene.
    """
    ids = np.asarray(point_ids, dtype=np.uint64)
    h = (ids * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return (h % np.uint64(modulus)) == 0


def shifted_track(track: np.ndarray, shift: int) -> np.ndarray:
    """Positions (N, 3) in capture order moved ``shift`` frames: out[i] = track[i + shift], linearly
    extrapolated from the two nearest fixes past either end."""
    track = np.asarray(track, dtype=np.float64)
    n = len(track)
    idx = np.arange(n) + shift
    out = np.empty_like(track)
    for i, j in enumerate(idx):
        if 0 <= j < n or n < 2:
            out[i] = track[min(max(j, 0), n - 1)]
        elif j >= n:
            out[i] = track[-1] + (j - (n - 1)) * (track[-1] - track[-2])
        else:
            out[i] = track[0] + j * (track[1] - track[0])
    return out


@dataclass
class LagEstimate:
    """Result of :func:`estimate_gps_lag`.

    Attributes:
        frames: the applied shift (0 when none was applied).
        best_frames: the shift with the lowest residual, applied or not.
        applied: whether ``best_frames`` cleared the :data:`LAG_MIN_GAIN` margin.
        per_shift: shift -> {"median_horizontal_m", "rmse_horizontal_m"} of the alignment with it.
    """

    frames: int
    best_frames: int
    applied: bool
    per_shift: dict[int, dict[str, float]]


def estimate_gps_lag(src: np.ndarray, gps_track: np.ndarray, ranks: np.ndarray, max_frames: int,
                     align, min_gain: float = LAG_MIN_GAIN) -> LagEstimate:
    """The constant camera-to-GPS lag (in frames) minimising the alignment residual.

    Args:
        src: (M, 3) SfM camera centres of the registered images.
        gps_track: (N, 3) GPS positions of all images in capture order.
        ranks: (M,) capture rank of each registered image (index into ``gps_track``).
        max_frames: shifts -max..max are tried.
        align: ``align(src, dst) -> AlignmentResult`` with the ingest's alignment options.
        min_gain: fractional reduction of the median horizontal residual needed to apply a shift.
    """
    per_shift: dict[int, dict[str, float]] = {}
    for k in range(-max_frames, max_frames + 1):
        if max_frames and len(gps_track) < 3:
            break
        fit = align(src, shifted_track(gps_track, k)[ranks])
        h = fit.horizontal
        per_shift[k] = {"median_horizontal_m": float(np.median(h)), "rmse_horizontal_m": float(np.sqrt(np.mean(h**2)))}
    if not per_shift:
        return LagEstimate(0, 0, False, {})
    best = min(per_shift, key=lambda k: (per_shift[k]["median_horizontal_m"], abs(k)))
    applied = best != 0 and (per_shift[best]["median_horizontal_m"]
                             <= (1.0 - min_gain) * per_shift[0]["median_horizontal_m"])
    return LagEstimate(best if applied else 0, best, applied, per_shift)


def _seconds_per_frame(metas: list[ImageMetadata], order: np.ndarray) -> float | None:
    """Mean capture interval from DateTimeOriginal (first to last), None when the times do not parse."""

    try:
        times = [datetime.strptime(metas[i].datetime, "%Y:%m:%d %H:%M:%S") for i in order]
    except ValueError:
        return None
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (times[-1] - times[0]).total_seconds() / (len(times) - 1)


def write_heldout_points(rec, path: Path) -> dict[str, Any]:
    """Write the held-out tenth of ``rec``'s points (local frame) with their observations; return a summary."""
    ids = np.array(sorted(int(i) for i in rec.points3D), dtype=np.int64)
    keep = ids[heldout_point_mask(ids)] if len(ids) else ids
    names = sorted({rec.images[int(i)].name for i in rec.reg_image_ids()})
    name_index = {n: k for k, n in enumerate(names)}
    xyz, rgb, err, tlen, obs_p, obs_i, obs_xy = [], [], [], [], [], [], []
    for k, pid in enumerate(keep):
        p = rec.points3D[int(pid)]
        xyz.append(p.xyz)
        rgb.append(p.color)
        err.append(p.error)
        elements = p.track.elements
        tlen.append(len(elements))
        for el in elements:
            image = rec.images[el.image_id]
            obs_p.append(k)
            obs_i.append(name_index[image.name])
            obs_xy.append(image.points2D[el.point2D_idx].xy)
    arrays = {
        "point3D_id": keep.astype(np.int64),
        "xyz": np.asarray(xyz, dtype=np.float64).reshape(-1, 3),
        "rgb": np.asarray(rgb, dtype=np.uint8).reshape(-1, 3),
        "error_px": np.asarray(err, dtype=np.float64),
        "track_length": np.asarray(tlen, dtype=np.int32),
        "image_names": np.asarray(names, dtype=str),
        "obs_point": np.asarray(obs_p, dtype=np.int64),
        "obs_image": np.asarray(obs_i, dtype=np.int64),
        "obs_xy": np.asarray(obs_xy, dtype=np.float64).reshape(-1, 2),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return {"file": path.name, "num_points": int(len(keep)), "of": int(len(ids)),
            "rule": f"COLMAP point id * 2654435761 mod 2^32 == 0 mod {HELDOUT_POINT_MODULUS}",
            "median_error_px": float(np.median(arrays["error_px"])) if len(keep) else None,
            "median_track_length": float(np.median(arrays["track_length"])) if len(keep) else None}


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and src.resolve() == dst.resolve():
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, tmp)


def write_model(reconstruction, folder: Path, georef: Georef | None = None) -> None:
    """Write a COLMAP model folder as a whole (with ``georef``'s sidecar, see
    :func:`survey_io.colmap.write_georef_sidecar`): into a sibling temp folder, then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the model is an ordinary output
    try:
        reconstruction.write(tmp)
        if georef is not None:
            write_georef_sidecar(tmp, georef)  # read_colmap finds the frame by itself
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
    prior, metas = read_drone_folder_metadata(folder, georef=georef)
    t_read = time.perf_counter() - t_start

    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for im in prior.images:
        link_or_copy(prior.image_path(im), images_dir / im.name)
    staged = Survey(root=images_dir, cameras=prior.cameras, images=prior.images, georef=prior.georef)

    # Focal length: a fixed EXIF prior unless the views make it observable (module doc).
    first_meta = [next(m for im, m in zip(prior.images, metas) if im.camera == k) for k in range(len(prior.cameras))]
    has_exif_focal = all(m.focal_px is not None for m in first_meta)
    spread, spread_from = None, None
    if options.focal != "auto":
        refine, rule = options.focal == "refine", f"forced by the focal option ({options.focal})"
    elif not has_exif_focal:
        refine, rule = True, "no focal length in EXIF: self-calibrated by SfM"
    elif all(m.has_gimbal for m in metas):
        spread, spread_from = view_spread_deg(np.stack([im.c2w[:3, 2] for im in prior.images])), "gimbal xmp"
        refine = spread >= FOCAL_OBSERVABLE_SPREAD_DEG
        rule = None
    else:
        refine, rule = False, None  # decided on the SfM poses below
    sfm_options = replace(options.sfm, refine_focal_length=refine)
    sfm = run_sfm(staged, out / "colmap", sfm_options)
    if len(sfm.image_ids) < 3:
        raise SurveyError(folder, f"structure from motion registered only {len(sfm.image_ids)} of "
                                  f"{len(prior.images)} images; at least 3 are needed to georegister")
    rec = sfm.reconstruction
    if options.focal == "auto" and has_exif_focal and spread_from is None:
        spread = view_spread_deg(np.stack([sfm.c2w(n)[:3, 2] for n in sfm.image_ids]))
        spread_from = "sfm poses"
        if spread >= FOCAL_OBSERVABLE_SPREAD_DEG:
            refine_focal_length(rec, options.sfm.num_threads)
            refine = True
    if rule is None:
        rule = (f"90th percentile of the optical axes' angle to their mean ({spread_from}): {spread:.1f} deg "
                f"{'>=' if refine else '<'} {FOCAL_OBSERVABLE_SPREAD_DEG:g} deg: focal length "
                f"{'observable, refined' if refine else 'not observable (nadir-only), EXIF prior kept fixed'}")
    for name in sfm.unregistered:
        log.warning("%s: not registered by structure from motion (%s); left out of transforms.json",
                    name, sfm.unregistered_reasons.get(name, "unknown"))

    t0 = time.perf_counter()
    registered = [im for im in prior.images if im.name in sfm.image_ids]
    sfm_c2w = np.stack([sfm.c2w(im.name) for im in registered])

    def align(src: np.ndarray, dst: np.ndarray) -> AlignmentResult:
        return align_similarity(
            src, dst, vertical_weight=options.vertical_weight, threshold=options.inlier_threshold,
            seed=options.seed, src_dirs=sfm_c2w[:, :3, 2], dst_dirs=np.stack([im.c2w[:3, 2] for im in registered]),
            direction_weight=options.direction_weight)

    # GPS time lag, in frames of capture order (module doc).
    order = capture_order(metas)
    rank_of = {prior.images[i].name: r for r, i in enumerate(order)}
    track = np.stack([prior.images[i].gps for i in order])
    ranks = np.array([rank_of[im.name] for im in registered])
    lag = estimate_gps_lag(sfm_c2w[:, :3, 3], track, ranks, options.max_gps_lag_frames, align)
    corrected = shifted_track(track, lag.frames)
    gps_of = {prior.images[i].name: corrected[r] for r, i in enumerate(order)}
    fix_from = {}
    for r, i in enumerate(order):
        j = r + lag.frames
        fix_from[prior.images[i].name] = prior.images[order[j]].name if 0 <= j < len(order) else "extrapolated"
    if lag.applied:
        log.warning("GPS lags the camera by %+d frame(s): median horizontal residual %.1f m -> %.1f m; corrected",
                    lag.frames, lag.per_shift[0]["median_horizontal_m"], lag.per_shift[lag.frames]["median_horizontal_m"])
    gps = np.stack([gps_of[im.name] for im in registered])
    alignment = align(sfm_c2w[:, :3, 3], gps)
    sim = alignment.transform
    rec.transform(pycolmap.Sim3d(sim.scale, pycolmap.Rotation3d(sim.rotation), sim.translation))
    keep = alignment.inliers if options.drop_gps_outliers else np.ones(len(registered), dtype=bool)
    gps_outliers = [im.name for im, k in zip(registered, keep) if not k]
    for name in gps_outliers:
        r = alignment.residuals[[im.name for im in registered].index(name)]
        log.warning("%s: SfM position is %.1f m from its GPS (inlier threshold %.1f m); left out of "
                    "transforms.json", name, float(np.linalg.norm(r)), alignment.threshold)
        rec.deregister_frame(rec.images[sfm.image_ids[name]].frame_id)
    # Height of the local frame: with neither a given georef nor DJI take-off altitudes, the
    # frame's origin height is 0 and local z is the raw GPS altitude (ground hundreds of metres
    # up), while citygen places the ground at z ~ 0 (the take-off height), e.g. in train's scene
    # box.  Move the origin height to the median SfM point: the ground, for an aerial survey.
    frame_georef, ground_shift = prior.georef, 0.0
    has_takeoff = any("AbsoluteAltitude" in m.dji and "RelativeAltitude" in m.dji for m in metas)
    if georef is None and not has_takeoff and rec.num_points3D() > 0:
        ground_shift = float(np.median([p.xyz[2] for p in rec.points3D.values()]))
        rec.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(np.eye(3)), np.array([0.0, 0.0, -ground_shift])))
        sim = Similarity(sim.scale, sim.rotation, sim.translation - np.array([0.0, 0.0, ground_shift]))
        gps_of = {n: g - np.array([0.0, 0.0, ground_shift]) for n, g in gps_of.items()}
        e, n_, h = prior.georef.origin
        frame_georef = Georef(prior.georef.crs, (e, n_, h + ground_shift))
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
                                  gps=gps_of[im.name], pose_is_prior=False))
    test_names = holdout_names([im.name for im in images], options.holdout_every)
    survey = Survey(root=images_dir, cameras=cameras, images=images, georef=frame_georef,
                    test_names=test_names).validate(folder)

    focal_cameras = []
    for colmap_id, k in cam_of_colmap.items():
        m = first_meta[sfm.camera_index[colmap_id]]
        prior_px = float(prior.cameras[sfm.camera_index[colmap_id]].fl_x)
        exif_source = FOCAL_SOURCES.get(m.focal_source, m.focal_source)
        focal_cameras.append({"camera": k, "make": m.make, "model": m.model, "focal_mm": m.focal_mm,
                              "prior_px": prior_px, "prior_source": exif_source, "used_px": float(cameras[k].fl_x),
                              "source": f"sfm refined (from {exif_source})" if refine else exif_source})

    write_transforms(survey, out / "transforms.json")
    heldout_points = write_heldout_points(rec, out / HELDOUT_POINTS_FILE)
    write_model(rec, out / SPARSE_MODEL, survey.georef)
    shutil.rmtree(out / "colmap" / "models", ignore_errors=True)  # unaligned duplicates of sparse/0

    per_image = {}
    for im, r, ok in zip(registered, alignment.residuals, alignment.inliers):
        per_image[im.name] = {"residual_enu_m": [float(v) for v in r], "horizontal_m": float(np.hypot(r[0], r[1])),
                              "vertical_m": float(abs(r[2])), "inlier": bool(ok), "gps_fix_of": fix_from[im.name]}
    spf = _seconds_per_frame(metas, order)
    report: dict[str, Any] = {
        "input": str(Path(folder).resolve()),
        "registered": len(registered),
        "total": len(prior.images),
        "unregistered": sfm.unregistered,
        "unregistered_reasons": {n: sfm.unregistered_reasons.get(n, "unknown") for n in sfm.unregistered},
        "gps_outliers": gps_outliers,
        "written": len(images),
        "num_models": sfm.num_models,
        "models": [{"num_images": m["num_images"], "used": i == 0,
                    "images": m["images"] if i else None} for i, m in enumerate(sfm.models)],
        "georef": frame_georef.to_dict(),
        "origin_height_from": ("given georef" if georef is not None else "dji take-off altitude" if has_takeoff
                               else f"median SfM point height ({ground_shift:+.2f} m from GPS altitude 0)"),
        "gps_lag": {"frames": lag.frames, "applied": lag.applied, "best_frames": lag.best_frames,
                    "seconds_per_frame": spf, "seconds": None if spf is None else lag.frames * spf,
                    "min_gain": LAG_MIN_GAIN,
                    "per_shift": {str(k): v for k, v in lag.per_shift.items()},
                    "median_horizontal_m_before": lag.per_shift.get(0, {}).get("median_horizontal_m"),
                    "median_horizontal_m_after": float(np.median(alignment.horizontal))},
        "gps_residual_m": alignment.stats(),
        "gps_residual_written_m": alignment.stats(keep),
        "per_image": per_image,
        "similarity": sim.to_dict(),
        "focal": {"refined": bool(refine), "rule": rule, "view_spread_deg": spread, "spread_from": spread_from,
                  "observable_spread_deg": FOCAL_OBSERVABLE_SPREAD_DEG, "cameras": focal_cameras},
        "held_out_views": {"rule": f"every {options.holdout_every}th written image in name order, from the first "
                                   "(transforms.json test_filenames / val_filenames)" if options.holdout_every
                           else "none", "names": test_names},
        "held_out_points": heldout_points,
        "sfm": {"mean_reprojection_error_px": sfm.mean_reprojection_error(),
                "num_points3D": int(rec.num_points3D()), "matcher": sfm.matcher,
                "cameras": [asdict(c) for c in cameras], "pycolmap_version": pycolmap.__version__},
        "options": asdict(options),
        "timings_s": {"read": t_read, **sfm.timings, "align": t_align, "total": time.perf_counter() - t_start},
    }
    atomic_write_json(out / "ingest_report.json", report)
    return IngestResult(survey=survey, alignment=alignment, report=report)
