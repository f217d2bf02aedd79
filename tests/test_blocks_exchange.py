"""BlocksExchange XML: round trip, hand-written files with known answers, bad files."""

from __future__ import annotations

import numpy as np
import pyproj
import pytest

from survey_io import Camera, Georef, Survey, SurveyError, SurveyImage
from survey_io.blocks_exchange import opk_to_matrix, read_blocks_exchange, write_blocks_exchange

GEOREF = Georef("EPSG:32633", (500000.0, 5000000.0, 100.0))


def _survey(tmp_path) -> Survey:
    rng = np.random.default_rng(3)
    cams = [Camera(640, 480, 500.0, 510.0, 320.5, 240.25, "OPENCV", k1=0.01, k2=-0.002, k3=1e-4, p1=3e-4, p2=1e-4),
            Camera(320, 240, 250.0, 250.0, 160.0, 120.0, "PINHOLE")]
    images = []
    for i in range(5):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = R, rng.uniform(-300, 300, 3)
        images.append(SurveyImage(f"photos/{i}.jpg", i % 2, c2w))
    return Survey(tmp_path / "data", cams, images, GEOREF, test_names=[])


def test_round_trip(tmp_path):
    survey = _survey(tmp_path)
    xml = write_blocks_exchange(survey, tmp_path / "out" / "block.xml")
    back = read_blocks_exchange(xml, georef=GEOREF)
    assert back.root.resolve() == survey.root.resolve()  # via BaseImagePath
    assert sorted(im.name for im in back.images) == sorted(im.name for im in survey.images)
    by_name = {im.name: im for im in back.images}
    for im in survey.images:
        got = by_name[im.name]
        # rotations are exact; centres go through CRS = local + origin, so float64 round-off of ~1e-10 m
        np.testing.assert_array_equal(got.c2w[:3, :3], im.c2w[:3, :3])
        np.testing.assert_allclose(got.c2w[:3, 3], im.c2w[:3, 3], rtol=0, atol=1e-9)
        assert back.cameras[got.camera] == survey.cameras[im.camera]


def test_default_georef_is_the_projected_srs_at_the_mean_centre(tmp_path):
    survey = _survey(tmp_path)
    xml = write_blocks_exchange(survey, tmp_path / "block.xml")
    back = read_blocks_exchange(xml)
    assert back.georef.crs == "EPSG:32633"
    crs_centres = np.array([GEOREF.local_to_crs(im.c2w[:3, 3]) for im in survey.images])
    np.testing.assert_array_equal(back.georef.origin, np.round(crs_centres.mean(0)))
    by_name = {im.name: im for im in back.images}
    for b in survey.images:
        a = by_name[b.name]
        np.testing.assert_allclose(back.georef.local_to_crs(a.c2w[:3, 3]), GEOREF.local_to_crs(b.c2w[:3, 3]), atol=1e-9)


NADIR_XML = """<?xml version="1.0" encoding="utf-8"?>
<BlocksExchange version="2.1">
  <SpatialReferenceSystems>
    <SRS><Id>7</Id><Name>UTM 33N</Name><Definition>{srs}</Definition></SRS>
  </SpatialReferenceSystems>
  <Block>
    <SRSId>7</SRSId>
    <Photogroups>
      <Photogroup>
        <Name>drone</Name>
        <ImageDimensions><Width>4000</Width><Height>3000</Height></ImageDimensions>
        <FocalLength>8.8</FocalLength>
        <SensorSize>13.2</SensorSize>
        <CameraOrientation>{orientation}</CameraOrientation>
        <PrincipalPoint><x>1999.5</x><y>1501.5</y></PrincipalPoint>
        <Photo>
          <Id>1</Id>
          <ImagePath>DJI_0001.JPG</ImagePath>
          <Pose>
            <Rotation>{rotation}</Rotation>
            <Center><x>400123.5</x><y>5100456.25</y><z>250</z></Center>
          </Pose>
          <ExifData><Make>DJI</Make></ExifData>
        </Photo>
      </Photogroup>
    </Photogroups>
  </Block>
</BlocksExchange>
"""
# A nadir camera, image top towards north: camera x = east, y (down the image) = south, z (forward) = down.
NADIR_W2C_CV = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])
MATRIX = "".join(f"<M_{i}{j}>{v}</M_{i}{j}>" for i, row in enumerate(NADIR_W2C_CV) for j, v in enumerate(row))


@pytest.mark.parametrize("orientation,rotation", [
    ("XRightYDown", MATRIX),
    # The same camera with photogrammetry's axes (y up, z backwards): M = diag(1, -1, -1) @ above = identity.
    ("XRightYUp", "".join(f"<M_{i}{j}>{float(i == j)}</M_{i}{j}>" for i in range(3) for j in range(3))),
    # Omega = 180: Rx(180) = diag(1, -1, -1), the XRightYDown nadir matrix.
    ("XRightYDown", "<Omega>180</Omega><Phi>0</Phi><Kappa>0</Kappa>"),
], ids=["matrix", "xright-yup", "opk"])
def test_hand_written_nadir_camera(tmp_path, orientation, rotation):
    xml = tmp_path / "at.xml"
    xml.write_text(NADIR_XML.format(srs="EPSG:32633", orientation=orientation, rotation=rotation))
    survey = read_blocks_exchange(xml, georef=GEOREF)
    (im,) = survey.images
    assert im.name == "DJI_0001.JPG" and survey.root == tmp_path
    expected = np.eye(4)
    expected[:3, :3] = np.array([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])  # columns: east, south, down
    expected[:3, 3] = [400123.5 - 500000.0, 5100456.25 - 5000000.0, 150.0]
    np.testing.assert_allclose(im.c2w, expected, atol=1e-12)
    cam = survey.cameras[0]
    assert cam.fl_x == pytest.approx(8.8 / 13.2 * 4000) and cam.fl_y == cam.fl_x
    assert (cam.cx, cam.cy) == (2000.0, 1502.0)  # pixel-centre origin -> nerfstudio's corner origin
    assert cam.camera_model == "PINHOLE"


def test_windows_paths_from_another_machine(tmp_path):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    (images / "DJI_0001.JPG").write_bytes(b"")
    xml = tmp_path / "at.xml"
    text = NADIR_XML.format(srs="EPSG:32633", orientation="XRightYDown", rotation=MATRIX)
    xml.write_text(text.replace("DJI_0001.JPG", "D:\\CC_Workspace\\Block_1\\DJI_0001.JPG"))
    assert read_blocks_exchange(xml, images_root=images).images[0].name == "DJI_0001.JPG"
    with pytest.raises(SurveyError, match="pass images_root"):
        read_blocks_exchange(xml)  # the XML's folder does not hold DJI_0001.JPG
    xml.write_text(text.replace("DJI_0001.JPG", "sub\\DJI_0001.JPG"))
    assert read_blocks_exchange(xml, images_root=images).images[0].name == "sub/DJI_0001.JPG"


def test_opk_formula_reproduces_bentley_sample():
    """Bentley's annotated sample gives both a matrix and the equivalent Omega/Phi/Kappa."""
    sample = np.array([[-0.9999982912233401, -0.001636319085375301, -0.0008602425863163225],
                       [-0.001631068695467463, 0.9999802528616577, -0.00606906089589293],
                       [0.0008701565192966738, -0.006067647409696231, -0.9999812130648239]])
    np.testing.assert_allclose(opk_to_matrix(179.6523471469934, 0.04985630236313049, 179.9065465708369),
                               sample, atol=1e-10)


def test_wkt_definition_is_accepted(tmp_path):
    wkt = pyproj.CRS.from_epsg(32633).to_wkt()
    xml = tmp_path / "at.xml"
    xml.write_text(NADIR_XML.format(srs=wkt, orientation="XRightYDown", rotation=MATRIX))
    survey = read_blocks_exchange(xml)
    assert survey.georef.epsg == 32633
    assert survey.georef.origin == (400124.0, 5100456.0, 250.0)  # the single centre, rounded
    np.testing.assert_allclose(survey.images[0].c2w[:3, 3], [-0.5, 0.25, 0.0], atol=1e-12)


def _grid_north_angle(crs: str, lon: float, lat: float) -> float:
    """Angle (radians, counter-clockwise from grid +y) of true north in ``crs``, by pyproj directly."""
    tr = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    e0, n0 = tr.transform(lon, lat)
    e1, n1 = tr.transform(lon, lat + 1e-5)
    return float(np.arctan2(-(e1 - e0), n1 - n0))


def test_enu_srs_goes_to_utm_with_meridian_convergence(tmp_path):
    """ContextCapture's ENU:<lat>,<lon> frame: a nadir camera above the ENU origin lands in UTM rotated by
    the meridian convergence (true north is not grid north off the central meridian)."""
    lat, lon = 48.85, 2.35  # Paris, UTM 31N (central meridian 3E)
    xml = tmp_path / "enu.xml"
    text = NADIR_XML.format(srs=f"ENU:{lat},{lon}", orientation="XRightYDown", rotation=MATRIX)
    text = text.replace("<x>400123.5</x><y>5100456.25</y><z>250</z>", "<x>0</x><y>0</y><z>120</z>")
    xml.write_text(text)
    survey = read_blocks_exchange(xml)
    assert survey.georef.crs == "EPSG:32631"
    c2w = survey.images[0].c2w
    # position: independent pyproj transform of (lon, lat, 120 m ellipsoidal)
    e, n, h = pyproj.Transformer.from_crs("EPSG:4979", "EPSG:32631", always_xy=True).transform(lon, lat, 120.0)
    np.testing.assert_allclose(survey.georef.local_to_crs(c2w[:3, 3]), [e, n, h], atol=1e-6)
    # rotation: still nadir; the image's "up" (-y) points to true north, i.e. rotated by the convergence
    gamma = _grid_north_angle("EPSG:32631", lon, lat)
    assert abs(gamma) > np.radians(0.3)  # off the central meridian: a real test of the rotation
    np.testing.assert_allclose(c2w[:3, 2], [0, 0, -1], atol=1e-9)
    up_in_image = -c2w[:3, 1]
    np.testing.assert_allclose(up_in_image[:2], [-np.sin(gamma), np.cos(gamma)], atol=1e-7)


def test_geographic_srs_centre_is_lon_lat(tmp_path):
    xml = tmp_path / "geo.xml"
    text = NADIR_XML.format(srs="EPSG:4326", orientation="XRightYDown", rotation=MATRIX)
    text = text.replace("<x>400123.5</x><y>5100456.25</y><z>250</z>", "<x>-83.0064</x><y>39.9752</y><z>157.9</z>")
    xml.write_text(text)
    survey = read_blocks_exchange(xml)
    assert survey.georef.crs == "EPSG:32617"
    lonlat = survey.georef.local_to_lonlat(survey.images[0].c2w[:3, 3])
    np.testing.assert_allclose(lonlat, [-83.0064, 39.9752, 157.9], atol=1e-7)
    np.testing.assert_allclose(survey.images[0].c2w[:3, 2], [0, 0, -1], atol=1e-9)


def test_local_block_needs_a_georef(tmp_path):
    xml = tmp_path / "local.xml"
    xml.write_text(NADIR_XML.format(srs="EPSG:32633", orientation="XRightYDown", rotation=MATRIX)
                   .replace("<SRSId>7</SRSId>", ""))
    with pytest.raises(SurveyError, match="no georeferencing") as err:
        read_blocks_exchange(xml)
    assert str(xml) in str(err.value)
    survey = read_blocks_exchange(xml, georef=GEOREF)  # then the coordinates are that georef's local frame
    np.testing.assert_allclose(survey.images[0].c2w[:3, 3], [400123.5, 5100456.25, 250.0])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t[: len(t) // 2], "not valid XML"),
    (lambda t: t.replace("EPSG:32633", "EPSG:999999"), "unknown or unsupported spatial reference system"),
    (lambda t: t.replace("EPSG:32633", "ENU:abc"), "cannot read the ENU origin"),
    (lambda t: t.replace("<SRSId>7</SRSId>", "<SRSId>3</SRSId>"), "SRSId 3 is not defined"),
    (lambda t: t[: t.index("<Pose>")] + t[t.index("</Pose>") + 7:], "missing <Pose>"),
    (lambda t: t.replace("<M_00>1.0</M_00>", "<M_00>2.0</M_00>"), "not rigid"),
    (lambda t: t.replace("<M_00>1.0</M_00>", "<M_00>nan</M_00>"), "not finite"),
    (lambda t: t.replace("<M_00>1.0</M_00>", ""), "missing <M_00>"),
    (lambda t: t.replace("<SensorSize>13.2</SensorSize>", ""), "needs <SensorSize> or <PixelSize>"),
    (lambda t: t.replace("XRightYDown", "XSidewaysYDown"), "unknown CameraOrientation"),
    (lambda t: t.replace("<Width>4000</Width>", "<Width>-4</Width>"), "ImageDimensions"),
    (lambda t: t.replace("DJI_0001.JPG", "../outside.jpg"), "escapes the dataset folder"),
    (lambda t: t.replace("<Block>", "<Block><Photogroups/></Block><Block>"), "exactly one <Block>"),
    (lambda t: t.replace("BlocksExchange", "SomethingElse"), "expected <BlocksExchange>"),
])
def test_bad_files_name_the_file_and_problem(tmp_path, edit, message):
    xml = tmp_path / "bad.xml"
    xml.write_text(edit(NADIR_XML.format(srs="EPSG:32633", orientation="XRightYDown", rotation=MATRIX)))
    with pytest.raises(SurveyError) as err:
        read_blocks_exchange(xml)
    assert str(xml) in str(err.value)
    assert message in str(err.value)


# A photo of a real ContextCapture AT export (DJI Phantom 4 Pro over Goodale Park, Columbus OH), quoted in a
# public dataset README: the AT pose in the block's ENU SRS and the GPS/gimbal pose in its EPSG:4326 metadata.
REAL_AT_POSE = """<Rotation><M_00>-0.234602658410435</M_00><M_01>0.971058900239015</M_01>
<M_02>0.0447906790900752</M_02><M_10>0.437332200289725</M_10><M_11>0.146583148425574</M_11>
<M_12>-0.887273310309397</M_12><M_20>-0.868160203681617</M_20><M_21>-0.188568271096278</M_21>
<M_22>-0.45906412175126</M_22></Rotation>"""
REAL_GPS_POSE = """<Rotation><M_00>-0.21473532751176</M_00><M_01>0.976672278258382</M_01>
<M_02>9.0396468088727e-11</M_02><M_10>0.503023409651369</M_10><M_11>0.110596869696836</M_11>
<M_12>-0.857167300913872</M_12><M_20>-0.837171540642136</M_20><M_21>-0.18406410104864</M_21>
<M_22>-0.515038074557627</M_22></Rotation>"""


def test_real_export_enu_pose_agrees_with_its_gps_metadata(tmp_path):
    """The AT pose (ENU SRS) and the GPS/gimbal pose (geographic SRS) of one photo must land together."""
    def read(srs, rotation, center):
        text = NADIR_XML.format(srs=srs, orientation="XRightYDown", rotation="R")
        text = text.replace("<Rotation>R</Rotation>", rotation)
        text = text.replace("<x>400123.5</x><y>5100456.25</y><z>250</z>", center)
        xml = tmp_path / f"{len(list(tmp_path.iterdir()))}.xml"
        xml.write_text(text)
        return read_blocks_exchange(xml, georef=Georef.from_lonlat(-83.0068, 39.9752))

    at = read("ENU:39.97523,-83.00678", REAL_AT_POSE,
              "<x>29.9350296852194</x><y>4.36444716951105</y><z>127.390985712561</z>").images[0].c2w
    gps = read("EPSG:4326", REAL_GPS_POSE,
               "<x>-83.0064163888889</x><y>39.9752701666667</y><z>157.918</z>").images[0].c2w
    assert np.hypot(*(at[:2, 3] - gps[:2, 3])) < 3.0  # AT vs consumer GPS: metres
    cos_angle = (np.trace(at[:3, :3].T @ gps[:3, :3]) - 1) / 2
    assert np.degrees(np.arccos(np.clip(cos_angle, -1, 1))) < 6.0  # AT vs gimbal: a few degrees
    assert at[2, 2] < -0.4 and gps[2, 2] < -0.4  # both look down (the gimbal was pitched about 30 degrees)
