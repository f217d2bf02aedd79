"""GeoTIFF read and write (rasterio), in the tile's projected CRS.

Arrays are row-major images: row 0 is the northern edge, column 0 the western edge, as in
every north-up GeoTIFF.  Multi-band arrays are band-last, ``(H, W, C)`` (like an RGB image),
and are written as C bands.  Files are written atomically (temp file + rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from .atomic import atomic_path
from .errors import SurveyError
from .georef import Georef


@dataclass(frozen=True)
class GeoRaster:
    """A raster read from a GeoTIFF.

    Attributes:
        array: ``(H, W)`` for one band, ``(H, W, C)`` for several, in the file's dtype.
        crs: the CRS as a string (``"EPSG:32651"`` when it has an EPSG code, else WKT).
        transform: the affine pixel->CRS transform (``rasterio.Affine``); pixel (col, row)'s
            top-left corner is ``transform * (col, row)``.
        nodata: the nodata value, or None.
    """

    array: np.ndarray
    crs: str
    transform: object
    nodata: float | None

    @property
    def gsd(self) -> float:
        """Ground size of a pixel along x (metres for a projected CRS)."""
        return float(self.transform.a)

    def cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """CRS (x, y) of every cell centre, each of shape (H, W)."""
        h, w = self.array.shape[:2]
        cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        t = self.transform
        return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def north_up_transform(origin_xy: tuple[float, float], gsd: float):
    """Affine transform of a north-up grid whose top-left corner is ``origin_xy`` (CRS x, y)."""
    if not gsd > 0:
        raise SurveyError(None, f"GeoTIFF pixel size must be positive, got {gsd}")
    return Affine(float(gsd), 0.0, float(origin_xy[0]), 0.0, -float(gsd), float(origin_xy[1]))


def write_geotiff(
    path: str | Path,
    array: np.ndarray,
    *,
    crs: str | int | Georef,
    transform=None,
    origin_xy: tuple[float, float] | None = None,
    gsd: float | None = None,
    nodata: float | None = None,
    dtype: str | np.dtype | None = None,
) -> Path:
    """Write ``array`` as a (deflate-compressed, tiled when large) GeoTIFF, atomically.

    Args:
        path: the output file.
        array: ``(H, W)`` or band-last ``(H, W, C)``; row 0 is north.
        crs: a CRS string/EPSG int, or a :class:`Georef` (its CRS is used).
        transform: an affine pixel->CRS transform; or give ``origin_xy`` (CRS x, y of the
            top-left corner) and ``gsd`` (metres per pixel) for a north-up grid.
        nodata: value marking empty cells, stored in the file.
        dtype: output dtype (default: the array's).
    """
    # deferred: rasterio takes 0.6 s to import; `citygen --help` loads this module
    import rasterio

    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SurveyError(path, f"GeoTIFF array must be (H, W) or (H, W, C), got shape {np.shape(array)}")
    if transform is None:
        if origin_xy is None or gsd is None:
            raise SurveyError(path, "give either transform or origin_xy and gsd")
        transform = north_up_transform(origin_xy, gsd)
    crs_str = crs.crs if isinstance(crs, Georef) else (f"EPSG:{crs}" if isinstance(crs, int) else str(crs))
    out_dtype = np.dtype(dtype or arr.dtype)
    h, w, c = arr.shape
    profile = dict(driver="GTiff", width=w, height=h, count=c, dtype=out_dtype.name, crs=crs_str,
                   transform=transform, nodata=nodata, compress="deflate")
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if c == 3 and out_dtype == np.uint8:
        profile["photometric"] = "RGB"
    # deferred: rasterio (see write_geotiff)
    from rasterio.errors import RasterioError

    try:
        with atomic_path(path, suffix=".tif") as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.write(np.moveaxis(arr.astype(out_dtype, copy=False), -1, 0))
    except (RasterioError, ValueError, TypeError) as err:
        raise SurveyError(path, f"cannot write GeoTIFF ({str(err).splitlines()[0][:200]})") from None
    return path


def read_geotiff(path: str | Path) -> GeoRaster:
    """Read a GeoTIFF; raise :class:`SurveyError` if it is unreadable or has no CRS."""
    # deferred: rasterio takes 0.6 s to import; `citygen --help` loads this module
    import rasterio
    from rasterio.errors import RasterioError

    path = Path(path)
    if not path.is_file():
        raise SurveyError(path, "file not found")
    try:
        with rasterio.open(path) as src:
            data = src.read()
            crs, transform, nodata = src.crs, src.transform, src.nodata
    except (RasterioError, OSError) as err:
        raise SurveyError(path, f"not a readable GeoTIFF ({str(err).splitlines()[0][:200]})") from None
    if crs is None:
        raise SurveyError(path, "GeoTIFF has no CRS")
    if transform.is_identity:
        # rasterio's stand-in when the file has no geotransform: pixel (col, row) would be CRS metres
        raise SurveyError(path, "GeoTIFF has a CRS but no georeferencing transform (pixel to CRS)")
    epsg = crs.to_epsg()
    crs_str = f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()
    array = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    return GeoRaster(array=array, crs=crs_str, transform=transform, nodata=nodata)
