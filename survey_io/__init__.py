"""survey_io: survey imagery and georeferencing in, one :class:`Survey` out.

Knows nothing of the rest of citygen.  Every reader raises :class:`SurveyError`
(naming the file and the problem) on bad input.
"""

from .blocks_exchange import read_blocks_exchange, write_blocks_exchange
from .colmap import read_colmap, read_colmap_points, write_colmap
from .drone import read_drone_folder
from .errors import SurveyError
from .georef import Georef, utm_epsg_for
from .geotiff import GeoRaster, read_geotiff, write_geotiff
from .nerfstudio import read_transforms, write_transforms
from .semantics import CLASSES, IGNORE_LABEL
from .survey import Camera, Survey, SurveyImage

__all__ = [
    "CLASSES", "IGNORE_LABEL", "Camera", "Georef", "Survey", "SurveyError", "SurveyImage",
    "GeoRaster", "read_blocks_exchange", "read_colmap", "read_drone_folder", "read_geotiff", "write_geotiff", "read_colmap_points", "read_transforms", "utm_epsg_for",
    "write_blocks_exchange", "write_colmap", "write_transforms",
]
