"""The camera of a photo, from its EXIF: compass heading and horizontal field of view.

Phones record where the camera pointed (GPS IFD `GPSImgDirection`, degrees clockwise from true
north, or magnetic north when `GPSImgDirectionRef` is 'M') and the 35 mm-equivalent focal length
(`FocalLengthIn35mmFilm`). The equivalent is defined on the diagonal of a 36 x 24 mm frame
(43.27 mm), so the photo's width takes the share of that diagonal its aspect gives it:
fov = 2 atan(43.27 mm * W / sqrt(W^2 + H^2) / (2 f35)), with W x H the upright image. A ground
photo needs both to be placed in the panorama frame (`panorama_frame.photo_to_panorama`).
"""
import math

from PIL import Image

from gleam_jax.errors import GleamError

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
GPS_IMG_DIRECTION_REF, GPS_IMG_DIRECTION = 16, 17
FOCAL_LENGTH_35MM = 41989
ORIENTATION = 274
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)


def horizontal_fov_deg(focal_35mm, width, height):
  """Horizontal field of view of an upright `width` x `height` image at a 35 mm-equivalent focal length."""
  half_width_mm = FULL_FRAME_DIAGONAL_MM * width / math.hypot(width, height) / 2
  return math.degrees(2 * math.atan(half_width_mm / float(focal_35mm)))


def exif_camera(path):
  """{'heading_deg', 'fov_deg', 'north'} from the EXIF of the image at `path`; a value the file does not
  record is None ('north': 'true' or 'magnetic', None without a heading)."""
  try:
    with Image.open(path) as image:
      exif = image.getexif()
      width, height = image.size
  except (OSError, ValueError) as e:
    raise GleamError(f"cannot read image {path} ({e}); replace or remove the file.") from None
  if exif.get(ORIENTATION) in (5, 6, 7, 8):  # stored turned by 90 deg: upright, width and height swap
    width, height = height, width
  gps = exif.get_ifd(GPS_IFD)
  heading = gps.get(GPS_IMG_DIRECTION)
  focal = exif.get_ifd(EXIF_IFD).get(FOCAL_LENGTH_35MM)
  camera = {"heading_deg": None, "fov_deg": None, "north": None}
  if heading is not None:
    camera["heading_deg"] = float(heading) % 360.0
    camera["north"] = "magnetic" if str(gps.get(GPS_IMG_DIRECTION_REF, "T")).upper().startswith("M") else "true"
  if focal:  # 0 means unknown in EXIF
    camera["fov_deg"] = horizontal_fov_deg(focal, width, height)
  return camera
