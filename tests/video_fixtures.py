"""Video files written with PyAV for the tests: each frame tells its index by its brightness."""
import av
import numpy as np


def write_video(path, count, rate=30, size=(64, 48), container=None):
  """A clip whose frame i is a gradient brightened by 2 * i (so a decoded frame tells its index)."""
  w, h = size
  ramp = np.add.outer(np.arange(h) * 40 // h, np.arange(w) * 40 // w)
  frames = (np.repeat((ramp + 2 * i + 20)[..., None], 3, axis=-1).astype(np.uint8) for i in range(count))
  return write_frames(path, frames, rate, container)


def write_frames(path, frames, rate=30, container=None):
  """A lossless x264 clip of uint8 RGB frames [H, W, 3] of one even size (colour subsampled: yuv420p)."""
  with av.open(str(path), "w", format=container) as out:
    stream = out.add_stream("libx264", rate=rate, options={"crf": "0", "preset": "ultrafast"})
    for i, frame in enumerate(frames):
      if i == 0:
        stream.height, stream.width = frame.shape[:2]
        stream.pix_fmt = "yuv420p"
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return str(path)


def frame_index(frame, size=(64, 48)):
  """The index a decoded frame of `write_video` shows (its mean brightness, less the gradient's)."""
  w, h = size
  ramp = np.add.outer(np.arange(h) * 40 // h, np.arange(w) * 40 // w)
  return int(round((frame.astype(np.float64).mean() - ramp.mean() - 20) / 2))
