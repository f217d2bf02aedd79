"""The in-memory survey: cameras (intrinsics), images with poses, georeferencing.

Every reader returns a :class:`Survey`; everything downstream consumes one.  Poses are
camera-to-world 4x4 float64 matrices in OpenCV convention (x right, y down, z forward)
in the local ENU frame of :attr:`Survey.georef`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SurveyError
from .georef import Georef
from .semantics import CLASSES

#: nerfstudio ``camera_model`` names citygen understands.
CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "OPENCV_FISHEYE", "SIMPLE_RADIAL", "RADIAL")


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics with optional distortion, nerfstudio field names."""

    width: int
    height: int
    fl_x: float
    fl_y: float
    cx: float
    cy: float
    camera_model: str = "PINHOLE"
    k1: float = 0.0
    k2: float = 0.0
    k3: float = 0.0
    k4: float = 0.0
    p1: float = 0.0
    p2: float = 0.0

    def __post_init__(self) -> None:
        vals = (self.fl_x, self.fl_y, self.cx, self.cy, self.k1, self.k2, self.k3, self.k4, self.p1, self.p2)
        if not np.all(np.isfinite(vals)) or self.fl_x <= 0 or self.fl_y <= 0:
            raise SurveyError(None, f"camera intrinsics must be finite with positive focal length: {self}")
        if self.width <= 0 or self.height <= 0:
            raise SurveyError(None, f"camera size must be positive, got {self.width}x{self.height}")
        if self.camera_model not in CAMERA_MODELS:
            raise SurveyError(None, f"unknown camera_model {self.camera_model!r} (known: {', '.join(CAMERA_MODELS)})")

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fl_x, 0, self.cx], [0, self.fl_y, self.cy], [0, 0, 1]], dtype=np.float64)

    @property
    def has_distortion(self) -> bool:
        return any((self.k1, self.k2, self.k3, self.k4, self.p1, self.p2))

    def scaled(self, factor: float) -> Camera:
        """The same camera for an image resized by ``factor`` (pixel-centre convention)."""
        return replace(
            self, width=round(self.width * factor), height=round(self.height * factor),
            fl_x=self.fl_x * factor, fl_y=self.fl_y * factor, cx=self.cx * factor, cy=self.cy * factor,
        )


@dataclass
class SurveyImage:
    """One image of the survey.

    Attributes:
        name: unique name, the image's path relative to :attr:`Survey.root` (posix).
        camera: index into :attr:`Survey.cameras`.
        c2w: 4x4 float64 camera-to-world, OpenCV convention, local frame.
        semantics: optional path of a uint8 label map (class ids, 255 = unlabelled).
        depth: optional path of a depth map (float32 metres along the optical axis, .npy or 16-bit PNG in mm).
        gps: optional GPS position of the camera in the local frame (a prior, metres).
        pose_is_prior: True when ``c2w`` comes from GPS/gimbal metadata only, not from SfM or ground truth.
    """

    name: str
    camera: int
    c2w: np.ndarray
    semantics: Path | None = None
    depth: Path | None = None
    gps: np.ndarray | None = None
    pose_is_prior: bool = False


@dataclass
class Survey:
    """A set of posed images in one georeferenced local frame."""

    root: Path
    cameras: list[Camera]
    images: list[SurveyImage]
    georef: Georef
    test_names: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = CLASSES

    def image_path(self, image: SurveyImage) -> Path:
        return self.root / image.name

    @property
    def train_images(self) -> list[SurveyImage]:
        held_out = set(self.test_names)
        return [im for im in self.images if im.name not in held_out]

    @property
    def test_images(self) -> list[SurveyImage]:
        held_out = set(self.test_names)
        return [im for im in self.images if im.name in held_out]

    def camera_of(self, image: SurveyImage) -> Camera:
        return self.cameras[image.camera]

    def validate(self, source: str | Path | None = None) -> Survey:
        """Check the invariants every reader promises; raise SurveyError naming ``source``."""
        source = source or self.root
        if not self.images:
            raise SurveyError(source, "survey has no images")
        seen: set[str] = set()
        for im in self.images:
            if im.name in seen:
                raise SurveyError(source, f"duplicate image name {im.name!r}")
            seen.add(im.name)
            check_relative_path(self.root, im.name, source)
            if not 0 <= im.camera < len(self.cameras):
                raise SurveyError(source, f"image {im.name!r} refers to camera {im.camera}, but there are {len(self.cameras)}")
            im.c2w = check_pose(im.c2w, source, what=f"pose of {im.name!r}")
        unknown = set(self.test_names) - seen
        if unknown:
            raise SurveyError(source, f"held-out names not in the survey: {sorted(unknown)[:3]}")
        return self

    def check_image_files(self, images: list[SurveyImage] | None = None) -> Survey:
        """Check that each image file (default: all) is an image of its camera's size.

        Reads headers only (Pillow opens lazily), so a survey of thousands of images is checked
        in seconds before any training or planning starts.  Without this a missing file, a
        non-image or a file whose pixel size disagrees with ``w``/``h`` would surface late, or
        (a size mismatch) not at all: the trainer resizes to the camera size.

        Raises:
            SurveyError: naming the image file: missing, empty, not an image, or the wrong size.
        """
        for im in self.images if images is None else images:
            path = self.image_path(im)
            cam = self.camera_of(im)
            try:
                if path.stat().st_size == 0:
                    raise SurveyError(path, "image file is empty (0 bytes)")
                with Image.open(path) as f:
                    size = f.size
            except FileNotFoundError:
                raise SurveyError(path, "image file not found") from None
            except UnidentifiedImageError:
                raise SurveyError(path, "not an image file (Pillow cannot identify it)") from None
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise SurveyError(path, f"unreadable image ({err})") from None
            if tuple(size) != (cam.width, cam.height):
                raise SurveyError(path, f"image is {size[0]}x{size[1]} pixels, but the survey says "
                                        f"{cam.width}x{cam.height} (w, h)")
        return self


def check_pose(c2w, source, what: str = "pose") -> np.ndarray:
    """A finite rigid 4x4 (rotation orthonormal with det +1, last row 0 0 0 1), as float64."""
    m = np.asarray(c2w, dtype=np.float64)
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4):
        raise SurveyError(source, f"{what} must be 4x4 (or 3x4), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise SurveyError(source, f"{what} contains NaN or inf")
    R = m[:3, :3]
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise SurveyError(source, f"{what} has last row {m[3].tolist()}, expected [0, 0, 0, 1]")
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise SurveyError(source, f"{what} is not rigid (rotation not orthonormal with det +1)")
    return m


def check_relative_path(root: Path, rel: str, source) -> Path:
    """``root / rel`` resolved; refuse paths that escape ``root`` (absolute, ``..``, symlink tricks)."""
    root_r = Path(root).resolve()
    p = (root_r / rel).resolve()
    if Path(rel).is_absolute() or (p != root_r and root_r not in p.parents):
        raise SurveyError(source, f"path {rel!r} escapes the dataset folder {root_r}")
    return p
