"""Training data: every training pixel of a block pre-loaded, random ray batches, scene bounds.

All images are loaded once as uint8 tensors in one flat pixel buffer (plus label maps and
depth maps when the survey has them); a batch is a set of flat pixel indices -- drawn
uniformly over all training pixels, or guided by an error map (``error_map.py``) -- and
builds the rays of just those pixels (per-image intrinsics and poses are small tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from survey_io import IGNORE_LABEL, Survey, SurveyImage, read_transforms
from survey_io.atomic import atomic_path
from survey_io.colmap import read_colmap_observations

from ..cameras import CameraSet, pixel_directions, unproject
from ..errors import CitygenError
from ..images import load_depth, load_labels, load_rgb
from ..partition.ground import SPARSE_MODEL, load_box_points, trusted_point_mask

#: the field's top stays this far below the lowest camera training the block (metres).
CAMERA_CLEARANCE_M = 2.0
#: fewer observed points than this (depth pixels or SfM points in a block): heights unknown.
MIN_HEIGHT_POINTS = 16


def load_survey(data: Path | str | Survey) -> Survey:
    """A :class:`Survey` from a ``transforms.json`` path (or its folder), or the survey itself."""
    if isinstance(data, Survey):
        return data
    path = Path(data)
    if path.is_dir():
        path = path / "transforms.json"
    return read_transforms(path)


def select_images(survey: Survey, image_names: list[str] | None, split: str = "train") -> list[SurveyImage]:
    """The training (or test) images, restricted to ``image_names`` when given."""
    pool = survey.train_images if split == "train" else survey.test_images
    if image_names is None:
        return pool
    by_name = {im.name: im for im in survey.images}
    missing = [n for n in image_names if n not in by_name]
    if missing:
        raise CitygenError(survey.root, f"images not in the survey: {missing[:3]}")
    held_out = set(survey.test_names)
    return [by_name[n] for n in image_names if (n in held_out) == (split == "test")]


@dataclass
class RayBatch:
    origins: Tensor      # (R, 3)
    dirs: Tensor         # (R, 3) unit
    z_scale: Tensor      # (R,)
    rgb: Tensor          # (R, 3) float in [0, 1]
    image_index: Tensor  # (R,) long
    semantics: Tensor | None = None  # (R,) long, 255 = ignore
    depth: Tensor | None = None      # (R,) metres, 0 = unknown


@dataclass
class SparseDepth:
    """SfM keypoints of the training images as sparse depth targets (DS-NeRF's supervision).

    ``pixel`` indexes the dataset's flat pixel buffer (the pixel holding the keypoint), ``depth`` is
    the point's z-depth in that camera (metres) and ``weight`` DS-NeRF's confidence from the
    point's mean reprojection error ``e``: ``2 exp(-(e / mean e)^2)``.
    """

    pixel: Tensor   # (K,) long
    depth: Tensor   # (K,) float32 metres
    weight: Tensor  # (K,) float32

    def __len__(self) -> int:
        return int(self.pixel.numel())


def load_sparse_depth(survey: Survey, images: list[SurveyImage], cameras: list, offsets: Tensor,
                      downscale: int = 1) -> SparseDepth | None:
    """The :class:`SparseDepth` of ``images`` from the survey's SfM model (``sparse/0`` beside
    ``transforms.json``, written by ``citygen ingest``), or None without one.

    Each image's keypoints with a trusted 3D point (:func:`citygen.partition.ground.trusted_point_mask`:
    the evaluation tenth, weak and short-track points left out) become targets: the pixel under the
    keypoint at the training downscale (``cameras`` are the downscaled cameras, ``offsets`` the
    dataset's flat-buffer offsets per image) and the point's z-depth along the image's optical axis.
    Points behind the camera or outside the image are dropped.
    """
    folder = Path(survey.root) / SPARSE_MODEL
    if not folder.is_dir():
        return None
    table, observations = read_colmap_observations(folder)
    keep = trusted_point_mask(table)
    row_of = {int(i): k for k, i in enumerate(table["id"])}
    used_err = table["error_px"][keep]
    used_err = used_err[used_err >= 0]
    mean_err = float(used_err.mean()) if len(used_err) else 0.0
    pixels, depths, weights = [], [], []
    for k, (im, cam) in enumerate(zip(images, cameras)):
        ids, xy = observations.get(Path(im.name).name, observations.get(im.name, (np.zeros(0, np.int64), None)))
        if len(ids) == 0:
            continue
        rows = np.array([row_of.get(int(i), -1) for i in ids])
        ok = rows >= 0
        ok[ok] = keep[rows[ok]]
        rows, xy = rows[ok], xy[ok]
        c2w = np.asarray(im.c2w, dtype=np.float64)
        z = (table["xyz"][rows] - c2w[:3, 3]) @ c2w[:3, 2]
        col = np.floor(xy[:, 0] / downscale).astype(np.int64)
        row = np.floor(xy[:, 1] / downscale).astype(np.int64)
        ok = (z > 0) & (col >= 0) & (col < cam.width) & (row >= 0) & (row < cam.height)
        err = table["error_px"][rows[ok]]
        w = np.where((err >= 0) & (mean_err > 0), 2.0 * np.exp(-np.square(err / max(mean_err, 1e-12))), 1.0)
        pixels.append(int(offsets[k]) + row[ok] * cam.width + col[ok])
        depths.append(z[ok])
        weights.append(w)
    if not pixels or sum(len(p) for p in pixels) == 0:
        return None
    device = offsets.device
    return SparseDepth(pixel=torch.from_numpy(np.concatenate(pixels)).to(device),
                       depth=torch.from_numpy(np.concatenate(depths)).float().to(device),
                       weight=torch.from_numpy(np.concatenate(weights)).float().to(device))


class RayDataset:
    """Every pixel of a set of survey images, ready for random ray batches.

    Args:
        survey: the survey.
        images: the images to load (their order defines the appearance-code indices).
        downscale: integer image downscale factor.
        device: where the pixel buffers live.
        masks: per image, an (H, W) bool array at the training resolution: the pixels this
            dataset may draw (a tile block's attributed pixels, :mod:`citygen.tile`); None: all.
            Kept as one int32 list of flat indices (4 bytes per allowed pixel).
    """

    def __init__(self, survey: Survey, images: list[SurveyImage], downscale: int = 1,
                 device: torch.device | str = "cpu", masks: list[np.ndarray] | None = None):
        if not images:
            raise CitygenError(survey.root, "no training images")
        survey.check_image_files(images)  # headers only: a bad file fails before any pixel is loaded
        self.survey = survey
        self.images = images
        self.device = torch.device(device)
        self.cameras = [survey.camera_of(im).scaled(1.0 / downscale) if downscale > 1 else survey.camera_of(im)
                        for im in images]
        rgbs, labels, depths, counts = [], [], [], []
        self.has_semantics = all(im.semantics is not None for im in images)
        self.has_depth = all(im.depth is not None for im in images)
        for im, cam in zip(images, self.cameras):
            size = (cam.width, cam.height)
            rgb = load_rgb(survey.image_path(im), size)
            rgbs.append(torch.from_numpy(rgb.reshape(-1, 3).copy()))
            if self.has_semantics:
                labels.append(torch.from_numpy(load_labels(im.semantics, size).reshape(-1).copy()))
            if self.has_depth:
                depths.append(torch.from_numpy(load_depth(im.depth, size).reshape(-1)))
            counts.append(cam.width * cam.height)
        self.rgb = torch.cat(rgbs).to(self.device)                               # (P, 3) uint8
        self.semantics = torch.cat(labels).to(self.device) if self.has_semantics else None
        self.depth = torch.cat(depths).to(self.device) if self.has_depth else None
        counts_t = torch.tensor(counts, dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts_t.cumsum(0)]).to(self.device)
        self.n_pixels = int(counts_t.sum())
        self.c2w = torch.tensor(np.stack([im.c2w for im in images]), dtype=torch.float64, device=self.device)
        self.allowed = None if masks is None else self._allowed(masks)
        try:  # every ray of a batch comes from the camera model (lens included)
            self.camera_set = CameraSet(self.cameras, self.c2w.cpu().numpy(), device=self.device)
        except CitygenError as err:
            raise CitygenError(survey.root, err.reason) from None
        # SfM keypoints as sparse depth targets (surveys ingested with an SfM model)
        self.sparse_depth = load_sparse_depth(survey, images, self.cameras, self.offsets, downscale)
        if self.sparse_depth is not None and self.allowed is not None:
            # a tile block supervises only the keypoints on its own attributed pixels
            keep = torch.isin(self.sparse_depth.pixel, self.allowed.long())
            sd = self.sparse_depth
            self.sparse_depth = (SparseDepth(pixel=sd.pixel[keep], depth=sd.depth[keep], weight=sd.weight[keep])
                                 if bool(keep.any()) else None)

    @property
    def camera_positions(self) -> Tensor:
        return self.c2w[:, :3, 3].float()

    def _allowed(self, masks: list[np.ndarray]) -> Tensor:
        """The flat indices of the pixels ``masks`` allow, int32 (see the class docstring)."""
        if len(masks) != len(self.images):
            raise CitygenError(self.survey.root, f"{len(masks)} pixel masks for {len(self.images)} images")
        parts = []
        for im, cam, mask, start in zip(self.images, self.cameras, masks, self.offsets[:-1].tolist()):
            if mask.shape != (cam.height, cam.width):
                raise CitygenError(self.survey.image_path(im), f"pixel mask is {mask.shape}, the training image "
                                                               f"{(cam.height, cam.width)}")
            parts.append(np.flatnonzero(mask.reshape(-1)) + start)
        allowed = np.concatenate(parts)
        if not len(allowed):
            raise CitygenError(self.survey.root, "no training pixel is attributed to this block")
        dtype = torch.int32 if self.n_pixels < 2**31 else torch.long
        return torch.from_numpy(allowed).to(self.device, dtype)

    @property
    def n_allowed(self) -> int:
        """How many pixels batches are drawn from (all, or those the masks allow)."""
        return self.n_pixels if self.allowed is None else int(self.allowed.numel())

    def uniform_pixels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` flat pixel indices drawn uniformly over all training pixels, or over the pixels
        the masks allow (for :meth:`batch`)."""
        if self.allowed is not None:
            pick = torch.randint(0, self.allowed.numel(), (n,), generator=generator, device=self.device)
            return self.allowed[pick].long()
        return torch.randint(0, self.n_pixels, (n,), generator=generator, device=self.device)

    def sparse_depth_draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` indices into :attr:`sparse_depth` drawn uniformly (with replacement)."""
        return torch.randint(0, len(self.sparse_depth), (n,), generator=generator, device=self.device)

    def batch(self, idx: Tensor) -> RayBatch:
        """The rays and targets of flat pixel indices ``idx``."""
        image = torch.searchsorted(self.offsets, idx, right=True) - 1
        local = idx - self.offsets[image]
        width = self.camera_set.widths[image]
        pixels = torch.stack([local % width, local // width], dim=-1)
        origins, dirs, z_scale = self.camera_set.rays(image, pixels)
        return RayBatch(
            origins=origins, dirs=dirs, z_scale=z_scale,
            rgb=self.rgb[idx].float() / 255.0, image_index=image,
            semantics=self.semantics[idx].long() if self.semantics is not None else None,
            depth=self.depth[idx] if self.depth is not None else None,
        )


def write_pixel_masks(path: Path, names: list[str], masks: list[np.ndarray]) -> None:
    """Write per-image (H, W) bool masks (a tile block's attributed pixels) to ``path`` (.npz,
    atomically): bit-packed, one bit per pixel, with the image names and sizes to check them by."""
    bits = [np.packbits(np.asarray(m, dtype=bool).reshape(-1)) for m in masks]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bits])]).astype(np.int64)
    with atomic_path(Path(path), suffix=".npz") as tmp:
        np.savez_compressed(tmp, names=np.array(names, dtype=str), shapes=np.array([m.shape for m in masks],
                            dtype=np.int64).reshape(-1, 2), offsets=offsets,
                            bits=np.concatenate(bits) if bits else np.zeros(0, np.uint8))


def read_pixel_masks(path: Path | str, names: list[str]) -> list[np.ndarray]:
    """The masks :func:`write_pixel_masks` wrote, for ``names`` in that order (each must be there)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            stored, shapes, offsets, bits = [str(n) for n in z["names"]], z["shapes"], z["offsets"], z["bits"]
    except (OSError, ValueError, KeyError) as err:
        raise CitygenError(path, f"unreadable pixel masks ({err})") from None
    index = {n: i for i, n in enumerate(stored)}
    missing = [n for n in names if n not in index]
    if missing:
        raise CitygenError(path, f"no pixel masks for images {missing[:3]}")
    if shapes.shape != (len(stored), 2) or offsets.shape != (len(stored) + 1,) or offsets[-1] != len(bits):
        raise CitygenError(path, "pixel masks: inconsistent names, shapes and offsets")
    masks = []
    for n in names:
        i = index[n]
        h, w = (int(v) for v in shapes[i])
        packed = bits[offsets[i]:offsets[i + 1]]
        if h < 0 or w < 0 or len(packed) != (h * w + 7) // 8:
            raise CitygenError(path, f"pixel mask of {n}: {len(packed)} bytes for {h}x{w} pixels")
        masks.append(np.unpackbits(packed, count=h * w).astype(bool).reshape(h, w))
    return masks


def depth_points(survey: Survey, image: SurveyImage, stride: int = 8) -> np.ndarray:
    """World points (N, 3) of every ``stride``-th pixel of ``image``'s depth map with a known
    depth (z-depth > 0), back-projected through its camera."""
    cam = survey.camera_of(image)
    depth = load_depth(image.depth)
    if depth.shape != (cam.height, cam.width):
        raise CitygenError(image.depth, f"depth map is {depth.shape}, the image is {(cam.height, cam.width)}")
    rows, cols = np.mgrid[0:cam.height:stride, 0:cam.width:stride]
    z = depth[rows, cols]
    ok = z > 0
    return unproject(cam, image.c2w, cols[ok] + 0.5, rows[ok] + 0.5, z[ok])


def robust_heights(z: np.ndarray) -> tuple[float, float] | None:
    """The 0.5 / 99.5 percentiles of observed heights ``z`` (robust to stray points); None with
    fewer than ``MIN_HEIGHT_POINTS``."""
    z = np.asarray(z, dtype=np.float64).ravel()
    if len(z) < MIN_HEIGHT_POINTS:
        return None
    return float(np.percentile(z, 0.5)), float(np.percentile(z, 99.5))


def padded_heights(heights: tuple[float, float]) -> tuple[float, float]:
    """An observed height range padded by 10 % of its size plus 2 m on both ends (what lies just
    beyond the observed surfaces: the percentiles cut the extreme points)."""
    z0, z1 = heights
    pad = 0.1 * max(z1 - z0, 0.0) + 2.0
    return z0 - pad, z1 + pad


def ground_sample_distance(cameras: list, c2w: np.ndarray, floor_z: float) -> float:
    """The images' nadir ground sample distance at height ``floor_z``, metres per pixel of
    ``cameras`` (the training resolution): the median over images of the camera's height above
    ``floor_z`` over its focal length -- a pixel's footprint straight down (oblique pixels see
    coarser ones, roofs finer).  A block's box floor sits a little under its ground, so at the
    floor this is the ground's GSD within a few per cent."""
    heights = np.maximum(np.asarray(c2w, dtype=np.float64)[:, 2, 3] - floor_z, 0.0)
    focal = np.array([cam.fl_x for cam in cameras], dtype=np.float64)
    return float(np.median(heights / focal))


def flight_heights(ground_z: float, lowest_camera_z: float) -> tuple[float, float]:
    """Heights to bound a field by when nothing was observed: ``[g - 0.1 h, g + 0.6 h]`` with
    ``h`` the lowest camera's height above the ground ``g`` (surveys fly well above what they
    photograph; a box up to the lenses fills with floaters in front of them)."""
    h = lowest_camera_z - ground_z
    return ground_z - 0.1 * h, ground_z + 0.6 * h


def point_heights(points: np.ndarray, rect: tuple[float, float, float, float]) -> tuple[float, float] | None:
    """The height range of the SfM ``points`` (N, 3; well-triangulated ones, see
    :func:`citygen.partition.ground.load_box_points`) inside the horizontal rectangle ``rect``:
    from their 0.5 percentile up to their highest point; None with fewer than ``MIN_HEIGHT_POINTS``.

    Not the 99.5 percentile as for depth pixels: SfM finds few features on flat roofs, so a
    survey's roofs are a handful of its points -- on ``citygen synth --preset failure`` the 99.5
    percentile of a 2x2 tile's blocks sat 12-43 m under the 49 m roof (boxes cutting the tallest
    buildings), while the highest point sat within 1 m of it.  A stray high point costs box height
    at worst (the box stays under the cameras); a missing roof costs the building.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    inside = (pts[:, 0] >= rect[0]) & (pts[:, 0] <= rect[2]) & (pts[:, 1] >= rect[1]) & (pts[:, 1] <= rect[3])
    seen = robust_heights(pts[inside, 2])
    return None if seen is None else (seen[0], float(pts[inside, 2].max()))


def scene_aabb(survey: Survey, images: list[SurveyImage], margin: float = 0.05,
               ground_z: float = 0.0, stride: int = 8) -> np.ndarray:
    """:func:`scene_box`'s box alone."""
    return scene_box(survey, images, margin, ground_z, stride)[0]


def scene_box(survey: Survey, images: list[SurveyImage], margin: float = 0.05,
              ground_z: float = 0.0, stride: int = 8) -> tuple[np.ndarray, str]:
    """Derive a block's (2, 3) AABB from its images, and where its heights came from
    (``"depth"``, ``"sfm-points"`` or ``"plan"``).

    With depth maps (``"depth"``): back-project every ``stride``-th pixel of every image with a
    known depth, take the 0.5 / 99.5 percentiles of the points per axis (robust to stray far
    pixels), and pad by ``margin`` of the size on every side.

    Without depth: intersect each camera's rays through a 5x5 grid of pixels with the ground
    plane ``z = ground_z`` (the local frame's origin height; rays above the horizon are cut
    at 3x the camera's height above ground) for the horizontal extent.  Vertically, when the
    survey has an SfM model (``sparse/0``, see :func:`citygen.partition.ground.load_box_points`)
    with at least ``MIN_HEIGHT_POINTS`` points over that extent (``"sfm-points"``): their
    height range (:func:`point_heights`: 0.5 percentile to the highest point), padded (:func:`padded_heights`) and kept ``CAMERA_CLEARANCE_M`` below
    the lowest camera -- a guessed ground sits metres off on real surveys (a take-off altitude
    is not the ground), and the points say where the surfaces are.  Otherwise (``"plan"``):
    ``[ground_z - 0.1 h, ground_z + 0.6 h]``, where ``h`` is the lowest camera's height above
    ground (buildings stay below the flight); the horizontal extent is padded by ``margin``.
    """
    points = []
    if all(im.depth is not None for im in images):
        pts = np.concatenate([depth_points(survey, im, stride) for im in images]) if images else np.zeros((0, 3))
        if len(pts) >= 8:
            lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
            return _pad(lo, hi, margin), "depth"
    cam_z = np.array([im.c2w[2, 3] for im in images])
    for im in images:
        cam = survey.camera_of(im)
        u, v = np.meshgrid(np.linspace(0, cam.width, 5), np.linspace(0, cam.height, 5))
        d = pixel_directions(cam, u.ravel(), v.ravel())
        d = d @ im.c2w[:3, :3].T
        o = im.c2w[:3, 3]
        height = o[2] - ground_z
        t = np.where(d[:, 2] < -1e-6, height / np.maximum(-d[:, 2], 1e-6), np.inf)
        t = np.minimum(t, 3.0 * abs(height) / np.linalg.norm(d, axis=-1))
        points.append(o + t[:, None] * d)
        points.append(o[None])
    sfm = load_box_points(survey.root)
    if sfm is not None and len(images):
        # the footprint as seen from the SfM ground: the points' own extent caps the rays there
        pts = np.concatenate(points)
        rect = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
        seen = point_heights(sfm, rect)
        if seen is not None:
            z0, z1 = padded_heights(seen)
            z1 = min(z1, float(cam_z.min()) - CAMERA_CLEARANCE_M)
            if z1 > z0:
                box = _pad(np.array([rect[0], rect[1], z0]), np.array([rect[2], rect[3], z1]), margin)
                box[:, 2] = (z0, z1)  # already padded
                return box, "sfm-points"
    h = float(cam_z.min() - ground_z) if len(images) else 0.0
    if h <= 0:
        raise CitygenError(survey.root, "cannot derive the scene bounds: a camera is below the ground plane z = "
                                        f"{ground_z}; pass an explicit AABB")
    pts = np.concatenate(points)
    z0, z1 = flight_heights(ground_z, float(cam_z.min()))
    lo = np.array([pts[:, 0].min(), pts[:, 1].min(), z0])
    hi = np.array([pts[:, 0].max(), pts[:, 1].max(), z1])
    return _pad(lo, hi, margin), "plan"


def _pad(lo: np.ndarray, hi: np.ndarray, margin: float) -> np.ndarray:
    size = np.maximum(hi - lo, 1e-3)
    return np.stack([lo - margin * size, hi + margin * size]).astype(np.float64)


__all__ = ["IGNORE_LABEL", "RayBatch", "RayDataset", "SparseDepth", "load_depth", "load_labels", "load_rgb",
           "load_sparse_depth", "load_survey", "read_pixel_masks", "scene_aabb", "scene_box", "select_images",
           "write_pixel_masks"]
