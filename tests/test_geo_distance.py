"""Distances from where a query was taken to the satellites retrieved, and where files say they were taken."""
import math

import numpy as np
import pytest
from PIL import Image

from gleam_jax.data import photo_camera, video_files
from gleam_jax.errors import GleamError
from gleam_jax.eval import geo_distance


def photo_with_gps(path, lat, lon, xmp=None, pixels=None):
  """A JPEG (of `pixels`, else plain) whose EXIF GPS records (lat, lon) as degrees, minutes and seconds with
  N/S and E/W."""
  exif = Image.Exif()
  dms = lambda v: (float(int(abs(v))), float(int(abs(v) * 60 % 60)), round(abs(v) * 3600 % 60, 4))
  exif.get_ifd(photo_camera.GPS_IFD).update({
      photo_camera.GPS_LATITUDE_REF: "N" if lat >= 0 else "S", photo_camera.GPS_LATITUDE: dms(lat),
      photo_camera.GPS_LONGITUDE_REF: "E" if lon >= 0 else "W", photo_camera.GPS_LONGITUDE: dms(lon)})
  image = Image.new("RGB", (16, 12), (90, 120, 60)) if pixels is None else Image.fromarray(pixels)
  image.save(path, exif=exif, quality=95, **({"xmp": xmp.encode()} if xmp else {}))
  return str(path)


def test_great_circle_distances_by_hand():
  # a degree of latitude (or of longitude on the equator) is 2 pi R / 360 = 111,195.08 m
  assert geo_distance.distance_m(0, 0, 1, 0) == pytest.approx(2 * math.pi * 6_371_008.8 / 360, rel=1e-12)
  assert geo_distance.distance_m(10, 20, 10.001, 20) == pytest.approx(111.19508, rel=1e-6)
  # a degree of longitude at 60 deg N: half the equator's, less the arc's curvature (haversine by hand)
  expected = 2 * 6_371_008.8 * math.asin(math.cos(math.radians(60)) * math.sin(math.radians(0.5)))
  assert geo_distance.distance_m(60, 5, 60, 6) == pytest.approx(expected, rel=1e-12)
  assert 55_500 < expected < 55_600
  # Eiffel tower to Big Ben: 340.7 km on the sphere; symmetric, and broadcast over arrays
  d = geo_distance.distance_m(48.8584, 2.2945, [51.5007, 48.8584], [-0.1246, 2.2945])
  assert d[0] == pytest.approx(340_700, abs=300) and d[1] == 0.0
  assert geo_distance.distance_m(51.5007, -0.1246, 48.8584, 2.2945) == pytest.approx(d[0], rel=1e-12)


def test_summary_by_hand():
  result = geo_distance.summary([10.0, 30.0, 60.0, 300.0])
  assert result == {"Dis@1_m": 100.0, "median_m": 45.0, "within_25m": 0.25, "within_50m": 0.5,
                    "within_100m": 0.75, "within_250m": 0.75}
  assert geo_distance.format_summary(result) == ("Dis@1 100 m (median 45 m); top-1 within 25 m 25.0%, "
                                                 "50 m 50.0%, 100 m 75.0%, 250 m 75.0%")
  assert [geo_distance.format_distance(m) for m in (0.4, 9_999.4, 15_164_568.0)] == ["0 m", "9999 m", "15164.6 km"]


def test_gallery_centres_from_names_or_a_csv(tmp_path):
  files = [str(tmp_path / "satellite_40.7306_-73.9866.png"), str(tmp_path / "satellite_-33.8651_151.2099.jpg")]
  assert geo_distance.gallery_positions(files, str(tmp_path)) == {files[0]: (40.7306, -73.9866),
                                                                   files[1]: (-33.8651, 151.2099)}
  assert geo_distance.gallery_positions(files + [str(tmp_path / "tile7.png")], str(tmp_path)) is None
  with pytest.raises(GleamError, match=r"satellite_95.0_10.0.png: \(95.0, 10.0\) is not a \(latitude, longitude\)"):
    geo_distance.positions_from_names([str(tmp_path / "satellite_95.0_10.0.png")])
  plain = [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]
  csv = tmp_path / "centres.csv"
  csv.write_text(f"file,latitude,longitude\na.png,1.5,2.5\n{tmp_path / 'sub' / 'b.png'},-3,4\n")
  assert geo_distance.gallery_positions(plain, str(tmp_path), str(csv)) == {plain[0]: (1.5, 2.5), plain[1]: (-3, 4)}
  with pytest.raises(GleamError, match=r"has no row for 1 of the 3 gallery images \(first: .*c.png\)"):
    geo_distance.gallery_positions(plain + [str(tmp_path / "c.png")], str(tmp_path), str(csv))
  csv.write_text("name,lat,lon\na.png,1,2\n")
  with pytest.raises(GleamError, match="needs a header row with the columns file,latitude,longitude"):
    geo_distance.gallery_positions(plain, str(tmp_path), str(csv))
  csv.write_text("file,latitude,longitude\na.png,north,2\n")
  with pytest.raises(GleamError, match=r"centres.csv line 2: latitude 'north' and longitude '2' must be numbers"):
    geo_distance.gallery_positions(plain, str(tmp_path), str(csv))
  with pytest.raises(GleamError, match=r"--gallery_coords=.*none.csv: cannot read it"):
    geo_distance.gallery_positions(plain, str(tmp_path), str(tmp_path / "none.csv"))


def test_where_a_photo_or_frame_was_taken(tmp_path):
  lat, lon = photo_camera.recorded_position(photo_with_gps(tmp_path / "phone.jpg", -33.8651, -151.2099))
  assert (lat, lon) == (pytest.approx(-33.8651, abs=1e-6), pytest.approx(-151.2099, abs=1e-6))
  assert photo_camera.recorded_position(photo_with_gps(tmp_path / "ne.jpg", 40.7306, 73.9866)) == (
      pytest.approx(40.7306, abs=1e-6), pytest.approx(73.9866, abs=1e-6))
  # a DJI drone's XMP position wins over the EXIF GPS (also spelt GpsLongtitude by some firmware)
  xmp = ('<x:xmpmeta><rdf:Description drone-dji:GpsLatitude="+22.543210" drone-dji:GpsLongtitude="+113.945678"/>'
         '</x:xmpmeta>')
  assert photo_camera.recorded_position(photo_with_gps(tmp_path / "dji.jpg", 1.0, 2.0, xmp)) == (22.54321, 113.945678)
  Image.new("RGB", (8, 8)).save(tmp_path / "none.jpg")
  assert photo_camera.recorded_position(str(tmp_path / "none.jpg")) is None
  # a video frame extracted with its flight log's position (video_files) records it as a DJI photo does
  camera = dict(latitude=69.189116, longitude=35.259334, altitude_m=50.0, heading_deg=None, pitch_deg=None,
                focal_35mm=None)
  frame = np.zeros((8, 8, 3), np.uint8)
  video_files._save_frame(frame, str(tmp_path / "frame.png"), camera)  # pylint: disable=protected-access
  assert photo_camera.recorded_position(str(tmp_path / "frame.png")) == (69.189116, 35.259334)
