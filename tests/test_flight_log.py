"""A DJI drone's flight log (the `.SRT` beside its video): each model's form, the entry at a time, and the
pose each extracted frame of the video carries."""
import json
import os

import pytest
from PIL import Image

from gleam_jax.data import flight_log, photo_camera, video_files
from gleam_jax.errors import GleamError
from video_fixtures import write_video

MINI_4_PRO = """\ufeff1\r
00:00:00,000 --> 00:00:00,033\r
<font size="28">FrameCnt: 1, DiffTime: 33ms\r
2024-08-07 12:34:24.380\r
[iso: 100] [shutter: 1/3200.0] [fnum: 1.7] [ev: 0] [color_md: default] [focal_len: 24.00] [latitude: 69.189116] \
[longitude: 35.259334] [rel_alt: 1.100 abs_alt: -2.927] [ct: 5310] </font>\r
\r
2\r
00:00:00,033 --> 00:00:00,066\r
<font size="28">FrameCnt: 2, DiffTime: 33ms\r
2024-08-07 12:34:24.413\r
[iso: 100] [shutter: 1/3200.0] [fnum: 1.7] [ev: 0] [color_md: default] [focal_len: 24.00] [latitude: 69.189120] \
[longitude: 35.259340] [rel_alt: 1.200 abs_alt: -2.827] [ct: 5310] </font>\r
"""

MAVIC_3E = """1
00:00:00,000 --> 00:00:00,033
<font size="28">FrameCnt: 1, DiffTime: 33ms
2024-01-15 10:20:30.123
[iso: 100] [shutter: 1/1000.0] [fnum: 2.8] [ev: 0] [color_md: default] [focal_len: 24.00] [latitude: 47.397742] \
[longitude: 8.545594] [rel_alt: 50.000 abs_alt: 120.300] [gb_yaw: -12.3 gb_pitch: -90.0 gb_roll: 0.0] </font>
"""

MAVIC_AIR = """1
00:00:00,000 --> 00:00:01,000
<font size="36">FrameCnt : 1, DiffTime : 1000ms
2019-07-29 17:02:42,123,456
[iso : 110] [shutter : 1/200.0] [fnum : 280] [ev : 0] [ct : 5064] [color_md : default] [focal_len : 240] \
[latitude: 0.608553] [longtitude: -0.045555] [altitude: 1.469000] </font>
"""

PHANTOM = """1
00:00:00,000 --> 00:00:01,000
HOME(113.9456,22.5431) 2017.07.21 17:05:29
GPS(113.9457,22.5432,19) BAROMETER:50.1
ISO:100 Shutter:60 EV:0 Fnum:F2.8
"""


def write_log(path, text, encoding="utf-8"):
  path.write_bytes(text.encode(encoding))
  return str(path)


def values(entry):
  return {key: entry[key] for key in flight_log.VALUE_KEYS}


def enterprise_log(count, yaw, ms=33, start_ms=0):
  """A Mavic 3E log of `count` entries of `ms` each; entry i's gimbal yaw is `yaw(i)` (-180..180), its
  pitch -90 + i, its height 50 + i metres."""
  entries = []
  for i in range(count):
    start, end = start_ms + i * ms, start_ms + (i + 1) * ms
    stamp = lambda t: f"00:{t // 60000:02d}:{t // 1000 % 60:02d},{t % 1000:03d}"
    entries.append(f"{i + 1}\n{stamp(start)} --> {stamp(end)}\n<font size=\"28\">FrameCnt: {i + 1}, DiffTime: "
                   f"{ms}ms\n2024-01-15 10:20:30.123\n[iso: 100] [focal_len: 24.00] [latitude: {47 + i * 1e-5:.6f}] "
                   f"[longitude: 8.545594] [rel_alt: {50 + i:.3f} abs_alt: 120.300] "
                   f"[gb_yaw: {yaw(i):.1f} gb_pitch: {-90 + i:.1f} gb_roll: 0.0] </font>\n")
  return "\n".join(entries)


def test_each_models_log_is_read(tmp_path):
  """Consumer, enterprise, older and Phantom forms; CRLF line ends and a byte order mark."""
  first, second = flight_log.read_log(write_log(tmp_path / "mini.SRT", MINI_4_PRO))
  assert (first["start_s"], first["end_s"], second["start_s"], second["end_s"]) == (0.0, 0.033, 0.033, 0.066)
  assert values(first) == {"latitude": 69.189116, "longitude": 35.259334, "altitude_m": 1.1, "heading_deg": None,
                           "pitch_deg": None, "focal_35mm": 24.0}
  assert second["altitude_m"] == 1.2 and second["latitude"] == 69.18912
  (enterprise,) = flight_log.read_log(write_log(tmp_path / "m3e.SRT", MAVIC_3E))
  assert values(enterprise) == {"latitude": 47.397742, "longitude": 8.545594, "altitude_m": 50.0,
                                "heading_deg": pytest.approx(347.7), "pitch_deg": 90.0, "focal_35mm": 24.0}
  (older,) = flight_log.read_log(write_log(tmp_path / "air.srt", MAVIC_AIR))
  assert (older["start_s"], older["end_s"]) == (0.0, 1.0)
  assert values(older) == {"latitude": 0.608553, "longitude": -0.045555, "altitude_m": 1.469, "heading_deg": None,
                           "pitch_deg": None, "focal_35mm": 24.0}  # focal_len : 240 is tenths of a millimetre
  (phantom,) = flight_log.read_log(write_log(tmp_path / "p4.SRT", PHANTOM))
  assert values(phantom) == {"latitude": 22.5432, "longitude": 113.9457, "altitude_m": 50.1, "heading_deg": None,
                             "pitch_deg": None, "focal_35mm": None}
  no_fix = MINI_4_PRO.replace("69.189116", "0.000000").replace("35.259334", "0.000000")
  first, _ = flight_log.read_log(write_log(tmp_path / "no_fix.SRT", no_fix))
  assert (first["latitude"], first["longitude"], first["altitude_m"]) == (None, None, 1.1)


def test_the_log_beside_a_video(tmp_path):
  video = tmp_path / "DJI_0001.MP4"
  video.write_bytes(b"")
  assert flight_log.log_beside(video) is None
  (tmp_path / "DJI_0002.SRT").write_text(MAVIC_3E)
  assert flight_log.log_beside(video) is None
  (tmp_path / "DJI_0001.srt").write_text(MAVIC_3E)
  assert flight_log.log_beside(str(video)) == str(tmp_path / "DJI_0001.srt")
  (tmp_path / "DJI_0001.SRT").write_text(MAVIC_3E)
  assert flight_log.log_beside(str(video)) == str(tmp_path / "DJI_0001.SRT")


def test_the_entry_at_a_time(tmp_path):
  """33 ms entries: 0.5 s is in the 16th, [0.495, 0.528); one entry a second: 2.9 s is in the third, and
  up to one entry's length past the end takes the last; further out the log does not cover the video."""
  entries = flight_log.read_log(write_log(tmp_path / "frames.SRT", enterprise_log(40, lambda i: -30.0 + i)))
  at_half = flight_log.camera_at(entries, 0.5)
  assert at_half["latitude"] == pytest.approx(47.00015) and at_half["altitude_m"] == 65.0
  assert at_half["heading_deg"] == pytest.approx(345.0) and at_half["pitch_deg"] == 75.0
  assert flight_log.camera_at(entries, 0.033)["altitude_m"] == 51.0
  assert flight_log.camera_at(entries, 0.0329)["altitude_m"] == 50.0
  seconds = flight_log.read_log(write_log(tmp_path / "seconds.SRT", enterprise_log(3, lambda i: 0.0, ms=1000)))
  assert [flight_log.camera_at(seconds, t)["altitude_m"] for t in (0.0, 0.99, 1.0, 2.9, 3.5)] == [50, 50, 51, 52, 52]
  with pytest.raises(GleamError, match=r"my.SRT has no entry at 4.100 s \(its entries run from 0.000 to 3.000 s\): "
                                       "it does not cover the video"):
    flight_log.camera_at(seconds, 4.1, log="my.SRT")
  late = flight_log.read_log(write_log(tmp_path / "late.SRT", enterprise_log(3, lambda i: 0.0, ms=1000,
                                                                             start_ms=1000)))
  assert flight_log.camera_at(late, 0.0)["altitude_m"] == 50  # within one entry's length of the first
  with pytest.raises(GleamError, match="no entry at 0.000 s"):
    flight_log.camera_at(flight_log.read_log(write_log(tmp_path / "later.SRT", enterprise_log(
        3, lambda i: 0.0, ms=500, start_ms=1000))), 0.0)


def test_subtitles_and_broken_logs(tmp_path):
  """Ordinary subtitles (or a file that is not UTF-8) are not a flight log; a log whose timing line is
  malformed stops, naming the entry."""
  subtitles = "1\n00:00:01,000 --> 00:00:02,500\nWhere are we?\n\n2\n00:00:03,000 --> 00:00:04,000\nNote: 5 km.\n"
  with pytest.raises(flight_log.NotAFlightLog, match="subs.srt records no drone telemetry"):
    flight_log.read_log(write_log(tmp_path / "subs.srt", subtitles))
  with pytest.raises(flight_log.NotAFlightLog, match="latin.srt is not UTF-8 text"):
    flight_log.read_log(write_log(tmp_path / "latin.srt", "1\n00:00:01,000 --> 00:00:02,000\nCaf\u00e9\n",
                                  encoding="latin-1"))
  broken = enterprise_log(3, lambda i: 0.0).replace("00:00:00,033 --> 00:00:00,066", "00:00:00,033 -> 00:00:00,066")
  with pytest.raises(GleamError, match=r"broken.SRT: entry 2 has no readable timing line \('00:00:00,033 -> "):
    flight_log.read_log(write_log(tmp_path / "broken.SRT", broken))
  backwards = enterprise_log(3, lambda i: 0.0).replace("00:00:00,066 --> 00:00:00,099", "00:00:00,066 --> 00:00:00,0")
  with pytest.raises(GleamError, match="backwards.SRT: entry 3 ends .* before it starts"):
    flight_log.read_log(write_log(tmp_path / "backwards.SRT", backwards))


def wrapped(degrees):
  return (degrees + 180.0) % 360.0 - 180.0


def test_extracted_frames_carry_the_pose_of_their_time(tmp_path, capsys):
  """A 1 s clip at 30 fps sampled at 2 fps keeps frames 0, 7, 15, 22 (0, 0.233, 0.5, 0.733 s): each PNG
  records the pose of its 33 ms entry (the yaw turns 10 deg a frame, through south), read back as a DJI
  photo's; the focal length gives the field of view. Adding the log, or changing it, extracts anew."""
  data_dir = str(tmp_path / "data")
  video = write_video(tmp_path / "DJI_0001.MP4", 30)
  bare, _ = video_files.extract_frames(video, 2.0, data_dir=data_dir)
  assert set(photo_camera.recorded_camera(bare[0]).values()) == {None}
  capsys.readouterr()
  log = write_log(tmp_path / "DJI_0001.SRT", enterprise_log(30, lambda i: wrapped(150.0 + 10 * i)))
  paths, _ = video_files.extract_frames(video, 2.0, data_dir=data_dir)
  folder = os.path.dirname(paths[0])
  assert folder != os.path.dirname(bare[0])
  assert [os.path.basename(p) for p in paths] == [f"frame_{i:06d}.png" for i in (0, 7, 15, 22)]
  assert capsys.readouterr().err == (f"extracted 4 frames of {video} (sampled at 2 fps; each frame's camera pose "
                                     f"from the flight log {log}) to {folder}\n")
  fov = photo_camera.horizontal_fov_deg(24, 64, 48)
  for path, i in zip(paths, (0, 7, 15, 22)):
    assert photo_camera.recorded_camera(path) == {
        "heading_deg": pytest.approx((150.0 + 10 * i) % 360), "pitch_deg": pytest.approx(90.0 - i),
        "altitude_m": pytest.approx(50.0 + i), "fov_deg": pytest.approx(fov), "north": "true"}
    xmp = Image.open(path).info["xmp"].decode()
    assert photo_camera.dji_xmp_value(xmp, "GpsLatitude") == pytest.approx(47 + i * 1e-5, abs=1e-9)
    assert photo_camera.dji_xmp_value(xmp, "GpsLongitude") == 8.545594
  with open(os.path.join(folder, video_files.CLIP_FILE), encoding="utf-8") as f:
    clip = json.load(f)
  assert clip["flight_log"] == os.path.realpath(log) and len(clip["cameras"]) == 4
  assert clip["cameras"][2] == {"latitude": 47.00015, "longitude": 8.545594, "altitude_m": 65.0,
                                "heading_deg": 300.0, "pitch_deg": 75.0, "focal_35mm": 24.0}
  assert video_files.extract_frames(video, 2.0, data_dir=data_dir)[0] == paths and not capsys.readouterr().err
  write_log(tmp_path / "DJI_0001.SRT", enterprise_log(30, lambda i: wrapped(-150.0 - 10 * i)))
  turned, _ = video_files.extract_frames(video, 2.0, data_dir=data_dir)
  assert os.path.dirname(turned[0]) != folder
  assert photo_camera.recorded_camera(turned[1])["heading_deg"] == pytest.approx(140.0)


def test_a_log_that_does_not_fit_the_video(tmp_path, capsys):
  """Subtitles beside a video: said on stderr, the frames carry no pose; a log shorter than the video
  stops before anything is written."""
  data_dir = str(tmp_path / "data")
  video = write_video(tmp_path / "flight.mp4", 30)
  (tmp_path / "flight.srt").write_text("1\n00:00:00,000 --> 00:00:02,000\nHello.\n")
  paths, _ = video_files.extract_frames(video, 2.0, "--query=flight.mp4", data_dir)
  err = capsys.readouterr().err
  assert err.startswith("--query=flight.mp4: frames without a camera pose: ") and "records no drone telemetry" in err
  assert f"sampled at 2 fps) to {os.path.dirname(paths[0])}" in err
  assert set(photo_camera.recorded_camera(paths[-1]).values()) == {None}
  with open(os.path.join(os.path.dirname(paths[0]), video_files.CLIP_FILE), encoding="utf-8") as f:
    clip = json.load(f)
  assert clip["flight_log"] is None and clip["cameras"] == [None] * 4
  other = write_video(tmp_path / "other.mp4", 30)
  log = write_log(tmp_path / "other.SRT", enterprise_log(10, lambda i: 0.0))  # 0.33 s of a 1 s clip
  with pytest.raises(GleamError, match=rf"--query=other.mp4: {other}: {log} has no entry at 0.500 s .*"
                                       "does not cover the video; put the log recorded with this video beside it"):
    video_files.extract_frames(other, 2.0, "--query=other.mp4", data_dir)
  assert len(os.listdir(video_files.frames_root(data_dir))) == 1  # the subtitled clip's folder alone
