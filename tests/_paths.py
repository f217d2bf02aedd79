"""Where the shared test data lives: ``shared/`` beside the repository (CI's clean clones and
the development checkouts both have it there); ``CITYGEN_SHARED`` overrides."""

import os
from pathlib import Path

SHARED = Path(os.environ.get("CITYGEN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
#: 40 real drone JPEGs with GPS EXIF (see its README.txt).
CALITERRA = SHARED / "data" / "real" / "caliterra"
