"""The synthetic city survey: an independent procedural city, an exact ray-cast renderer and a
drone flight over it, written as a survey with full ground truth (depth, semantics, DSM, DTM,
true orthophoto, scene description).

    >>> from survey_io.synthetic import PRESETS, make_survey
    >>> survey = make_survey("out/tiny", PRESETS["tiny"], seed=0)

Modules: :mod:`.city` (scene), :mod:`.raycast` (ray casting), :mod:`.shading` (materials,
lighting, renderers), :mod:`.flight` (camera layouts, :func:`synthetic_flight`), :mod:`.exif`
(EXIF/XMP conventions), :mod:`.survey` (writer).
"""

from .flight import synthetic_flight
from .survey import PRESETS, SyntheticConfig, build_city, make_survey, plan_flight

__all__ = ["PRESETS", "SyntheticConfig", "build_city", "make_survey", "plan_flight", "synthetic_flight"]
