"""EXIF + DJI-style XMP metadata of the synthetic drone images (what a drone-folder reader parses).

What is written, per JPEG (the pose is exact; nothing is rounded beyond what is stated):

EXIF (Pillow, IFD0 / Exif IFD / GPS IFD 0x8825)
    Make ``"citygen"``, Model ``"synthetic-pinhole"``, Software, DateTime / DateTimeOriginal
    (``"YYYY:MM:DD HH:MM:SS"``, a fixed start plus 2 s per image); FocalLength (mm, rational
    with denominator 10^6) of a camera whose sensor is ``SENSOR_WIDTH_MM`` wide;
    FocalLengthIn35mmFilm (``round(fl_x / width * 36)``); FocalPlaneX/YResolution (pixels per cm,
    unit 3) so that ``fl_x [px] = FocalLength * FocalPlaneXResolution / 10`` exactly;
    ExifImageWidth / Height.
    GPS: GPSLatitude/Ref, GPSLongitude/Ref as degrees, minutes, seconds (seconds rational with
    denominator 10^6, so better than 1e-9 degrees); GPSAltitude/Ref = the camera's **WGS84
    ellipsoidal height** (EPSG:4979, not MSL), metres, denominator 1000; GPSMapDatum "WGS-84".

XMP (JPEG APP1 ``http://ns.adobe.com/xap/1.0/``), namespace ``drone-dji`` = ``http://www.dji.com/drone-dji/1.0/``
    GimbalPitchDegree: -90 = nadir, 0 = horizontal, positive = up.
    GimbalYawDegree: camera heading, degrees clockwise from **true north**, in [-180, 180).  For a
        nadir image it is the direction the top of the image points; otherwise the horizontal
        direction of the optical axis.  The local frame's +Y is *grid* north of the UTM CRS;
        ``yaw_true = yaw_grid - convergence`` where ``convergence`` is the grid azimuth of true
        north at the camera (see :func:`grid_convergence_deg`; about -0.8 deg at Shanghai in EPSG:32651).
    GimbalRollDegree: 0.  FlightYawDegree = GimbalYawDegree, FlightPitchDegree = FlightRollDegree = 0.
    AbsoluteAltitude: same ellipsoidal height as GPSAltitude.  RelativeAltitude: height above the
        take-off point (the georef origin, where the local ground height is 0), i.e. local z.
    GpsLatitude, GpsLongitude (and DJI's misspelt GpsLongtitude): decimal degrees.
    CalibratedFocalLength (pixels), CalibratedOpticalCenterX / Y (pixels): exact intrinsics.
    All numbers carry a sign and 6+ decimals (DJI writes 2).

Camera from these (the inverse a reader applies): optical axis
``z = (sin(yaw_g) cos(pitch), cos(yaw_g) cos(pitch), sin(pitch))`` in ENU with ``yaw_g = yaw_true +
convergence``, image x axis ``(cos(yaw_g), -sin(yaw_g), 0)``, y = z x x (OpenCV axes).
"""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from ..georef import Georef
from ..survey import Camera
from .flight import c2w_to_gimbal

SENSOR_WIDTH_MM = 13.2  # a 1-inch sensor, as on common survey drones
MAKE, MODEL = "citygen", "synthetic-pinhole"
START_TIME = _dt.datetime(2026, 6, 21, 10, 0, 0)
DJI_NS = "http://www.dji.com/drone-dji/1.0/"


def grid_convergence_deg(georef: Georef, lon: float, lat: float) -> float:
    """Grid azimuth (degrees clockwise from grid north, the local +Y) of true north at (lon, lat)."""
    a = georef.lonlat_to_local(np.array([[lon, lat - 1e-5, 0.0], [lon, lat + 1e-5, 0.0]]))
    d = a[1] - a[0]
    return math.degrees(math.atan2(d[0], d[1]))


def _rational(value: float, den: int):
    return IFDRational(round(value * den), den)


def _dms(deg: float):
    deg = abs(deg)
    d = int(deg)
    m = int((deg - d) * 60)
    s = (deg - d - m / 60.0) * 3600.0
    return (_rational(d, 1), _rational(m, 1), _rational(s, 10**6))


def image_metadata(c2w: np.ndarray, camera: Camera, georef: Georef, index: int) -> tuple[bytes, bytes, dict]:
    """(EXIF bytes, XMP packet bytes, the values written) of image ``index`` with pose ``c2w``."""
    lon, lat, h = (float(v) for v in georef.local_to_lonlat(np.asarray(c2w)[:3, 3]))
    yaw_grid, pitch, roll = c2w_to_gimbal(c2w)
    if abs(roll) > 1e-6:
        raise ValueError("synthetic cameras have zero gimbal roll")
    yaw = (yaw_grid - grid_convergence_deg(georef, lon, lat) + 180.0) % 360.0 - 180.0
    rel_alt = float(np.asarray(c2w)[2, 3])
    when = (START_TIME + _dt.timedelta(seconds=2 * index)).strftime("%Y:%m:%d %H:%M:%S")
    focal_mm = camera.fl_x * SENSOR_WIDTH_MM / camera.width
    px_per_cm = camera.width / (SENSOR_WIDTH_MM / 10.0)

    exif = Image.Exif()
    exif[0x010F] = MAKE
    exif[0x0110] = MODEL
    exif[0x0131] = "citygen synth"
    exif[0x0132] = when
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = when
    sub[0x9004] = when
    sub[0x920A] = _rational(focal_mm, 10**6)
    sub[0xA405] = round(camera.fl_x / camera.width * 36.0)
    sub[0xA20E] = _rational(px_per_cm, 10**6)
    sub[0xA20F] = _rational(camera.height / (SENSOR_WIDTH_MM * camera.height / camera.width / 10.0)
                            * camera.fl_y / camera.fl_x, 10**6)
    sub[0xA210] = 3
    sub[0xA002] = camera.width
    sub[0xA003] = camera.height
    gps = exif.get_ifd(0x8825)
    gps[0x00] = b"\x02\x03\x00\x00"
    gps[0x01] = "N" if lat >= 0 else "S"
    gps[0x02] = _dms(lat)
    gps[0x03] = "E" if lon >= 0 else "W"
    gps[0x04] = _dms(lon)
    gps[0x05] = b"\x00" if h >= 0 else b"\x01"
    gps[0x06] = _rational(abs(h), 1000)
    gps[0x12] = "WGS-84"

    values = dict(lon=lon, lat=lat, ellipsoidal_height=h, relative_altitude=rel_alt, gimbal_yaw=yaw,
                  gimbal_pitch=pitch, gimbal_roll=0.0, datetime=when, focal_mm=focal_mm,
                  focal_35mm=round(camera.fl_x / camera.width * 36.0))
    attrs = {
        "tiff:Make": MAKE, "tiff:Model": MODEL,
        "drone-dji:AbsoluteAltitude": f"{h:+.4f}", "drone-dji:RelativeAltitude": f"{rel_alt:+.4f}",
        "drone-dji:GimbalRollDegree": "+0.000000", "drone-dji:GimbalYawDegree": f"{yaw:+.6f}",
        "drone-dji:GimbalPitchDegree": f"{pitch:+.6f}",
        "drone-dji:FlightRollDegree": "+0.000000", "drone-dji:FlightYawDegree": f"{yaw:+.6f}",
        "drone-dji:FlightPitchDegree": "+0.000000",
        "drone-dji:GpsLatitude": f"{lat:+.10f}", "drone-dji:GpsLongitude": f"{lon:+.10f}",
        "drone-dji:GpsLongtitude": f"{lon:+.10f}",
        "drone-dji:CalibratedFocalLength": f"{camera.fl_x:.6f}",
        "drone-dji:CalibratedOpticalCenterX": f"{camera.cx:.6f}",
        "drone-dji:CalibratedOpticalCenterY": f"{camera.cy:.6f}",
    }
    body = "\n    ".join(f'{k}="{v}"' for k, v in attrs.items())
    xmp = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"\n'
        f'    xmlns:drone-dji="{DJI_NS}"\n'
        f"    {body}/>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )
    return exif.tobytes(), xmp.encode("utf-8"), values
