"""Rate and ETA for long loops (data building, training, embedding), and sizes in words."""
import time


class RateEta:
  """`update(done)` -> (items/s, eta seconds) measured since construction (or since `reset`)."""

  def __init__(self, total):
    self.total = total
    self.reset()

  def reset(self, done=0):
    self._t0 = time.perf_counter()
    self._done0 = done

  def update(self, done):
    elapsed = max(time.perf_counter() - self._t0, 1e-9)
    rate = (done - self._done0) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    return rate, eta


def format_eta(seconds):
  if seconds == float("inf"):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_size(n_bytes):
  """'7.51 GB' from a billion bytes up, else '18.7 MB'."""
  return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"
