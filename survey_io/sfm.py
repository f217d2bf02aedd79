"""Structure from motion with pycolmap (COLMAP's CPU SIFT + incremental mapping).

Input is a prior :class:`Survey` (from :func:`survey_io.drone.read_drone_folder`): its
cameras seed the intrinsics (one COLMAP camera per survey camera, focal length marked as a
prior) and its GPS positions, in the local ENU frame, become COLMAP Cartesian pose priors,
so that spatial matching pairs images by distance in metres.

pycolmap is imported lazily: importing :mod:`survey_io` does not need it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .colmap import colmap_params
from .errors import SurveyError
from .survey import Camera, Survey

#: COLMAP camera models ingest can refine, and how the survey camera seeds their parameters.
SFM_CAMERA_MODELS = ("SIMPLE_RADIAL", "RADIAL", "OPENCV", "PINHOLE", "SIMPLE_PINHOLE")


@dataclass
class SfmOptions:
    """Options of the SfM pipeline.

    Attributes:
        max_image_size: features are extracted on images downscaled to this long side (pixels).
        max_num_features: SIFT features per image.
        num_threads: CPU threads for extraction, matching and mapping.
        camera_model: COLMAP camera model to refine (see :data:`SFM_CAMERA_MODELS`).
        matcher: "exhaustive", "spatial" (GPS neighbours), or "auto" (exhaustive up to
            ``exhaustive_max_images`` images).
        exhaustive_max_images: the "auto" switch point.
        spatial_neighbors: neighbours per image for spatial matching.
        spatial_max_distance: neighbour search radius (metres, horizontal) for spatial matching.
        seed: random seed of COLMAP's RANSAC and mapper.
        use_gps_prior: let the mapper's bundle adjustment use the GPS positions (COLMAP pose
            priors, robust loss): it keeps wrongly matched images from pulling the model apart.
        gps_sigma_m: GPS standard deviation (horizontal, vertical) in metres for those priors.
        refine_focal_length: let bundle adjustment refine the focal length (COLMAP's default).
            Ingest turns it off for nadir-only flights, where focal length and depth cannot be
            told apart (see :func:`survey_io.ingest.focal_is_observable`) and the EXIF value
            is the better estimate.
        verbose: let COLMAP log (glog) to stderr.
    """

    max_image_size: int = 1000
    max_num_features: int = 8192
    num_threads: int = 2
    camera_model: str = "SIMPLE_RADIAL"
    matcher: str = "auto"
    exhaustive_max_images: int = 60
    spatial_neighbors: int = 20
    spatial_max_distance: float = 300.0
    seed: int = 0
    use_gps_prior: bool = True
    gps_sigma_m: tuple[float, float] = (5.0, 10.0)
    refine_focal_length: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.camera_model not in SFM_CAMERA_MODELS:
            raise SurveyError(None, f"camera model {self.camera_model!r} is not one of {', '.join(SFM_CAMERA_MODELS)}")
        if self.matcher not in ("auto", "exhaustive", "spatial"):
            raise SurveyError(None, f"matcher {self.matcher!r} is not one of auto, exhaustive, spatial")


@dataclass
class SfmResult:
    """The largest reconstruction and what did not make it into it.

    Attributes:
        reconstruction: a ``pycolmap.Reconstruction`` (COLMAP's arbitrary frame and scale).
        image_ids: registered image name -> COLMAP image id.
        unregistered: names of survey images not in the reconstruction.
        camera_index: COLMAP camera id -> index into the survey's cameras.
        num_models: how many separate models the mapper produced.
        unregistered_reasons: unregistered image name -> why ("no features", "no matches", ...).
        models: one summary per model the mapper produced (largest first): number of images
            and their names; the first is ``reconstruction``.
        matcher: "exhaustive" or "spatial", the matcher that ran.
        timings: seconds per stage.
    """

    reconstruction: Any
    image_ids: dict[str, int]
    unregistered: list[str]
    camera_index: dict[int, int]
    num_models: int
    matcher: str
    timings: dict[str, float] = field(default_factory=dict)
    unregistered_reasons: dict[str, str] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)

    def c2w(self, name: str) -> np.ndarray:
        """Camera-to-world 4x4 (OpenCV camera axes, as COLMAP) of a registered image."""
        image = self.reconstruction.images[self.image_ids[name]]
        m = np.eye(4)
        m[:3, :4] = image.cam_from_world().inverse().matrix()
        return m

    def mean_reprojection_error(self) -> float:
        return float(self.reconstruction.compute_mean_reprojection_error())


def import_pycolmap():
    try:
        import pycolmap
    except ImportError:
        raise SurveyError(None, "structure from motion needs pycolmap: pip install pycolmap") from None
    return pycolmap


@contextlib.contextmanager
def _colmap_logging(pycolmap, verbose: bool) -> Iterator[None]:
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = previous if verbose else 2  # 2: errors only
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


def _camera_params(cam: Camera, model: str) -> str:
    f = 0.5 * (cam.fl_x + cam.fl_y)
    params = {
        "SIMPLE_PINHOLE": (f, cam.cx, cam.cy),
        "PINHOLE": (cam.fl_x, cam.fl_y, cam.cx, cam.cy),
        "SIMPLE_RADIAL": (f, cam.cx, cam.cy, cam.k1),
        "RADIAL": (f, cam.cx, cam.cy, cam.k1, cam.k2),
        "OPENCV": (cam.fl_x, cam.fl_y, cam.cx, cam.cy, cam.k1, cam.k2, cam.p1, cam.p2),
    }[model]
    return ",".join(repr(float(v)) for v in params)


def colmap_to_camera(colmap_camera) -> Camera:
    """A COLMAP camera as a nerfstudio-named :class:`Camera` (radial models become OPENCV, as nerfstudio does)."""
    model = colmap_camera.model_name
    p = [float(v) for v in colmap_camera.params]
    w, h = int(colmap_camera.width), int(colmap_camera.height)
    if model == "SIMPLE_PINHOLE":
        return Camera(w, h, p[0], p[0], p[1], p[2], "PINHOLE")
    if model == "PINHOLE":
        return Camera(w, h, p[0], p[1], p[2], p[3], "PINHOLE")
    if model == "SIMPLE_RADIAL":
        return Camera(w, h, p[0], p[0], p[1], p[2], "OPENCV", k1=p[3])
    if model == "RADIAL":
        return Camera(w, h, p[0], p[0], p[1], p[2], "OPENCV", k1=p[3], k2=p[4])
    if model == "OPENCV":
        return Camera(w, h, p[0], p[1], p[2], p[3], "OPENCV", k1=p[4], k2=p[5], p1=p[6], p2=p[7])
    if model == "OPENCV_FISHEYE":
        return Camera(w, h, p[0], p[1], p[2], p[3], "OPENCV_FISHEYE", k1=p[4], k2=p[5], k3=p[6], k4=p[7])
    raise SurveyError(None, f"COLMAP camera model {model} has no nerfstudio equivalent")


def extract_and_match(survey: Survey, db_path: Path, options: SfmOptions, timings: dict[str, float],
                      camera_spec, positions: list[np.ndarray | None]) -> tuple[dict[int, int], bool]:
    """Extract SIFT features of the survey's images into COLMAP's database and match them.

    The shared front half of :func:`run_sfm` and :func:`triangulate_known_poses`.

    Args:
        camera_spec: survey camera -> (COLMAP model name, comma-separated parameters) that seeds
            the one COLMAP camera made per survey camera.
        positions: per survey image, its position in the local frame (or None): written as
            Cartesian pose priors, so that spatial matching pairs images by distance in metres.

    Returns:
        COLMAP camera id -> survey camera index, and whether the spatial matcher ran.
    """
    pycolmap = import_pycolmap()
    # Features: one extraction call per survey camera, so each becomes one COLMAP camera.
    t0 = time.perf_counter()
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = options.max_image_size
    extraction.num_threads = options.num_threads
    extraction.sift.max_num_features = options.max_num_features
    for k, cam in enumerate(survey.cameras):
        names = [im.name for im in survey.images if im.camera == k]
        if not names:
            continue
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model, reader.camera_params = camera_spec(cam)
        pycolmap.extract_features(db_path, survey.root, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
    timings["extract_s"] = time.perf_counter() - t0

    # Position priors in the local metric frame (COLMAP read WGS84 ones from EXIF; replace them).
    db = pycolmap.Database.open(db_path)
    try:
        by_name = {im.name: im for im in db.read_all_images()}
        missing = [im.name for im in survey.images if im.name not in by_name]
        if missing:
            raise SurveyError(survey.root / missing[0], "COLMAP could not read this image")
        camera_index = {}
        for im in survey.images:
            camera_index[by_name[im.name].camera_id] = im.camera
        db.clear_pose_priors()
        for im, position in zip(survey.images, positions):
            if position is not None:
                sh, sv = options.gps_sigma_m
                db.write_pose_prior(pycolmap.PosePrior(
                    position=np.asarray(position, dtype=np.float64), corr_data_id=by_name[im.name].data_id,
                    position_covariance=np.diag([sh**2, sh**2, sv**2]),
                    coordinate_system=pycolmap.PosePriorCoordinateSystem.CARTESIAN))
    finally:
        db.close()

    t0 = time.perf_counter()
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = options.num_threads
    use_spatial = options.matcher == "spatial" or (
        options.matcher == "auto" and len(survey.images) > options.exhaustive_max_images)
    if use_spatial:
        pairing = pycolmap.SpatialPairingOptions()
        pairing.max_num_neighbors = options.spatial_neighbors
        pairing.max_distance = options.spatial_max_distance
        pairing.ignore_z = True
        pairing.num_threads = options.num_threads
        pycolmap.match_spatial(db_path, matching_options=matching, pairing_options=pairing,
                               device=pycolmap.Device.cpu)
    else:
        pycolmap.match_exhaustive(db_path, matching_options=matching, device=pycolmap.Device.cpu)
    timings["match_s"] = time.perf_counter() - t0
    return camera_index, use_spatial


def _start_colmap(work_dir: str | Path, options: SfmOptions | None):
    """pycolmap, the options (defaults when None), an emptied work folder, its database path and an
    empty timings dict, with COLMAP's random seed set: the common start of SfM and triangulation."""
    pycolmap = import_pycolmap()
    options = options or SfmOptions()
    work_dir = Path(work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    pycolmap.set_random_seed(options.seed)
    timings: dict[str, float] = {}
    return pycolmap, options, work_dir, work_dir / "database.db", timings


def _mapping_options(pycolmap, options: SfmOptions):
    """COLMAP's mapping options with the run's threads and every seed set (mapping and triangulation)."""
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = options.num_threads
    mapping.random_seed = options.seed
    mapping.mapper.random_seed = options.seed
    mapping.triangulation.random_seed = options.seed
    return mapping


def run_sfm(survey: Survey, work_dir: str | Path, options: SfmOptions | None = None) -> SfmResult:
    """Extract, match and map the survey's images; return the largest reconstruction.

    Args:
        survey: images (under ``survey.root``), prior cameras and GPS positions (``image.gps``).
        work_dir: COLMAP's working folder (``database.db`` and ``models/``); it is emptied first.
        options: pipeline options.

    Raises:
        SurveyError: when no model can be reconstructed at all.
    """
    pycolmap, options, work_dir, db_path, timings = _start_colmap(work_dir, options)

    with _colmap_logging(pycolmap, options.verbose):
        camera_index, use_spatial = extract_and_match(
            survey, db_path, options, timings,
            lambda cam: (options.camera_model, _camera_params(cam, options.camera_model)),
            [im.gps for im in survey.images])

        t0 = time.perf_counter()
        mapping = _mapping_options(pycolmap, options)
        mapping.min_model_size = 3
        # Fixed focal length: neither the global/local bundle adjustments nor the registration of
        # new images (absolute pose) may move it.
        mapping.ba_refine_focal_length = options.refine_focal_length
        mapping.mapper.abs_pose_refine_focal_length = options.refine_focal_length
        if options.use_gps_prior:
            mapping.use_prior_position = True
            mapping.use_robust_loss_on_prior_position = True
        models = pycolmap.incremental_mapping(db_path, survey.root, work_dir / "models", options=mapping)
        timings["map_s"] = time.perf_counter() - t0

    if not models:
        raise SurveyError(survey.root, "structure from motion failed: no two images could be matched into a model "
                                       "(too little overlap or texture?)")
    ranked = sorted(models.values(), key=lambda r: -r.num_reg_images())
    rec = ranked[0]
    image_ids = {rec.images[i].name: int(i) for i in rec.reg_image_ids()}
    unregistered = [im.name for im in survey.images if im.name not in image_ids]
    summaries = [{"num_images": int(r.num_reg_images()),
                  "images": sorted(r.images[i].name for i in r.reg_image_ids())} for r in ranked]
    reasons = unregistered_reasons(db_path, unregistered, summaries)
    return SfmResult(reconstruction=rec, image_ids=image_ids, unregistered=unregistered,
                     camera_index=camera_index, num_models=len(models),
                     matcher="spatial" if use_spatial else "exhaustive", timings=timings,
                     unregistered_reasons=reasons, models=summaries)


#: Fewer keypoints than this and an image cannot be registered (COLMAP needs 15 inlier matches
#: per verified pair, and several pairs).
MIN_FEATURES = 30


def unregistered_reasons(db_path: str | Path, names: list[str], models: list[dict[str, Any]]) -> dict[str, str]:
    """Why each of ``names`` is not in the largest model, from COLMAP's database and the models.

    The first reason that applies: "no features" (fewer than :data:`MIN_FEATURES` keypoints),
    "no matches" (no geometrically verified pair with another image), "in a separate model
    (k images)" (the mapper put it into a smaller reconstruction), else "not registered by
    the mapper" (verified matches, but too few 3D points seen to place it).
    """
    pycolmap = import_pycolmap()
    if not names:
        return {}
    other_model = {n: m["num_images"] for m in models[1:] for n in m["images"]}
    db = pycolmap.Database.open(db_path)
    try:
        by_name = {im.name: im for im in db.read_all_images()}
        verified: dict[int, int] = {}
        pair_ids, geometries = db.read_two_view_geometries()
        for pair_id, geom in zip(pair_ids, geometries):
            if geom.inlier_matches.shape[0] == 0:
                continue
            for image_id in pycolmap.pair_id_to_image_pair(pair_id):
                verified[int(image_id)] = verified.get(int(image_id), 0) + 1
        reasons = {}
        for name in names:
            im = by_name.get(name)
            n_features = db.num_keypoints_for_image(im.image_id) if im is not None else 0
            if n_features < MIN_FEATURES:
                reasons[name] = f"no features ({n_features} keypoints)"
            elif verified.get(im.image_id, 0) == 0:
                reasons[name] = "no matches (no geometrically verified pair with another image)"
            elif name in other_model:
                reasons[name] = f"in a separate model ({other_model[name]} images) not connected to the largest"
            else:
                reasons[name] = (f"not registered by the mapper ({verified[im.image_id]} verified pairs, too few "
                                 "3D points seen)")
    finally:
        db.close()
    return reasons


def refine_focal_length(reconstruction, num_threads: int = 2) -> None:
    """One global bundle adjustment of ``reconstruction`` (in place) with the focal length free."""
    pycolmap = import_pycolmap()
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = True
    options.refine_principal_point = False
    options.refine_extra_params = True
    try:
        options.ceres.solver_options.num_threads = num_threads
    except AttributeError:  # older layouts of the options: the default thread count then
        pass
    pycolmap.bundle_adjustment(reconstruction, options)


@dataclass
class TriangulationResult:
    """Points triangulated from known poses (:func:`triangulate_known_poses`).

    Attributes:
        reconstruction: a ``pycolmap.Reconstruction`` in the survey's local frame: the survey's
            cameras and poses, unchanged, and the triangulated points with errors and tracks.
        matcher: "exhaustive" or "spatial".
        timings: seconds per stage.
    """

    reconstruction: Any
    matcher: str
    timings: dict[str, float] = field(default_factory=dict)


def triangulate_known_poses(survey: Survey, work_dir: str | Path,
                            options: SfmOptions | None = None) -> TriangulationResult:
    """Extract, match and triangulate the survey's images with its poses and intrinsics held fixed.

    The coarse pass of aerotriangulation for a survey that has poses but no points (COLMAP's
    ``point_triangulator``): features and matches as :func:`run_sfm` makes them (the camera
    centres are the spatial matcher's positions), then triangulation and a bundle adjustment that
    moves only the points.  Each survey camera becomes one COLMAP camera of the same model and
    parameters (distortion included, :func:`survey_io.colmap.colmap_params`); poses go in as
    COLMAP's ``cam_from_world`` of the OpenCV-axes camera-to-world (nerfstudio's OpenGL axes are
    converted when the survey is read), so the points come out in the survey's local frame.

    Args:
        survey: posed images (under ``survey.root``).
        work_dir: COLMAP's working folder (``database.db``); it is emptied first.
        options: feature and matching options (``camera_model``, ``use_gps_prior`` and
            ``refine_focal_length`` do not apply: the survey's cameras are kept as they are).

    Raises:
        SurveyError: a camera model COLMAP cannot hold, an unreadable image, or no point triangulated.
    """
    pycolmap, options, work_dir, db_path, timings = _start_colmap(work_dir, options)
    source = survey.root
    specs = [(cam.camera_model, ",".join(repr(v) for v in colmap_params(cam, source))) for cam in survey.cameras]
    spec_of = {cam: spec for cam, spec in zip(survey.cameras, specs)}

    with _colmap_logging(pycolmap, options.verbose):
        _, use_spatial = extract_and_match(survey, db_path, options, timings, lambda cam: spec_of[cam],
                                           [im.c2w[:3, 3] for im in survey.images])

        # The known model: the database's cameras (made from the survey's) and images, posed.
        rec = pycolmap.Reconstruction()
        db = pycolmap.Database.open(db_path)
        try:
            for cam in db.read_all_cameras():
                rec.add_camera_with_trivial_rig(cam)
            by_name = {im.name: im for im in db.read_all_images()}
        finally:
            db.close()
        for im in survey.images:
            w2c = np.linalg.inv(np.asarray(im.c2w, dtype=np.float64))
            db_image = by_name[im.name]
            image = pycolmap.Image(name=im.name, camera_id=db_image.camera_id, image_id=db_image.image_id)
            rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]),
                                                                     w2c[:3, 3].copy()))

        t0 = time.perf_counter()
        mapping = _mapping_options(pycolmap, options)
        rec = pycolmap.triangulate_points(rec, db_path, survey.root, work_dir / "model", clear_points=True,
                                          options=mapping, refine_intrinsics=False)
        timings["triangulate_s"] = time.perf_counter() - t0

    if rec.num_points3D() == 0:
        raise SurveyError(survey.root, "triangulation found no points: no image pair could be matched "
                                       "(too little overlap or texture?)")
    return TriangulationResult(reconstruction=rec, matcher="spatial" if use_spatial else "exhaustive",
                               timings=timings)
