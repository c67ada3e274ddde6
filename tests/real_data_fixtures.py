"""Tiny copies of the published CVGL datasets, written with their real folder layouts, file names
and split-file formats, and an encoder that reads the location code painted into each image.

Every image is one flat colour whose red channel carries a location code (CODE_BASE + CODE_STEP *
code); flat colours survive JPEG, PNG and resizing, so `code_encoder` maps a query and the satellite
of the same location to the same embedding.
"""
import os

import jax.numpy as jnp
import numpy as np
import scipy.io
from PIL import Image

from gleam_jax.data.config import IMAGENET_MEAN, IMAGENET_STD

CODE_BASE, CODE_STEP, MAX_CODES = 20, 14, 16


def paint(path, code, size):
  """A flat (h, w) = size image carrying `code`, saved as JPEG or PNG by the file extension."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not 0 <= code < MAX_CODES:
    raise ValueError(f"code {code} out of range")
  red = CODE_BASE + CODE_STEP * code
  Image.new("RGB", (size[1], size[0]), (red, 90, 160)).save(path, quality=95)


def code_of(image):
  """The code painted into a decoded uint8 image."""
  return int(round((float(np.mean(image[..., 0])) - CODE_BASE) / CODE_STEP))


def code_encoder(images):
  """Normalised images (B, H, W, 3) -> (B, MAX_CODES): a sharp bump at the painted code."""
  red = jnp.mean(images[..., 0], axis=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
  centres = (CODE_BASE + CODE_STEP * jnp.arange(MAX_CODES)) / 255.0
  e = jnp.exp(-((red[:, None] - centres[None, :]) / (CODE_STEP / 255.0 / 4)) ** 2)
  return e / jnp.linalg.norm(e, axis=1, keepdims=True)


def write_lines(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(" ".join(str(x) for x in row) + "\n" for row in rows)


# VIGOR: 4 cities x 3 satellites (location ids 0..11 in city order). Each city has 2 train and 2
# test panoramas; the city's third satellite is the positive of no test panorama (gallery-only).
VIGOR_CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")


def vigor_satellite_name(city_index, j):
  return f"satellite_{41.8 + city_index + 0.001 * j:.6f}_{-87.6 - city_index - 0.001 * j:.6f}.png"


def write_vigor(root, pano_size=(16, 32), sat_size=(16, 16)):
  """Returns {'train'|'test': [(city, pano, positive id, [semi ids])]} (same-area split files)."""
  expected = {"train": [], "test": []}
  cross = {}
  for c, city in enumerate(VIGOR_CITIES):
    sats = [vigor_satellite_name(c, j) for j in range(3)]
    ids = [3 * c + j for j in range(3)]
    write_lines(f"{root}/splits/{city}/satellite_list.txt", [[s] for s in sats])
    for j, s in enumerate(sats):
      paint(f"{root}/{city}/satellite/{s}", ids[j], sat_size)
    rows = {"train": [], "test": []}
    for split, positives in (("train", (0, 1)), ("test", (0, 1))):
      for k, p in enumerate(positives):
        pano = f"pano{split}{k},{41.8 + c:.5f},{-87.6 - c:.5f},.jpg"
        paint(f"{root}/{city}/panorama/{pano}", ids[p], pano_size)
        semis = [(p + 1) % 3, (p + 2) % 3, (p + 1) % 3]
        row = [pano, sats[p], 0.5, -1.5]
        for s in semis:
          row += [sats[s], 10.25, 3.0]
        rows[split].append(row)
        expected[split].append((city, pano, ids[p], [ids[s] for s in semis]))
      write_lines(f"{root}/splits/{city}/same_area_balanced_{split}.txt", rows[split])
    write_lines(f"{root}/splits/{city}/pano_label_balanced.txt", rows["train"] + rows["test"])
    cross[city] = [(city, r[0], ids[sats.index(r[1])]) for r in rows["train"] + rows["test"]]
  expected["cross"] = cross
  return expected


# University-1652: train buildings 1, 2; test buildings 3, 4 are queried, 5 and 6 are distractors
# (6 has a satellite only). SUES-200 uses the same test layout under Testing/<altitude>/.
def write_university(root, size=(16, 16)):
  """Returns the expected {'train'|'test': sorted [(modality, location id, is_query)]}."""
  expected = {"train": [], "test": []}
  for b in (1, 2):
    paint(f"{root}/train/satellite/{b:04d}/{b:04d}.jpg", b, size)
    for i in range(3):
      paint(f"{root}/train/drone/{b:04d}/image-{i + 1:02d}.jpeg", b, size)
      expected["train"].append(("uav", b, True))
    paint(f"{root}/train/google/{b:04d}/{b:04d}_0.jpg", b, size)  # noisy images: not read
  paint(f"{root}/train/street/0001/0001_a.jpg", 1, size)
  expected["train"].append(("ground", 1, True))
  for b in (3, 4, 5, 6):
    paint(f"{root}/test/gallery_satellite/{b:04d}/{b:04d}.jpg", b, size)
  for b in (3, 4, 5):
    for i in range(2):
      paint(f"{root}/test/gallery_drone/{b:04d}/image-{i + 1:02d}.jpeg", b, size)
      if b == 5:
        expected["test"].append(("uav", b, False))
  for b in (3, 4):
    paint(f"{root}/test/query_satellite/{b:04d}/{b:04d}.jpg", b, size)
    for i in range(2):
      paint(f"{root}/test/query_drone/{b:04d}/image-{i + 1:02d}.jpeg", b, size)
      expected["test"].append(("uav", b, True))
  paint(f"{root}/test/query_street/0003/0003_s.jpg", 3, size)
  paint(f"{root}/test/gallery_street/0004/0004_s.jpg", 4, size)  # street gallery: not read
  paint(f"{root}/test/4K_drone/0003/image-01.jpeg", 3, size)  # not read
  expected["test"].append(("ground", 3, True))
  expected["test"].append(("uav", 6, False))  # the gallery-only satellite
  return {k: sorted(v) for k, v in expected.items()}


def write_sues200(root, size=(16, 16)):
  """Places 1, 2 train; 3, 4 test; the galleries hold all four. At 200 m every place has one more
  drone view than at 150 m. Returns {altitude: {'train'|'test': sorted [(location id, is_query)]}}."""
  expected = {}
  for altitude, views in (("150", 2), ("200", 3)):
    exp = {"train": [], "test": []}
    for p in (1, 2, 3, 4):
      paint(f"{root}/Testing/{altitude}/gallery_satellite/{p:04d}/0.png", p, size)
      for i in range(views):
        paint(f"{root}/Testing/{altitude}/gallery_drone/{p:04d}/{i}.jpg", p, size)
      split = "train" if p <= 2 else "test"
      if split == "train":
        paint(f"{root}/Training/{altitude}/satellite/{p:04d}/0.png", p, size)
        for i in range(views):
          paint(f"{root}/Training/{altitude}/drone/{p:04d}/{i}.jpg", p, size)
      else:
        paint(f"{root}/Testing/{altitude}/query_satellite/{p:04d}/0.png", p, size)
        for i in range(views):
          paint(f"{root}/Testing/{altitude}/query_drone/{p:04d}/{i}.jpg", p, size)
      exp[split] += [(p, True)] * views
    exp["test"] += [(p, False) for p in (1, 2) for _ in range(views)]
    expected[altitude] = {k: sorted(v) for k, v in exp.items()}
  return expected


def write_cvusa(root, pano_size=(16, 32), sat_size=(16, 16)):
  """Pairs 1..4 train, 5..7 test (val-19zl.csv). Returns {'train'|'test': [location ids]}."""
  expected = {"train": [1, 2, 3, 4], "test": [5, 6, 7]}
  for split, name in (("train", "train-19zl.csv"), ("test", "val-19zl.csv")):
    lines = []
    for n in expected[split]:
      paint(f"{root}/bingmap/19/{n:07d}.jpg", n, sat_size)
      paint(f"{root}/streetview/panos/{n:07d}.jpg", n, pano_size)
      lines.append([f"bingmap/19/{n:07d}.jpg,streetview/panos/{n:07d}.jpg,annotations/{n:07d}.png"])
    write_lines(f"{root}/splits/{name}", lines)
  return expected


CVACT_IDS = ["__-DFIFxvZBCn1873qkqXA", "_0aXqBKYMV4_Lz9ZuIF2tg", "-1aB2cD3eF4gH5iJ6kL7mN", "zz9Y8x7W6v5U4t3S2r1QpO",
             "A1b2C3d4E5f6G7h8I9j0Kk", "Qq_-Ww_-Ee_-Rr_-Tt_-Yy"]


def write_cvact(root, pano_size=(16, 32), sat_size=(16, 16), ext=".jpg", cell_ids=False):
  """ACT_data.mat as the release stores it (panoIds a char matrix, or a cell array with `cell_ids`;
  trainSet/valSet structs with 1-based trainInd/valInd columns). Returns {'train'|'test': 0-based
  positions in panoIds}."""
  expected = {"train": [0, 2, 3], "test": [5, 1]}
  for i, pano_id in enumerate(CVACT_IDS):
    paint(f"{root}/ANU_data_small/streetview/{pano_id}_grdView{ext}", i, pano_size)
    paint(f"{root}/ANU_data_small/satview_polish/{pano_id}_satView_polish{ext}", i, sat_size)
  os.makedirs(root, exist_ok=True)
  column = lambda idx: np.asarray(idx, np.float64).reshape(-1, 1) + 1
  scipy.io.savemat(f"{root}/ACT_data.mat", {
      "panoIds": np.asarray(CVACT_IDS, object).reshape(-1, 1) if cell_ids else np.asarray(CVACT_IDS),
      "utm": np.arange(2 * len(CVACT_IDS), dtype=np.float64).reshape(-1, 2),
      "trainSet": {"trainNum": float(len(expected["train"])), "trainInd": column(expected["train"])},
      "valSet": {"valNum": float(len(expected["test"])), "valInd": column(expected["test"])},
  })
  return expected
