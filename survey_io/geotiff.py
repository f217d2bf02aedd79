"""GeoTIFF read and write (rasterio), in the tile's projected CRS.

Arrays are row-major images: row 0 is the northern edge, column 0 the western edge, as in
every north-up GeoTIFF.  Multi-band arrays are band-last, ``(H, W, C)`` (like an RGB image),
and are written as C bands.  Files are written atomically (temp file + rename).

Cloud Optimized GeoTIFFs (:func:`cog_writer`) are written window by window into a tiled
staging GeoTIFF next to the target, then copied by GDAL's COG driver (internal tiles,
overviews): no step holds the whole raster, so memory does not grow with its size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from .atomic import atomic_path, scratch_path
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
    crs_str = _crs_string(crs)
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


def _crs_string(crs: str | int | Georef) -> str:
    return crs.crs if isinstance(crs, Georef) else (f"EPSG:{crs}" if isinstance(crs, int) else str(crs))


#: Side of the staging file's tiles; windows written in multiples of it fill whole tiles, so
#: GDAL never reads back a compressed tile to complete it.
STAGE_BLOCK = 256
#: Side of the COG's internal tiles (the COG driver's default).
COG_BLOCK = 512
#: GDAL's block cache while a COG is staged and copied, MB.  Left alone GDAL takes 5 % of the
#: RAM, which would make an export's peak memory depend on the machine rather than the window.
COG_CACHE_MB = 256


class WindowWriter:
    """Writes windows of a raster being staged by :func:`cog_writer`."""

    def __init__(self, dst, path: Path):
        self._dst, self._path = dst, path

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._dst.height, self._dst.width, self._dst.count

    def write(self, array: np.ndarray, row_off: int, col_off: int) -> None:
        """Write ``array`` ((h, w) or (h, w, C), band-last) with its top-left cell at
        (``row_off``, ``col_off``)."""
        # deferred: rasterio (see write_geotiff)
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        h, w, c = arr.shape
        height, width, count = self.shape
        if c != count or row_off < 0 or col_off < 0 or row_off + h > height or col_off + w > width:
            raise SurveyError(self._path, f"window {arr.shape} at row {row_off}, col {col_off} does not fit the "
                                          f"{height}x{width}x{count} raster")
        try:
            self._dst.write(np.moveaxis(arr.astype(self._dst.dtypes[0], copy=False), -1, 0),
                            window=Window(col_off, row_off, w, h))
        except RasterioError as err:
            raise SurveyError(self._path, f"cannot write GeoTIFF ({str(err).splitlines()[0][:200]})") from None


@contextlib.contextmanager
def cog_writer(path: str | Path, *, width: int, height: int, bands: int, dtype: str | np.dtype,
               crs: str | int | Georef, transform, nodata: float | None = None, alpha: bool = False,
               resampling: str = "average") -> Iterator[WindowWriter]:
    """Write a Cloud Optimized GeoTIFF window by window, atomically.

    Yields a :class:`WindowWriter`; windows go into a tiled staging GeoTIFF next to ``path``
    (fast deflate).  On a clean exit GDAL's COG driver copies it into ``path`` (deflate with a
    predictor, 512-pixel tiles, overviews down to one tile, made with ``resampling``:
    ``average`` for colour and heights, ``mode`` for class ids); on an exception nothing is
    written.  Memory: the caller's window plus GDAL's block cache (:data:`COG_CACHE_MB`).

    Args:
        bands, dtype: band count and sample type.
        alpha: the last band of a 4-band uint8 raster is alpha (RGBA).
        nodata: value marking empty cells.
    """
    # deferred: rasterio (see write_geotiff)
    import rasterio
    import rasterio.shutil
    from rasterio.errors import RasterioError

    path = Path(path)
    if width < 1 or height < 1 or bands < 1:
        raise SurveyError(path, f"GeoTIFF must have a positive size, got {width}x{height}x{bands}")
    out_dtype = np.dtype(dtype)
    profile = dict(driver="GTiff", width=width, height=height, count=bands, dtype=out_dtype.name,
                   crs=_crs_string(crs), transform=transform, nodata=nodata, tiled=True, blockxsize=STAGE_BLOCK,
                   blockysize=STAGE_BLOCK, compress="deflate", zlevel=1, bigtiff="IF_SAFER")
    if bands in (3, 4) and out_dtype == np.uint8:
        profile["photometric"] = "RGB"
        if bands == 4 and alpha:
            profile["alpha"] = "YES"

    def fail(err: Exception) -> SurveyError:
        return SurveyError(path, f"cannot write Cloud Optimized GeoTIFF ({str(err).splitlines()[0][:200]})")

    with rasterio.Env(GDAL_CACHEMAX=COG_CACHE_MB), atomic_path(path, suffix=".tif") as final, \
            scratch_path(path, suffix=".stage.tif") as stage:
        try:
            dst = rasterio.open(stage, "w", **profile)
        except (RasterioError, ValueError, TypeError) as err:
            raise fail(err) from None
        try:
            yield WindowWriter(dst, path)
        finally:
            dst.close()
        try:
            rasterio.shutil.copy(stage, final, driver="COG", compress="DEFLATE", predictor="YES",
                                 blocksize=COG_BLOCK, overview_resampling=resampling.upper(), bigtiff="IF_SAFER")
        except (RasterioError, ValueError, TypeError) as err:
            raise fail(err) from None


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
