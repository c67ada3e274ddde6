"""A DJI drone's flight log: the `.SRT` subtitle file it writes beside each video, read for the camera's pose.

The log is SubRip: entries of an index line, a `00:00:00,000 --> 00:00:00,033` timing line and text,
separated by blank lines (CRLF line ends, a UTF-8 byte order mark and `<font ...>` tags are allowed).
An entry covers one frame on most models (one second on some). Its text records `[name: value]`
fields, in one of these forms:

- newer consumer models (Mini 3/4 Pro, Air 3, Mavic 3): `[focal_len: 24.00] [latitude: 69.189116]
  [longitude: 35.259334] [rel_alt: 1.100 abs_alt: -2.927]`;
- enterprise models (Mavic 3E/3T, M30) add the gimbal: `[gb_yaw: -12.3 gb_pitch: -90.0 gb_roll: 0.0]`,
  absolute angles as the XMP of a DJI photo writes them (yaw clockwise from north, -180..180; pitch
  -90 looking straight down);
- older models: `[focal_len : 240] [latitude: 0.608553] [longtitude: -0.045555] [altitude: 1.469000]`
  (spaces before the colons, `longtitude`, and a focal length without a decimal point in tenths of
  a millimetre);
- Phantoms: `GPS(113.9457,22.5432,19) BAROMETER:50.1` (longitude first).

Each entry's values are `latitude`, `longitude` (degrees; 0, 0 is a drone without a GPS fix: unknown),
`altitude_m` (metres above the take-off point: `rel_alt`, `altitude` or `BAROMETER`), `heading_deg`
(`gb_yaw`, clockwise from north, 0..360), `pitch_deg` (`-gb_pitch`: degrees below the horizon, as
`photo_camera.recorded_camera` gives it) and `focal_35mm` (`focal_len`, the 35 mm-equivalent focal
length in millimetres); None where the log does not record it. A `.srt` that is not UTF-8 text or
records none of these is a video's ordinary subtitles, not a flight log (`NotAFlightLog`).
"""
import bisect
import os
import re

from gleam_jax.errors import GleamError

LOG_EXTENSIONS = (".SRT", ".srt")
VALUE_KEYS = ("latitude", "longitude", "altitude_m", "heading_deg", "pitch_deg", "focal_35mm")
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_FIELD = re.compile(rf"([A-Za-z_]+)\s*:\s*({NUMBER})")
_PHANTOM_GPS = re.compile(rf"\bGPS\s*\(\s*({NUMBER})\s*,\s*({NUMBER})")
_TIME = r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}")
_TAG = re.compile(r"<[^>]*>")
_ALTITUDE_FIELDS = ("rel_alt", "altitude", "barometer")
_LONGITUDE_FIELDS = ("longitude", "longtitude")
_TIMING_FIX = ("each entry needs a timing line such as 00:00:01,000 --> 00:00:01,033, as the drone writes it: "
               "restore the log from the drone's card, or move it away to read the video without its camera pose")


class NotAFlightLog(GleamError):
  """A subtitle file that records no drone telemetry (a video's ordinary subtitles)."""


def log_beside(video_path):
  """The flight log beside a video: a `.SRT` (or `.srt`) file of the video's name in its folder, or None."""
  stem = os.path.splitext(os.fspath(video_path))[0]
  return next((stem + ext for ext in LOG_EXTENSIONS if os.path.isfile(stem + ext)), None)


def read_log(path):
  """The log's entries in time order: dicts of `start_s`, `end_s` and the VALUE_KEYS (None where not
  recorded). Raises NotAFlightLog for a file that is not UTF-8 or records no telemetry, and a
  GleamError naming the entry for a log entry without a readable timing line."""
  text = _read_text(path)
  blocks = [block for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n")) if block.strip()]
  parsed = [_block_values(block) for block in blocks]
  if not any(value is not None for values in parsed for value in values.values()):
    raise NotAFlightLog(f"{path} records no drone telemetry (latitude, altitude, gimbal, focal length): it is not a "
                        "DJI flight log; rename or move it to keep it apart from the video.")
  entries = [dict(zip(("start_s", "end_s"), _timing(block, number, path)), **values)
             for number, (block, values) in enumerate(zip(blocks, parsed), 1)]
  return sorted(entries, key=lambda entry: entry["start_s"])


def camera_at(entries, seconds, log="the flight log"):
  """The values (VALUE_KEYS) of the entry whose [start, end) holds `seconds`. A time less than an entry's
  length past its end (in a gap, or past the last) takes that entry, as one less than the first entry's
  length before it takes the first; a time further out stops with a GleamError naming `log`."""
  starts = [entry["start_s"] for entry in entries]
  i = max(bisect.bisect_right(starts, seconds) - 1, 0)
  entry = entries[i]
  length = entry["end_s"] - entry["start_s"]
  if entry["start_s"] - length <= seconds < entry["end_s"] + length:
    return {key: entry[key] for key in VALUE_KEYS}
  raise GleamError(f"{log} has no entry at {seconds:.3f} s (its entries run from {entries[0]['start_s']:.3f} to "
                   f"{entries[-1]['end_s']:.3f} s): it does not cover the video; put the log recorded with this "
                   "video beside it, or move the log away to read the video without its camera pose.")


def _read_text(path):
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise GleamError(f"cannot read the flight log {path} ({e.strerror}); make it readable, or move it away from "
                     "the video.") from None
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError:
    raise NotAFlightLog(f"{path} is not UTF-8 text, so not a DJI flight log; rename or move it to keep it apart "
                        "from the video.") from None


def _timing(block, number, path):
  """(start, end) seconds of an entry; `number` (its place in the file) names it where it has no index line."""
  lines = block.strip("\n").split("\n")
  indexed = lines[0].strip().isdigit()
  label = lines[0].strip() if indexed else str(number)
  timing = lines[1] if indexed and len(lines) > 1 else lines[0]  # the index line is optional
  match = _TIMING.match(timing)
  if not match:
    raise GleamError(f"{path}: entry {label} has no readable timing line ({timing.strip()!r}); {_TIMING_FIX}.")
  start, end = _seconds(match.groups()[:4]), _seconds(match.groups()[4:])
  if end < start:
    raise GleamError(f"{path}: entry {label} ends ({timing.strip()}) before it starts; {_TIMING_FIX}.")
  return start, end


def _seconds(fields):
  hours, minutes, seconds, fraction = fields
  return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(fraction.ljust(3, "0")) / 1000


def _block_values(block):
  """The VALUE_KEYS an entry's text records, None where absent."""
  text = _TAG.sub(" ", "\n".join(line for line in block.split("\n") if "-->" not in line))
  fields = {name.lower(): value for name, value in _FIELD.findall(text)}
  number = lambda names: next((float(fields[n]) for n in names if n in fields), None)
  latitude, longitude = number(("latitude",)), number(_LONGITUDE_FIELDS)
  phantom = _PHANTOM_GPS.search(text)
  if phantom and latitude is None:
    longitude, latitude = float(phantom.group(1)), float(phantom.group(2))
  if latitude == 0 and longitude == 0:  # no GPS fix
    latitude = longitude = None
  yaw, pitch = number(("gb_yaw",)), number(("gb_pitch",))
  return {"latitude": latitude, "longitude": longitude, "altitude_m": number(_ALTITUDE_FIELDS),
          "heading_deg": None if yaw is None else yaw % 360.0, "pitch_deg": None if pitch is None else -pitch,
          "focal_35mm": _focal_mm(fields.get("focal_len"))}


def _focal_mm(value):
  """`focal_len` in millimetres: with a decimal point it is millimetres, else tenths of a millimetre."""
  if value is None:
    return None
  return float(value) if "." in value else int(value) / 10.0
