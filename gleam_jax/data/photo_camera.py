"""The camera an image file records: compass heading, field of view, a drone's pitch and height, and
where it was taken (EXIF GPS, a DJI drone's XMP `GpsLatitude` / `GpsLongitude`: `recorded_position`).

Phones record where the camera pointed (EXIF GPS IFD `GPSImgDirection`, degrees clockwise from true
north, or magnetic north when `GPSImgDirectionRef` is 'M') and the 35 mm-equivalent focal length
(`FocalLengthIn35mmFilm`). The equivalent is defined on the diagonal of a 36 x 24 mm frame
(43.27 mm), so the photo's width takes the share of that diagonal its aspect gives it:
fov = 2 atan(43.27 mm * W / sqrt(W^2 + H^2) / (2 f35)), with W x H the upright image.
DJI drones write their gimbal's pose into the XMP packet (`drone-dji:GimbalYawDegree`, clockwise
from north, -180..180; `drone-dji:GimbalPitchDegree`, -90 looking straight down;
`drone-dji:RelativeAltitude`, metres above the take-off point, which is the height above the ground
where the ground is level). A ground photo needs heading and field of view to be placed in the
panorama frame (`panorama_frame.photo_to_panorama`); a UAV view also needs pitch and height to be
projected into the satellite frame (`satellite_frame.uav_to_satellite`).
"""
import contextlib
import math
import re

from PIL import Image

from gleam_jax.errors import GleamError

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
GPS_IMG_DIRECTION_REF, GPS_IMG_DIRECTION = 16, 17
FOCAL_LENGTH_35MM = 41989
ORIENTATION = 274
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
NUMBER = r"([-+]?[0-9]*\.?[0-9]+)"


def dji_xmp_value(xmp, name):
  """A `drone-dji:<name>` number from an XMP packet (attribute or element form), or None."""
  match = (re.search(rf'drone-dji:{name}\s*=\s*"\s*{NUMBER}\s*"', xmp)
           or re.search(rf"<drone-dji:{name}>\s*{NUMBER}\s*</drone-dji:{name}>", xmp))
  return float(match.group(1)) if match else None


def horizontal_fov_deg(focal_35mm, width, height):
  """Horizontal field of view of an upright `width` x `height` image at a 35 mm-equivalent focal length."""
  half_width_mm = FULL_FRAME_DIAGONAL_MM * width / math.hypot(width, height) / 2
  return math.degrees(2 * math.atan(half_width_mm / float(focal_35mm)))


@contextlib.contextmanager
def open_image(path):
  """The image file at `path`, opened with PIL; one GleamError naming it if it cannot be read."""
  try:
    with Image.open(path) as image:
      yield image
  except (OSError, ValueError) as e:
    raise GleamError(f"cannot read image {path} ({e}); replace or remove the file.") from None


def _xmp_text(image):
  xmp = image.info.get("xmp", b"")
  return xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)


def _exif_degrees(dms, ref, negative):
  """Decimal degrees of an EXIF GPS (degrees, minutes, seconds) triple and its N/S or E/W reference."""
  degrees = float(dms[0]) + float(dms[1]) / 60 + float(dms[2]) / 3600
  return -degrees if str(ref).strip().upper().startswith(negative) else degrees


def recorded_position(path):
  """(latitude, longitude) in degrees where the image at `path` records where it was taken (a DJI
  drone's XMP `GpsLatitude` / `GpsLongitude`, else EXIF GPS), or None."""
  with open_image(path) as image:
    xmp, gps = _xmp_text(image), image.getexif().get_ifd(GPS_IFD)
  lat = dji_xmp_value(xmp, "GpsLatitude")
  lon = dji_xmp_value(xmp, "GpsLongitude")
  lon = dji_xmp_value(xmp, "GpsLongtitude") if lon is None else lon  # as some DJI firmware spells it
  if lat is not None and lon is not None:
    return lat, lon
  if len(gps.get(GPS_LATITUDE) or ()) != 3 or len(gps.get(GPS_LONGITUDE) or ()) != 3:
    return None
  lat = _exif_degrees(gps[GPS_LATITUDE], gps.get(GPS_LATITUDE_REF, "N"), "S")
  lon = _exif_degrees(gps[GPS_LONGITUDE], gps.get(GPS_LONGITUDE_REF, "E"), "W")
  return (lat, lon) if math.isfinite(lat) and math.isfinite(lon) else None  # 0/0 rationals: no fix


def recorded_camera(path):
  """{'heading_deg', 'fov_deg', 'pitch_deg', 'altitude_m', 'north'} as the image at `path` records them
  (EXIF, DJI XMP); a value the file does not record is None. 'north' says what the heading is
  measured from: 'true', 'magnetic' (a phone's GPSImgDirectionRef 'M'), None without a heading."""
  with open_image(path) as image:
    exif = image.getexif()
    width, height = image.size
    xmp = _xmp_text(image)
  if exif.get(ORIENTATION) in (5, 6, 7, 8):  # stored turned by 90 deg: upright, width and height swap
    width, height = height, width
  camera = {"heading_deg": None, "fov_deg": None, "pitch_deg": None, "altitude_m": None, "north": None}
  gps = exif.get_ifd(GPS_IFD)
  yaw, heading = dji_xmp_value(xmp, "GimbalYawDegree"), gps.get(GPS_IMG_DIRECTION)
  if yaw is not None:  # the camera's own direction, where a drone records it
    camera["heading_deg"], camera["north"] = yaw % 360.0, "true"
  elif heading is not None:
    camera["heading_deg"] = float(heading) % 360.0
    camera["north"] = "magnetic" if str(gps.get(GPS_IMG_DIRECTION_REF, "T")).upper().startswith("M") else "true"
  pitch = dji_xmp_value(xmp, "GimbalPitchDegree")
  if pitch is not None:
    camera["pitch_deg"] = -pitch  # below the horizon
  camera["altitude_m"] = dji_xmp_value(xmp, "RelativeAltitude")
  focal = exif.get_ifd(EXIF_IFD).get(FOCAL_LENGTH_35MM)
  if focal:  # 0 means unknown in EXIF
    camera["fov_deg"] = horizontal_fov_deg(focal, width, height)
  return camera
