"""survey_io: survey imagery and georeferencing in, one :class:`Survey` out.

Knows nothing of the rest of citygen.  Every reader raises :class:`SurveyError`
(naming the file and the problem) on bad input.
"""

from .errors import SurveyError
from .georef import Georef, utm_epsg_for
from .nerfstudio import read_transforms, write_transforms
from .semantics import CLASSES, IGNORE_LABEL
from .survey import Camera, Survey, SurveyImage

__all__ = [
    "CLASSES", "IGNORE_LABEL", "Camera", "Georef", "Survey", "SurveyError", "SurveyImage",
    "read_transforms", "utm_epsg_for", "write_transforms",
]
