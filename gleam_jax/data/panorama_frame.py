"""Ground photos placed in the panorama frame, at their compass heading.

A ground photo with a known heading (a phone's compass, the synthetic world's metadata) is the
part of a 360 deg panorama its camera sees. Warping it into an equirectangular canvas (column 0
looks north, azimuth grows clockwise, row 0 is the zenith, the horizon at H/2: the panorama
convention of `synthetic.render`) at that heading, with the rest of the canvas a neutral fill,
turns a limited-field-of-view query into a partial panorama. A panorama encoder then reads it
with what it already knows, and the panorama's synchronised augmentations (roll with the
satellite's rotation, mirror) apply to it unchanged. This is how limited-FOV queries with known
orientation are usually fed to panorama models.
"""
import numpy as np

from gleam_jax.errors import GleamError

FILL_RGB = (124, 116, 104)  # ImageNet's mean colour: zero after normalisation


def photo_to_panorama(photo, heading_deg, fov_deg, height):
  """(height, 2*height, 3) uint8 canvas holding `photo` (a level pinhole image, square pixels,
  horizontal field of view `fov_deg`, looking along `heading_deg` clockwise from north); bilinear."""
  photo = np.asarray(photo)
  if photo.ndim != 3 or photo.shape[2] != 3:
    raise GleamError(f"a ground photo must be (H, W, 3) RGB, got shape {photo.shape}.")
  if not 0.0 < float(fov_deg) < 180.0:
    raise GleamError(f"ground field of view {fov_deg} deg: give 0 < fov < 180.")
  h_img, w_img = photo.shape[:2]
  width = 2 * int(height)
  focal = (w_img / 2) / np.tan(np.radians(fov_deg) / 2)
  azimuth = (np.arange(width) + 0.5) / width * 2 * np.pi
  elevation = np.pi / 2 - (np.arange(height) + 0.5) / height * np.pi
  rel = (azimuth - np.radians(heading_deg) + np.pi) % (2 * np.pi) - np.pi  # in [-pi, pi)
  ahead = np.abs(rel) < np.pi / 2
  tan_rel = np.tan(np.where(ahead, rel, 0.0))
  cos_rel = np.cos(np.where(ahead, rel, 0.0))
  col = tan_rel * focal + w_img / 2 - 0.5  # (W,)
  row = h_img / 2 - 0.5 - np.tan(np.clip(elevation, -1.5, 1.5))[:, None] / cos_rel[None, :] * focal  # (H, W)
  col = np.broadcast_to(col[None, :], row.shape)
  inside = ahead[None, :] & (col >= -0.5) & (col <= w_img - 0.5) & (row >= -0.5) & (row <= h_img - 0.5)
  out = np.empty((height, width, 3), np.float32)
  out[:] = FILL_RGB
  out[inside] = bilinear(photo, row[inside], col[inside])
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def bilinear(image, row, col):
  """float32 (n, 3) colours of `image` at pixel-centre coordinates (row, col) (n,), clamped to the
  image: (0, 0) is the centre of the top-left pixel."""
  h_img, w_img = image.shape[:2]
  r = np.clip(row, 0, h_img - 1)
  c = np.clip(col, 0, w_img - 1)
  r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
  r1, c1 = np.minimum(r0 + 1, h_img - 1), np.minimum(c0 + 1, w_img - 1)
  fr, fc = (r - r0)[:, None], (c - c0)[:, None]
  img = image.astype(np.float32)
  top = img[r0, c0] * (1 - fc) + img[r0, c1] * fc
  bottom = img[r1, c0] * (1 - fc) + img[r1, c1] * fc
  return top * (1 - fr) + bottom * fr


def sector_mask(height, width, heading_deg, fov_deg):
  """(height, width, 1) float32: 1 in the panorama columns within fov_deg / 2 of azimuth `heading_deg`
  (the same column convention as `photo_to_panorama`), 0 elsewhere. A panorama times this mask (after
  normalisation, so the rest is the fill colour) is what a camera of that horizontal field of view
  at a known heading sees: the limited-field-of-view evaluation (`eval.panorama_fov_deg`)."""
  azimuth = (np.arange(width) + 0.5) / width * 360.0
  rel = (azimuth - heading_deg + 180.0) % 360.0 - 180.0
  keep = np.abs(rel) <= fov_deg / 2.0
  return np.broadcast_to(keep[None, :, None], (height, width, 1)).astype(np.float32)
