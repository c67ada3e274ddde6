"""A photo's camera from its EXIF (compass heading, 35 mm-equivalent focal length), and its
orientation applied when the retrieve CLI reads it."""
import math

import numpy as np
import pytest
from PIL import Image

from gleam_jax import retrieve
from gleam_jax.data import photo_camera
from gleam_jax.errors import GleamError


def photo_with_exif(path, size=(30, 20), heading=None, north="T", focal=None, orientation=None, xmp=None):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8))
  exif = Image.Exif()
  if orientation is not None:
    exif[photo_camera.ORIENTATION] = orientation
  if heading is not None:
    gps = exif.get_ifd(photo_camera.GPS_IFD)
    gps[photo_camera.GPS_IMG_DIRECTION_REF] = north
    gps[photo_camera.GPS_IMG_DIRECTION] = heading
  if focal is not None:
    exif.get_ifd(photo_camera.EXIF_IFD)[photo_camera.FOCAL_LENGTH_35MM] = focal
  image.save(path, exif=exif, **({"xmp": xmp.encode()} if xmp else {}))
  return path


DJI_XMP = """<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <rdf:Description rdf:about="DJI Meta Data" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"
   drone-dji:AbsoluteAltitude="+512.34" drone-dji:RelativeAltitude="+60.20" drone-dji:GimbalRollDegree="+0.00"
   drone-dji:GimbalYawDegree="-135.50" drone-dji:GimbalPitchDegree="-45.00" drone-dji:FlightYawDegree="-130.10"/>
</rdf:RDF></x:xmpmeta>"""


def test_horizontal_fov_from_the_35mm_equivalent():
  # a 3:2 photo is the full 36 mm frame wide: 18 mm gives 90 deg, 36 mm gives 2 atan(1/2)
  assert photo_camera.horizontal_fov_deg(18, 3000, 2000) == pytest.approx(90.0)
  assert photo_camera.horizontal_fov_deg(36, 300, 200) == pytest.approx(math.degrees(2 * math.atan(0.5)))
  # upright 2:3 (portrait): 24 mm of the frame across
  assert photo_camera.horizontal_fov_deg(18, 200, 300) == pytest.approx(math.degrees(2 * math.atan(12 / 18)))
  # a phone's 4:3 main camera at 26 mm: ~69 deg across the long side
  assert photo_camera.horizontal_fov_deg(26, 4032, 3024) == pytest.approx(
      math.degrees(2 * math.atan(43.2666 * 0.8 / 2 / 26)), abs=1e-3)


def test_recorded_camera(tmp_path):
  camera = photo_camera.recorded_camera(photo_with_exif(tmp_path / "a.jpg", (300, 200), heading=123.5, focal=18))
  assert camera == {"heading_deg": pytest.approx(123.5), "fov_deg": pytest.approx(90.0), "pitch_deg": None,
                    "altitude_m": None, "north": "true"}
  # stored turned by 90 deg (orientation 6): the upright photo is portrait, the fov is across 24 mm
  camera = photo_camera.recorded_camera(photo_with_exif(tmp_path / "b.jpg", (300, 200), heading=370.0, north="M",
                                                    focal=18, orientation=6))
  assert camera["heading_deg"] == pytest.approx(10.0) and camera["north"] == "magnetic"
  assert camera["fov_deg"] == pytest.approx(math.degrees(2 * math.atan(12 / 18)))
  assert retrieve.read_image(tmp_path / "b.jpg").shape == (300, 200, 3)  # shown upright
  assert retrieve.read_image(tmp_path / "a.jpg").shape == (200, 300, 3)
  plain = photo_with_exif(tmp_path / "c.png")
  assert set(photo_camera.recorded_camera(plain).values()) == {None}
  (tmp_path / "d.jpg").write_bytes(b"not an image")
  with pytest.raises(GleamError, match="d.jpg"):
    photo_camera.recorded_camera(tmp_path / "d.jpg")


def test_dji_drone_pose_from_xmp(tmp_path):
  """A DJI photo's gimbal yaw (-180..180 from north), pitch (-90 straight down) and height above the
  take-off point, as its XMP packet writes them; the gimbal's yaw wins over GPSImgDirection."""
  path = photo_with_exif(tmp_path / "dji.jpg", (400, 300), heading=10.0, focal=24, xmp=DJI_XMP)
  camera = photo_camera.recorded_camera(path)
  assert camera["heading_deg"] == pytest.approx(224.5) and camera["north"] == "true"
  assert camera["pitch_deg"] == pytest.approx(45.0) and camera["altitude_m"] == pytest.approx(60.2)
  assert camera["fov_deg"] == pytest.approx(math.degrees(2 * math.atan(43.2666 * 0.8 / 2 / 24)), abs=1e-3)
  elements = ("<x:xmpmeta><rdf:Description><drone-dji:GimbalPitchDegree>-90.0</drone-dji:GimbalPitchDegree>"
              "<drone-dji:RelativeAltitude> 120 </drone-dji:RelativeAltitude></rdf:Description></x:xmpmeta>")
  assert photo_camera.dji_xmp_value(elements, "GimbalPitchDegree") == -90.0
  assert photo_camera.dji_xmp_value(elements, "RelativeAltitude") == 120.0
  assert photo_camera.dji_xmp_value(elements, "GimbalYawDegree") is None
