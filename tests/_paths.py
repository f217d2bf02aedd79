"""Test data shipped inside the repository (``tests/data/``), so a fresh clone in an empty
folder passes its tests: no test reads anything outside the checkout."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
#: 40 real drone JPEGs with GPS EXIF, CC0 (see its README.txt and tests/data/README.md).
CALITERRA = DATA / "caliterra"
