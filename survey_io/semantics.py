"""Semantic classes shared by the synthetic city, the semantic head and editing."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SurveyError

#: Default classes, by id (DESIGN.md). Label maps are uint8 PNGs holding these ids.
CLASSES: tuple[str, ...] = ("ground", "road", "building", "vegetation", "water", "vehicle", "other")
#: Display colours (RGB) for the default classes, used by legends and label PNG previews.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 110, 90), (70, 70, 75), (220, 80, 60), (60, 160, 60), (50, 110, 200), (240, 210, 40), (180, 180, 180),
)
#: Pixels with this value in a label map carry no label (ignored by losses and metrics).
IGNORE_LABEL = 255


def load_label_map(path: str | Path) -> tuple[str, ...]:
    """Read a JSON label map ``{"0": "ground", ..., "7": "bridge"}``; ids must be 0..N-1."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        ids = sorted(int(k) for k in raw)
    except (OSError, ValueError, TypeError) as err:
        raise SurveyError(path, f"not a readable JSON label map ({err})") from None
    if ids != list(range(len(ids))) or not ids:
        raise SurveyError(path, "label ids must be 0..N-1 without gaps")
    if len(ids) >= IGNORE_LABEL:
        raise SurveyError(path, f"at most {IGNORE_LABEL} classes")
    return tuple(str(raw[str(i)]) for i in ids)
