"""EXIF and DJI XMP metadata of one drone JPEG: GPS, focal length in pixels, gimbal angles.

Everything comes from one read of the file: Pillow parses the EXIF IFDs (0th, Exif
0x8769, GPS 0x8825) and the pixel data; the XMP packet is taken from the raw JPEG APP1
segment and parsed for DJI's ``drone-dji:`` fields, which DJI writes either as
attributes of ``rdf:Description`` or as child elements (both are read).

Heights: EXIF ``GPSAltitude`` is nominally above mean sea level, while citygen's frames
are ellipsoidal.  No geoid model is shipped (nothing is downloaded at run time), so the
altitude is used as is: the geoid undulation is a constant offset over a survey, which
moves the whole local frame up or down but does not change its shape.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import SurveyError
from .safexml import ParseError, parse_xml

_GPS_IFD = 0x8825
_EXIF_IFD = 0x8769
_TAG_MAKE, _TAG_MODEL, _TAG_DATETIME = 0x010F, 0x0110, 0x0132
_TAG_DATETIME_ORIGINAL = 0x9003
_TAG_FOCAL_LENGTH, _TAG_FOCAL_35MM = 0x920A, 0xA405
_TAG_FP_XRES, _TAG_FP_UNIT = 0xA20E, 0xA210
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_ALT_REF, _GPS_ALT = 1, 2, 3, 4, 5, 6

#: FocalPlaneResolutionUnit -> millimetres per unit (EXIF: 2 inch, 3 cm; 4 mm and 5 um are common extensions).
_FP_UNIT_MM = {1: 25.4, 2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}

#: Sensor widths (mm) of common survey cameras, for files with neither a 35 mm equivalent nor a focal plane resolution.
SENSOR_WIDTH_MM = {
    ("dji", "fc6310"): 13.2, ("dji", "fc6310s"): 13.2, ("dji", "fc220"): 6.17, ("dji", "fc330"): 6.17,
    ("dji", "fc300x"): 6.17, ("dji", "fc2103"): 6.17, ("dji", "fc3170"): 6.4, ("dji", "fc7303"): 6.3,
    ("dji", "l1d-20c"): 13.2, ("dji", "zenmuse p1"): 35.9, ("canon", "canon powershot sx260 hs"): 6.17,
    ("sony", "dsc-rx100"): 13.2, ("gopro", "hero4 black"): 6.17,
}

_DJI_NS = "http://www.dji.com/drone-dji/1.0/"
DJI_FIELDS = ("GimbalPitchDegree", "GimbalYawDegree", "GimbalRollDegree", "FlightYawDegree",
              "FlightPitchDegree", "FlightRollDegree", "RelativeAltitude", "AbsoluteAltitude",
              "CalibratedFocalLength", "CalibratedOpticalCenterX", "CalibratedOpticalCenterY")
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
#: Plausible GPS altitudes (m): below the Dead Sea shore to above any survey aircraft's ceiling.
#: A value outside is a corrupt tag (e.g. a rational with a garbage denominator), not a flight.
GPS_ALTITUDE_RANGE_M = (-1000.0, 20000.0)


@dataclass(frozen=True)
class ImageMetadata:
    """What one drone JPEG says about itself.

    Attributes:
        path: the file.
        width, height: pixel size of the stored image (EXIF Orientation is not applied, as COLMAP does not).
        make, model: camera make and model ('' when absent).
        lat, lon, alt: GPS position (degrees, degrees, metres; alt is 0 when the file has none).
        has_alt: whether the file carries GPSAltitude.
        focal_mm: EXIF FocalLength in millimetres, or None.
        focal_px: focal length in pixels, or None when nothing in the file gives it.
        focal_source: where ``focal_px`` came from ("dji_calibrated" (XMP CalibratedFocalLength, pixels),
            "focal_plane_resolution", "35mm_equivalent", "sensor_table"), '' when nothing did.
        datetime: DateTimeOriginal (or DateTime) as written, '' when absent.
        dji: the DJI XMP fields found (names from :data:`DJI_FIELDS`), as floats.
    """

    path: Path
    width: int
    height: int
    make: str
    model: str
    lat: float
    lon: float
    alt: float
    has_alt: bool
    focal_mm: float | None
    focal_px: float | None
    focal_source: str
    datetime: str
    dji: dict[str, float]

    @property
    def has_gimbal(self) -> bool:
        return "GimbalPitchDegree" in self.dji and "GimbalYawDegree" in self.dji


def _float(value) -> float:
    """An EXIF number (int, float, IFDRational, (num, den) pair) as float; NaN for x/0."""
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den) if float(den) != 0 else math.nan
    try:
        return float(value)
    except ZeroDivisionError:
        return math.nan


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").strip()


def _dms_to_degrees(dms, ref, path: Path, what: str) -> float:
    try:
        parts = [_float(v) for v in (dms if isinstance(dms, (tuple, list)) else (dms,))]
    except (TypeError, ValueError):
        raise SurveyError(path, f"GPS {what} is not numeric: {dms!r}") from None
    parts += [0.0] * (3 - len(parts))
    deg = parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
    if not math.isfinite(deg):
        raise SurveyError(path, f"GPS {what} is not finite: {dms!r}")
    ref = _text(ref).upper()
    if ref in ("S", "W"):
        deg = -deg
    elif ref not in ("N", "E", ""):
        raise SurveyError(path, f"GPS {what} reference {ref!r} is not N/S/E/W")
    return deg


def parse_dji_xmp(xmp: bytes | str, source: str | Path | None = None) -> dict[str, float]:
    """The ``drone-dji:`` numeric fields of an XMP packet (attribute or element form).

    Fields that are absent or not numbers are left out.  A packet that is not well-formed
    XML (some firmware writes stray bytes) falls back to a tolerant pattern match; one that
    declares a DTD or entities is refused (SurveyError naming ``source``).
    """
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    found: dict[str, str] = {}
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    try:
        root = parse_xml(text[start:end + len("</x:xmpmeta>")] if start >= 0 and end > start else text,
                         source, "XMP packet")
        for el in root.iter():
            for key, value in el.attrib.items():
                if key.startswith("{" + _DJI_NS + "}"):
                    found[key.split("}", 1)[1]] = value
            if isinstance(el.tag, str) and el.tag.startswith("{" + _DJI_NS + "}") and el.text:
                found[el.tag.split("}", 1)[1]] = el.text
    except ParseError:
        for m in re.finditer(r'drone-dji:(\w+)\s*=\s*"([^"]*)"', text):
            found[m.group(1)] = m.group(2)
        for m in re.finditer(r"<drone-dji:(\w+)>([^<]*)</drone-dji:\1>", text):
            found[m.group(1)] = m.group(2)
    out: dict[str, float] = {}
    for name in DJI_FIELDS:
        if name in found:
            try:
                out[name] = float(found[name].strip())
            except ValueError:
                continue
    return out


def _xmp_packet(data: bytes) -> bytes | None:
    """The XMP packet from the JPEG APP1 segments (walks markers up to start of scan)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: no more metadata segments
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and segment.startswith(_XMP_HEADER):
            return segment[len(_XMP_HEADER):]
        pos += 2 + length
    return None


def _focal_px(exif_ifd, make: str, model: str, width: int, height: int) -> tuple[float | None, float | None, str]:
    focal_mm = _float(exif_ifd[_TAG_FOCAL_LENGTH]) if _TAG_FOCAL_LENGTH in exif_ifd else None
    if focal_mm is not None and not (math.isfinite(focal_mm) and focal_mm > 0):
        focal_mm = None
    long_side = max(width, height)
    # The focal plane resolution is the physical pixel pitch: the most direct source.
    if focal_mm and _TAG_FP_XRES in exif_ifd:
        res = _float(exif_ifd[_TAG_FP_XRES])
        unit_mm = _FP_UNIT_MM.get(int(exif_ifd.get(_TAG_FP_UNIT, 2)), 25.4)
        if math.isfinite(res) and res > 0:
            sensor_width_mm = width / res * unit_mm
            if 1.0 <= sensor_width_mm <= 80.0:  # a plausible sensor, not a stale tag from before a resize
                return focal_mm, focal_mm * res / unit_mm, "focal_plane_resolution"
    # 35 mm equivalent: the usual convention (COLMAP, OpenSfM) maps 36 mm onto the long side.
    f35 = _float(exif_ifd.get(_TAG_FOCAL_35MM, 0))
    if math.isfinite(f35) and f35 > 0:
        return focal_mm, f35 / 36.0 * long_side, "35mm_equivalent"
    sensor = SENSOR_WIDTH_MM.get((make.lower(), model.lower()))
    if focal_mm and sensor:
        return focal_mm, focal_mm / sensor * long_side, "sensor_table"
    return focal_mm, None, ""


def read_image_metadata(path: str | Path) -> ImageMetadata:
    """Read and check one drone JPEG: decode it, parse EXIF GPS / focal length and DJI XMP.

    Raises:
        SurveyError: unreadable or truncated image, no GPS position, non-finite values.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SurveyError(path, f"cannot read file ({err.strerror or err})") from None
    if not data:
        raise SurveyError(path, "empty file (0 bytes)")
    if not data.startswith(b"\xff\xd8"):
        raise SurveyError(path, "not a JPEG file (no SOI marker)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            exif = im.getexif()
            # Decode at 1/8 scale (the JPEG decoder's DCT scaling): the whole entropy-coded
            # stream is still read, so a truncated or corrupt file fails here, but it is cheap.
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SurveyError(path, f"unreadable or truncated image ({err})") from None
    if b"\xff\xd9" not in data[-4096:]:
        raise SurveyError(path, "truncated image (no JPEG end-of-image marker)")

    make, model = _text(exif.get(_TAG_MAKE, "")), _text(exif.get(_TAG_MODEL, ""))
    exif_ifd = exif.get_ifd(_EXIF_IFD)
    gps = exif.get_ifd(_GPS_IFD)
    if _GPS_LAT not in gps or _GPS_LON not in gps:
        raise SurveyError(path, "image has no GPS position in its EXIF (GPSLatitude/GPSLongitude)")
    lat = _dms_to_degrees(gps[_GPS_LAT], gps.get(_GPS_LAT_REF, "N"), path, "latitude")
    lon = _dms_to_degrees(gps[_GPS_LON], gps.get(_GPS_LON_REF, "E"), path, "longitude")
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise SurveyError(path, f"GPS position ({lat}, {lon}) is out of range")
    has_alt = _GPS_ALT in gps
    alt = _float(gps[_GPS_ALT]) if has_alt else 0.0
    if not math.isfinite(alt):
        raise SurveyError(path, f"GPS altitude is not finite: {gps[_GPS_ALT]!r}")
    alt_ref = gps.get(_GPS_ALT_REF, 0)
    if (alt_ref[:1] == b"\x01") if isinstance(alt_ref, bytes) else int(alt_ref) == 1:
        alt = -alt  # GPSAltitudeRef 1: below sea level
    if not GPS_ALTITUDE_RANGE_M[0] <= alt <= GPS_ALTITUDE_RANGE_M[1]:
        raise SurveyError(path, f"GPS altitude {alt:.6g} m is not plausible for an aerial survey "
                                f"(expected {GPS_ALTITUDE_RANGE_M[0]:g} to {GPS_ALTITUDE_RANGE_M[1]:g} m)")

    focal_mm, focal_px, focal_source = _focal_px(exif_ifd, make, model, width, height)
    xmp = _xmp_packet(data)
    dji = parse_dji_xmp(xmp, path) if xmp else {}
    bad = [k for k, v in dji.items() if not math.isfinite(v)]
    if bad:
        raise SurveyError(path, f"DJI XMP field {bad[0]} is not finite")
    calibrated = dji.get("CalibratedFocalLength", 0.0)
    if 0.1 * max(width, height) < calibrated < 10 * max(width, height):  # pixels, from the drone's calibration
        focal_px, focal_source = calibrated, "dji_calibrated"
    when = _text(exif_ifd.get(_TAG_DATETIME_ORIGINAL, exif.get(_TAG_DATETIME, "")))
    return ImageMetadata(path=path, width=width, height=height, make=make, model=model, lat=lat, lon=lon,
                         alt=alt, has_alt=has_alt, focal_mm=focal_mm, focal_px=focal_px,
                         focal_source=focal_source, datetime=when, dji=dji)


def gimbal_to_c2w_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Camera-to-world rotation (OpenCV camera axes, ENU world) from DJI gimbal angles.

    DJI convention: yaw is the compass heading of the optical axis, clockwise from north;
    pitch is 0 at the horizon and -90 looking straight down; roll turns the image about the
    optical axis, positive lowering the right side.  At pitch -90 the top of the image
    points along the heading.
    """
    psi, theta, phi = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    forward = np.array([math.sin(psi) * math.cos(theta), math.cos(psi) * math.cos(theta), math.sin(theta)])
    right = np.array([math.cos(psi), -math.sin(psi), 0.0])
    down = np.cross(forward, right)
    x = math.cos(phi) * right + math.sin(phi) * down
    y = -math.sin(phi) * right + math.cos(phi) * down
    return np.stack([x, y, forward], axis=1)
