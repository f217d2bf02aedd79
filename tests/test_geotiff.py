"""survey_io.geotiff: round trips through rasterio, and clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from survey_io import Georef, SurveyError
from survey_io.geotiff import read_geotiff, write_geotiff


def test_single_band_round_trip_matches_rasterio(tmp_path):
    rng = np.random.default_rng(0)
    dem = rng.normal(20.0, 5.0, size=(37, 53)).astype(np.float32)
    path = write_geotiff(tmp_path / "dem.tif", dem, crs="EPSG:32651", origin_xy=(355000.0, 3456000.0), gsd=0.5,
                         nodata=-9999.0)
    with rasterio.open(path) as src:  # read with rasterio itself, not our reader
        assert src.crs.to_epsg() == 32651
        assert src.count == 1 and src.dtypes[0] == "float32"
        assert (src.width, src.height) == (53, 37)
        assert src.transform.c == 355000.0 and src.transform.f == 3456000.0
        assert src.transform.a == 0.5 and src.transform.e == -0.5
        assert src.nodata == -9999.0
        np.testing.assert_array_equal(src.read(1), dem)
        # the centre of pixel (col 3, row 2) in CRS coordinates
        x, y = src.xy(2, 3)
        assert (x, y) == (355000.0 + 3.5 * 0.5, 3456000.0 - 2.5 * 0.5)
    r = read_geotiff(path)
    assert r.crs == "EPSG:32651" and r.nodata == -9999.0 and r.gsd == 0.5
    np.testing.assert_array_equal(r.array, dem)
    cx, cy = r.cell_centers()
    assert cx[2, 3] == 355000.0 + 3.5 * 0.5 and cy[2, 3] == 3456000.0 - 2.5 * 0.5
    assert not list(tmp_path.glob(".*")), "temp files left behind"


def test_rgb_band_last_round_trip_with_georef_and_transform(tmp_path):
    from affine import Affine

    rgb = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    georef = Georef("EPSG:32651", (355000.0, 3456000.0, 14.0))
    transform = Affine(2.0, 0.0, 354900.0, 0.0, -2.0, 3456100.0)
    path = write_geotiff(tmp_path / "rgb.tif", rgb, crs=georef, transform=transform)
    with rasterio.open(path) as src:
        assert src.count == 3 and src.crs.to_epsg() == 32651 and src.transform == transform
        np.testing.assert_array_equal(src.read(2), rgb[:, :, 1])
    np.testing.assert_array_equal(read_geotiff(path).array, rgb)


def test_dtype_conversion(tmp_path):
    a = np.linspace(0, 10, 12, dtype=np.float64).reshape(3, 4)
    r = read_geotiff(write_geotiff(tmp_path / "a.tif", a, crs=32651, origin_xy=(1000.0, 2000.0), gsd=1.0,
                                   dtype="float32"))
    assert r.array.dtype == np.float32
    np.testing.assert_allclose(r.array, a, rtol=1e-6)


def test_corrupt_file_raises_survey_error_naming_it(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not really a tiff")
    with pytest.raises(SurveyError) as err:
        read_geotiff(bad)
    assert "broken.tif" in str(err.value)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_missing_file_and_missing_crs(tmp_path):
    with pytest.raises(SurveyError, match="not found"):
        read_geotiff(tmp_path / "nope.tif")
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=4, height=3, count=1, dtype="uint8") as dst:
        dst.write(np.zeros((1, 3, 4), np.uint8))
    with pytest.raises(SurveyError, match="no CRS") as err:
        read_geotiff(plain)
    assert "plain.tif" in str(err.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(SurveyError, match="shape"):
        write_geotiff(tmp_path / "x.tif", np.zeros(5), crs=32651, origin_xy=(0, 0), gsd=1.0)
    with pytest.raises(SurveyError, match="transform"):
        write_geotiff(tmp_path / "x.tif", np.zeros((2, 2)), crs=32651)
    with pytest.raises(SurveyError, match="positive"):
        write_geotiff(tmp_path / "x.tif", np.zeros((2, 2)), crs=32651, origin_xy=(0, 0), gsd=0.0)
    with pytest.raises(SurveyError, match="x.tif"):
        write_geotiff(tmp_path / "x.tif", np.zeros((2, 2)), crs="EPSG:999999", origin_xy=(10, 20), gsd=1.0)
    assert not (tmp_path / "x.tif").exists()
    assert not list(tmp_path.glob(".*")), "temp files left behind"
