"""UAV views placed in the satellite frame: inverse perspective mapping onto the ground plane.

A drone photo with its camera pose (compass heading, gimbal pitch below the horizon, height above
the ground, field of view: what a drone's flight log or image metadata records) is a perspective
view of the ground around the point it looks at. Projecting every point of the ground plane
(z = 0) around that point into the photo and reading its colour gives a north-up orthographic
image in the satellite's own frame (`footprint_m` wide, centred on the look-at point, as the
satellite tile is centred on the location the drone circles). Flat ground lands where the satellite
shows it; buildings lean away from the camera, and what the camera does not see (under and behind
the drone) is a neutral fill. The query then differs from its satellite by appearance, not by an
unknown rotation and perspective, so an encoder trained on satellites reads it from the start, and
the satellite's rotations apply to it unchanged (the 'map' layout of `config.query_layout`).

Conventions are those of `synthetic.render` (x east, y north, z up; heading clockwise from north;
pixel (c, r) covers [c, c+1) x [r, r+1); satellite u = (x + F/2) / F * S, v = (F/2 - y) / F * S).
"""
import numpy as np

from gleam_jax.data.panorama_frame import FILL_RGB, bilinear
from gleam_jax.errors import GleamError


def ground_to_photo(x, y, heading_deg, pitch_deg, altitude_m, fov_deg, width, height):
  """Continuous pixel (u, v) of the ground points (x, y, 0) (metres from the look-at point) in the
  photo, and whether each lies in front of the camera."""
  h, p = np.radians(heading_deg), np.radians(pitch_deg)
  reach = altitude_m / np.tan(p)  # horizontal distance from the drone to the look-at point
  camera = np.array([-reach * np.sin(h), -reach * np.cos(h), altitude_m])
  forward = np.array([np.sin(h) * np.cos(p), np.cos(h) * np.cos(p), -np.sin(p)])
  right = np.array([np.cos(h), -np.sin(h), 0.0])
  up = np.cross(right, forward)
  d = np.stack([x - camera[0], y - camera[1], np.full_like(x, -camera[2])], axis=-1)
  depth = d @ forward
  focal = (width / 2) / np.tan(np.radians(fov_deg) / 2)
  safe = np.where(depth > 1e-6, depth, 1.0)
  return width / 2 + focal * (d @ right) / safe, height / 2 - focal * (d @ up) / safe, depth > 1e-6


def uav_to_satellite(photo, heading_deg, pitch_deg, altitude_m, fov_deg, footprint_m, size):
  """(size, size, 3) uint8 north-up image of the ground `footprint_m` wide around the point the
  camera looks at, read from `photo` (a pinhole image, square pixels, no roll, horizontal field of
  view `fov_deg`, looking along `heading_deg` clockwise from north, `pitch_deg` below the horizon,
  `altitude_m` above the ground); bilinear, the unseen ground `FILL_RGB`."""
  photo = np.asarray(photo)
  if photo.ndim != 3 or photo.shape[2] != 3:
    raise GleamError(f"a UAV view must be (H, W, 3) RGB, got shape {photo.shape}.")
  if not (0.0 < float(pitch_deg) <= 90.0 and float(altitude_m) > 0.0 and 0.0 < float(fov_deg) < 180.0
          and float(footprint_m) > 0.0):
    raise GleamError(f"a UAV camera needs 0 < pitch <= 90 deg, altitude > 0, 0 < fov < 180 deg and a "
                     f"satellite footprint > 0; got pitch_deg={pitch_deg}, altitude_m={altitude_m}, "
                     f"fov_deg={fov_deg}, footprint_m={footprint_m}.")
  h_img, w_img = photo.shape[:2]
  along = ((np.arange(size) + 0.5) / size - 0.5) * footprint_m
  x, y = np.meshgrid(along, -along)  # row 0 is the north edge
  u, v, ahead = ground_to_photo(x, y, heading_deg, pitch_deg, altitude_m, fov_deg, w_img, h_img)
  inside = ahead & (u >= 0) & (u <= w_img) & (v >= 0) & (v <= h_img)
  out = np.empty((size, size, 3), np.float32)
  out[:] = FILL_RGB
  out[inside] = bilinear(photo, v[inside] - 0.5, u[inside] - 0.5)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
