"""Named styles (time of day, season, looks): per-class colour transforms, the same mechanism
as the statistics-based transfer, so they too are ``restyle`` edits applied in the field.

Each style maps a class name (or ``"*"``: every other class and the sky) to an affine RGB
map ``c -> M c + b``.  They are hand-tuned looks, not physical relighting: shadows and sun
direction stay those of the survey.
"""

from __future__ import annotations

from ..errors import CitygenError
from ..render.color import ColorTransform, hue_rotation_matrix, saturation_matrix


def _diag(r, g, b):
    return [[r, 0.0, 0.0], [0.0, g, 0.0], [0.0, 0.0, b]]


def _mul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _t(matrix, offset=(0.0, 0.0, 0.0)) -> dict:
    return {"space": "rgb", "matrix": [list(map(float, r)) for r in matrix], "offset": [float(v) for v in offset]}


SEPIA = [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]]

#: name -> {class name or "*": transform dict}
NAMED_STYLES: dict[str, dict[str, dict]] = {
    "sunset": {"*": _t(_mul(_diag(1.15, 0.88, 0.62), saturation_matrix(1.15)), (0.04, 0.0, -0.02)),
               "water": _t(_diag(1.1, 0.8, 0.75), (0.08, 0.02, 0.0))},
    "dawn": {"*": _t(_mul(_diag(1.05, 0.92, 0.95), saturation_matrix(0.85)), (0.05, 0.02, 0.06))},
    "noon": {"*": _t(_mul(_diag(1.05, 1.05, 1.02), saturation_matrix(1.1)), (0.0, 0.0, 0.0))},
    "night": {"*": _t(_mul(_diag(0.22, 0.27, 0.42), saturation_matrix(0.5)), (0.0, 0.01, 0.04)),
              "building": _t(_mul(_diag(0.45, 0.38, 0.28), saturation_matrix(0.6)), (0.05, 0.03, 0.0)),
              "road": _t(_mul(_diag(0.35, 0.3, 0.22), saturation_matrix(0.3)), (0.03, 0.02, 0.0))},
    "winter": {"*": _t(_mul(_diag(0.95, 0.98, 1.08), saturation_matrix(0.55)), (0.03, 0.04, 0.06)),
               "ground": _t(_mul(_diag(0.25, 0.25, 0.27), saturation_matrix(0.0)), (0.7, 0.72, 0.76)),
               "vegetation": _t(_mul(_diag(0.35, 0.35, 0.38), saturation_matrix(0.2)), (0.55, 0.57, 0.62)),
               "water": _t(_mul(_diag(0.5, 0.55, 0.6), saturation_matrix(0.3)), (0.35, 0.42, 0.5))},
    "autumn": {"vegetation": _t(_mul(hue_rotation_matrix(-85.0), saturation_matrix(1.2)), (0.03, 0.0, 0.0)),
               "*": _t(_diag(1.03, 1.0, 0.93))},
    "overcast": {"*": _t(_mul(_diag(0.85, 0.87, 0.9), saturation_matrix(0.6)), (0.08, 0.08, 0.09))},
    "sepia": {"*": _t(SEPIA)},
    "grayscale": {"*": _t(saturation_matrix(0.0))},
}


def named_style(name: str, classes: list[str] | None = None) -> dict[str, dict]:
    """The transforms of a named style (restricted to ``classes`` when given: ``"*"`` then
    becomes each listed class that has no entry of its own)."""
    if name not in NAMED_STYLES:
        raise CitygenError(None, f"unknown style {name!r} (known: {', '.join(sorted(NAMED_STYLES))})")
    style = {k: dict(v) for k, v in NAMED_STYLES[name].items()}
    for t in style.values():
        ColorTransform.from_dict(t)  # well-formed
    if classes is None:
        return style
    out = {c: style[c] for c in classes if c in style}
    if "*" in style:
        out.update({c: style["*"] for c in classes if c not in out})
    return out


__all__ = ["NAMED_STYLES", "named_style"]
