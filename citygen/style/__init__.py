"""Style transfer on the field: named styles, reference-image colour statistics per class,
and colour-branch fine-tuning with a style loss.  Styles act on the 3-D field (as
``restyle`` edits), so every view of a point gets the same stylized colour.

::

    add_style(tile_dir, named="sunset")
    add_style(tile_dir, reference="ref.jpg", classes=["building"])             # statistics
    add_style(tile_dir, reference="ref.jpg", method="optimize", weights=None)  # fine-tune colours
"""

from ..render.color import ColorTransform, HsvShift, TargetColor, lab_to_rgb, rgb_to_lab
from .apply import add_style, stats_transforms
from .named import NAMED_STYLES, named_style
from .stats import color_stats, match_statistics, mk_map, reinhard_map, scene_colors

__all__ = ["NAMED_STYLES", "ColorTransform", "HsvShift", "TargetColor", "add_style", "color_stats", "lab_to_rgb",
           "match_statistics", "mk_map", "named_style", "reinhard_map", "rgb_to_lab", "scene_colors",
           "stats_transforms"]
