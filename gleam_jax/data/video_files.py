"""Video files (a drone flight as .mp4, .mov, ...) as sampled frames, decoded with PyAV.

A clip is sampled as transformers' Qwen2.5-VL video processor samples one (`processor.sample_frames`:
about duration x fps frames, at least 4, whole temporal patches, evenly spaced from the first), and the
kept frames stand for `processor.sampled_fps` frames a second. The frames are decoded as transformers'
`read_video_pyav` decodes them (every frame in order, RGB), so the pixels are the same.

`extract_frames` writes a clip's sampled frames once as PNG files under
`<data dir>/video_frames/` (`$GLEAM_DATA_DIR`, default ~/gleam_data) and hands back their paths:
pairs files and jobs then read a flight as a folder of frames. A changed file (size or modification
time) or another rate is extracted anew; the folder appears whole or not at all.

Where a DJI drone's flight log lies beside the video (`flight_log.log_beside`: the `.SRT` of its name),
each frame carries the camera pose the log records at its time (frame i of the file at i / its frame
rate) as a DJI photo does: XMP `drone-dji:GimbalYawDegree` (-180..180), `GimbalPitchDegree`,
`RelativeAltitude`, `GpsLatitude`, `GpsLongitude`, and EXIF `FocalLengthIn35mmFilm`, so
`photo_camera.recorded_camera` reads a frame's pose as a photo's. Adding or changing the log extracts
the frames anew.

PyAV is an optional dependency: `pip install 'gleam_jax[video]'` (or `pip install av`).
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image
from PIL import PngImagePlugin

from gleam_jax.data import flight_log
from gleam_jax.data.photo_camera import EXIF_IFD, FOCAL_LENGTH_35MM
from gleam_jax.errors import GleamError, make_dir
from gleam_jax.models.qwen2_5_vl.processor import sample_frames, sampled_fps

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts")
CLIP_FILE = "clip.json"
_FORMAT = 2  # bump when the extracted layout changes, so old folders are not reused


def is_video_file(path) -> bool:
  """Whether `path` names a video file by its extension (a folder of frames does not)."""
  return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(VIDEO_EXTENSIONS)


def _av(where):
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise GleamError(f"{where}: reading a video file needs PyAV: pip install 'gleam_jax[video]' (or pip install "
                     "av); or give the video's frames as image files (a list, or a folder).") from None
  return av


def _open(path, where):
  av = _av(where)
  if not os.path.isfile(path):
    raise GleamError(f"{where}: video {path} not found.")
  try:
    container = av.open(path)
  except av.FFmpegError as e:
    raise GleamError(f"{where}: {path} is not a video PyAV can read ({e}); give an .mp4/.mov/... file, or its "
                     "frames as image files.") from None
  if not container.streams.video:
    container.close()
    raise GleamError(f"{where}: {path} holds no video stream; give a video file, or its frames as image files.")
  return av, container


def probe(path, where="A video") -> tuple[int, float]:
  """(frames, frames per second) of a video file's first video stream. Where the container does not
  record the frame count, the stream's packets are counted."""
  _, container = _open(path, where)
  with container:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
  if not rate or not total:
    raise GleamError(f"{where}: {path} records no frame rate or no frames; re-encode it (e.g. ffmpeg -i IN -r 30 "
                     "OUT.mp4), or give its frames as image files.")
  return int(total), float(rate)


def read_frames(path, indices, where="A video") -> list[np.ndarray]:
  """The frames at `indices` (increasing) of a video file, uint8 RGB [H, W, 3], decoded in order."""
  av, container = _open(path, where)
  wanted, frames = set(int(i) for i in indices), {}
  last = max(wanted)
  with container:
    container.streams.video[0].thread_type = "AUTO"  # frame and slice threads: the same pixels, sooner
    try:
      for i, frame in enumerate(container.decode(video=0)):
        if i in wanted:
          frames[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
          break
    except av.FFmpegError as e:
      raise GleamError(f"{where}: {path} could not be decoded at frame {len(frames)} ({e}); re-encode it, or give "
                       "its frames as image files.") from None
  missing = sorted(wanted - frames.keys())
  if missing:
    raise GleamError(f"{where}: {path} ended before frame {missing[0]} (it claims more frames than it holds); "
                     "re-encode it, or give its frames as image files.")
  return [frames[int(i)] for i in indices]


def sample_clip(path, fps=2.0, where="A video", temporal_patch_size=2) -> tuple[np.ndarray, float, float]:
  """(the indices of the frames kept, the rate they stand for, the file's frame rate) of the clip sampled
  at `fps`, from the file's frame count and rate (`probe`): nothing is decoded."""
  total, source_fps = probe(path, where)
  indices = _indices(total, source_fps, fps, f"{where}: {path}", temporal_patch_size)
  return indices, sampled_fps(len(indices), total, source_fps), source_fps


def read_clip(path, fps=2.0, where="A video", temporal_patch_size=2) -> tuple[list[np.ndarray], float, np.ndarray]:
  """(frames, the rate they stand for, their indices in the file): the clip sampled at `fps`."""
  indices, rate, _ = sample_clip(path, fps, where, temporal_patch_size)
  return read_frames(path, indices, where), rate, indices


def _indices(total, source_fps, fps, where, temporal_patch_size):
  try:
    return sample_frames(total, source_fps, fps, temporal_patch_size)
  except GleamError as e:
    raise GleamError(f"{where}: {e}") from None


def frames_root(data_dir=None):
  """Where extracted clips live: `<data dir>/video_frames`."""
  from gleam_jax.data.config import default_data_dir  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.expanduser(data_dir or default_data_dir()), "video_frames")


def _file_key(path):
  stat = os.stat(path)
  return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def _clip_folder(path, fps, root, log=None):
  key = json.dumps([_FORMAT, *_file_key(path), float(fps), _file_key(log) if log else None])
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(root, f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}")


def _dji_xmp(camera):
  """An XMP packet of a frame's camera as a DJI photo records its pose (the known values only)."""
  names = (("GimbalYawDegree", "heading_deg", 6), ("GimbalPitchDegree", "pitch_deg", 6),
           ("RelativeAltitude", "altitude_m", 6), ("GpsLatitude", "latitude", 8), ("GpsLongitude", "longitude", 8))
  values = dict(camera)
  if values["heading_deg"] is not None:
    values["heading_deg"] = (values["heading_deg"] + 180.0) % 360.0 - 180.0
  values["pitch_deg"] = None if camera["pitch_deg"] is None else -camera["pitch_deg"]
  attributes = " ".join(f'drone-dji:{name}="{values[key]:+.{digits}f}"' for name, key, digits in names
                        if values[key] is not None)
  return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
          f'<rdf:Description rdf:about="" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/" {attributes}/>'
          "</rdf:RDF></x:xmpmeta>")


def _save_frame(frame, path, camera):
  """A frame as a PNG file (lossless; fast to write), with its camera (`_dji_xmp`, EXIF focal length)."""
  options = dict(compress_level=1)
  if camera is not None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _dji_xmp(camera))
    options["pnginfo"] = info
    if camera["focal_35mm"]:
      exif = Image.Exif()
      exif.get_ifd(EXIF_IFD)[FOCAL_LENGTH_35MM] = int(round(camera["focal_35mm"]))
      options["exif"] = exif.tobytes()  # an Exif holding only a sub-IFD is falsy: PNG would leave it out
  Image.fromarray(frame).save(path, **options)


def _log_entries(log, where):
  """The flight log's entries, or None where the `.srt` is a video's ordinary subtitles (said on stderr)."""
  try:
    return flight_log.read_log(log)
  except flight_log.NotAFlightLog as e:
    print(f"{where}: frames without a camera pose: {e}", file=sys.stderr)
    return None


def _frame_cameras(path, indices, source_fps, entries, log, where):
  """The log's camera at the time of each kept frame (index / the file's frame rate), found before the
  clip is decoded."""
  try:
    return [flight_log.camera_at(entries, int(i) / source_fps, log) for i in indices]
  except GleamError as e:
    raise GleamError(f"{where}: {path}: {e}") from None


def extract_frames(path, fps=2.0, where="A video", data_dir=None) -> tuple[list[str], float]:
  """(PNG frame paths, the rate they stand for) of the clip of `path` sampled at `fps`, extracted once
  (see the module docstring) and reused while the file, its flight log and the rate stay the same."""
  _av(where)
  if not os.path.isfile(path):
    raise GleamError(f"{where}: video {path} not found.")
  root = frames_root(data_dir)
  log = flight_log.log_beside(path)
  folder = _clip_folder(path, fps, root, log)
  record = os.path.join(folder, CLIP_FILE)
  if not os.path.isfile(record):
    entries = _log_entries(log, where) if log else None
    log = log if entries else None  # ordinary subtitles: frames without a pose
    indices, rate, source_fps = sample_clip(path, fps, where)
    cameras = _frame_cameras(path, indices, source_fps, entries, log, where) if log else [None] * len(indices)
    frames = read_frames(path, indices, where)
    make_dir(root, "the video frames folder (config.data.data_dir or $GLEAM_DATA_DIR)")
    staging = tempfile.mkdtemp(prefix=".extracting-", dir=root)
    try:
      names = [f"frame_{int(i):06d}.png" for i in indices]
      for name, frame, camera in zip(names, frames, cameras):
        _save_frame(frame, os.path.join(staging, name), camera)
      with open(os.path.join(staging, CLIP_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(source=os.path.realpath(path), fps=float(fps), sampled_fps=rate, frames=names,
                       indices=[int(i) for i in indices], flight_log=log and os.path.realpath(log),
                       cameras=cameras), f)
      try:
        os.rename(staging, folder)
        pose = f"; each frame's camera pose from the flight log {log}" if log else ""
        print(f"extracted {len(names)} frames of {path} (sampled at {fps:g} fps{pose}) to {folder}", file=sys.stderr)
      except OSError:  # another process extracted the same clip first: theirs is the same
        if not os.path.isfile(record):
          raise
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  with open(record, encoding="utf-8") as f:
    clip = json.load(f)
  return [os.path.join(folder, name) for name in clip["frames"]], float(clip["sampled_fps"])
