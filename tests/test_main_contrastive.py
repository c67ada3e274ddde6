"""The GLEAM-C job end to end on the tiny world: phase 1, resume after SIGKILL, phase 2, errors."""
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from config_files import load_config, tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main
from gleam_jax import retrieve
from gleam_jax.data import pipeline
from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import loop
from gleam_jax.utils.writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def train_losses(workdir):
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def phase1_workdir(tiny_cfg, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("phase1"))
  config = tiny_config("c_phase1", tiny_cfg.data_dir, total_steps=STEPS, **{"eval.panorama_fov_deg": (90,)})
  main.run(config, workdir)
  return workdir


def test_phase1_trains_logs_evaluates_and_checkpoints(phase1_workdir):
  rows = read_metrics(phase1_workdir)
  losses = train_losses(phase1_workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)])
  last = [r for r in rows if r["step"] == STEPS and "loss" in r][0]
  assert {"lr", "logit_scale", "grad_norm", "pairs_per_s"} <= set(last)
  assert "mfu" not in last  # no peak FLOP/s known for a CPU
  config = retrieve.load_config(phase1_workdir)  # model FLOPs of a step times steps/s
  b, (ph, pw), (sh, sw) = config.batch_size, config.data.panorama_size, config.data.satellite_size
  step_flops = gleam_c.contrastive_step_flops(config.model, [(b, ph, pw)], [(b, sh, sw)])
  assert last["model_tflops_per_s"] == pytest.approx(step_flops * last["pairs_per_s"] / b / 1e12)
  evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
  for split in ("test", "test_cross_city"):
    assert 0.0 <= evals[f"eval/{split}/panorama/R@1"] <= evals[f"eval/{split}/panorama/R@5"] <= 1.0
    # panoramas cut to a 90 deg field of view, as eval.panorama_fov_deg asks
    assert 0.0 <= evals[f"eval/{split}/panorama_fov90/R@1"] <= evals[f"eval/{split}/panorama_fov90/R@5"] <= 1.0
  with open(os.path.join(phase1_workdir, "config.json")) as f:
    assert json.load(f)["trainer"] == "contrastive"
  assert os.listdir(os.path.join(phase1_workdir, "tensorboard"))
  pngs = [f for _, _, files in os.walk(os.path.join(phase1_workdir, "eval")) for f in files if f.endswith(".png")]
  assert pngs
  assert str(STEPS) in os.listdir(os.path.join(phase1_workdir, "checkpoints"))


def test_evaluate_job_gives_the_training_jobs_last_metrics(phase1_workdir, tiny_cfg, tmp_path, monkeypatch):
  """--config.trainer=evaluate on the trained job's checkpoint: the same metrics as the job's own last
  evaluation, written into the evaluation's workdir; the trained job's workdir is not touched; no
  optimizer state is built."""
  built = []
  create = contrastive.create_train_state
  monkeypatch.setattr(contrastive, "create_train_state",
                      lambda *a, **k: built.append(create(*a, **k)) or built[-1])
  trained = {k: v for r in read_metrics(phase1_workdir) if r["step"] == STEPS for k, v in r.items()
             if k.startswith("eval/")}
  with open(os.path.join(phase1_workdir, "config.json")) as f:
    job_config = f.read()
  # total_steps 1 with the job's warmup: a schedule that could not be built, and is not (no optimizer)
  config = tiny_config("c_phase1", tiny_cfg.data_dir, trainer="evaluate", init_from=phase1_workdir,
                       total_steps=1, **{"eval.panorama_fov_deg": (90,)})
  results = main.run(config, str(tmp_path / "eval"))
  assert results == pytest.approx(trained) and len(trained) > 4
  [(setup, state)] = built
  assert set(state) == {"step", "params", "model_state", "rng"} and set(setup.shardings) == set(state)
  rows = read_metrics(str(tmp_path / "eval"))
  assert {k: v for r in rows for k, v in r.items() if k.startswith("eval/")} == pytest.approx(trained)
  assert all(r["step"] == STEPS for r in rows)
  assert os.path.exists(tmp_path / "eval" / "eval" / "test" / "summary.md")

  with pytest.raises(GleamError, match="trainer 'contrastive', and this job's trainer is 'evaluate'"):
    main.run(config, phase1_workdir)  # its own workdir: refused before anything is written
  with open(os.path.join(phase1_workdir, "config.json")) as f:
    assert f.read() == job_config
  config = tiny_config("c_phase1", tiny_cfg.data_dir, trainer="evaluate")
  with pytest.raises(GleamError, match="config.init_from"):
    main.run(config, str(tmp_path / "eval2"))
  config = tiny_config("c_phase1", tiny_cfg.data_dir, trainer="evaluate", init_from=str(tmp_path / "none"))
  with pytest.raises(GleamError, match="does not exist: check the path of the trained job"):
    main.run(config, str(tmp_path / "eval3"))


def _run_cli(workdir, data_dir, *extra):
  cmd = [sys.executable, "-m", "gleam_jax.main", "--config=configs/c_phase1.py:tiny", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", f"--config.total_steps={STEPS}", "--config.eval.at_end=False",
         *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished_checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_losses(phase1_workdir, tiny_cfg, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = _run_cli(workdir, tiny_cfg.data_dir)
  deadline = time.time() + 300
  while time.time() < deadline:  # kill -9 once a checkpoint is complete and training has gone past it
    assert proc.poll() is None, proc.communicate()
    if _finished_checkpoints(workdir) and max(train_losses(workdir)) > max(_finished_checkpoints(workdir)):
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(train_losses(workdir))
  assert killed_at < STEPS
  proc = _run_cli(workdir, tiny_cfg.data_dir)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert "resumed from" in out
  resumed, straight = train_losses(workdir), train_losses(phase1_workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in range(1, STEPS + 1)],
                             [straight[s] for s in range(1, STEPS + 1)], rtol=1e-5)


def test_a_damaged_checkpoint_is_named_with_the_step_to_fall_back_to(phase1_workdir, tiny_cfg, tmp_path, capsys):
  """A truncated array file in the latest checkpoint stops the resume on one message naming it, and
  nothing more on stderr; the fix it names (delete that step folder) resumes from the step before,
  with the same losses. The resumed run encodes each batch in 2 micro-batches of 8 (one row per device,
  gradient cache): the same losses and updates as the whole batch (no drop path in the tiny model)."""
  workdir = tmp_path / "job"
  shutil.copytree(phase1_workdir, workdir)
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  latest, before = workdir / "checkpoints" / str(steps[-1]), steps[-2]
  arrays = [os.path.join(d, f) for d, _, files in os.walk(latest / "state") for f in files
            if os.path.basename(d) == "d"]  # the array data files (OCDBT)
  for path in arrays:
    with open(path, "r+b") as f:
      f.truncate(64)
  proc = _run_cli(str(workdir), tiny_cfg.data_dir)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 2, err[-3000:]
  assert re.search(rf"^error: checkpoint {re.escape(str(latest))} cannot be read \(.+\); its files are damaged or "
                   rf"incomplete: delete that step folder to resume from step {before}, or use a new --workdir\.$",
                   err, re.MULTILINE), err[-3000:]
  # no reads were left in flight when Orbax closed its event loop (TensorStore's threads report those)
  assert "Event loop is closed" not in err and "Traceback" not in err, err[-3000:]
  # read for retrieval (parameters only), the message names the step to read instead
  with pytest.raises(GleamError, match=rf"delete that step folder to read step {before} instead"):
    retrieve.load_model(str(workdir))
  shutil.rmtree(latest)
  config = tiny_config("c_phase1", tiny_cfg.data_dir, total_steps=STEPS, grad_accum_steps=2, **{"eval.at_end": False})
  capsys.readouterr()
  main.run(config, str(workdir))
  assert "16 pairs (panorama 16; in 2 micro-batches)" in capsys.readouterr().out
  resumed, straight = train_losses(str(workdir)), train_losses(phase1_workdir)
  np.testing.assert_allclose([resumed[s] for s in range(before + 1, STEPS + 1)],
                             [straight[s] for s in range(before + 1, STEPS + 1)], rtol=1e-5)


def test_a_failed_batch_of_checkpoint_reads_raises_once_its_other_reads_are_done():
  """Orbax reads a checkpoint's arrays in one gather, which raises on the first failure, then closes
  its event loop: the arrays' handler lets the other reads finish first (whether they fail or not)."""
  finished = []

  async def read(name, delay, fails=False):
    await asyncio.sleep(delay)
    finished.append(name)
    if fails:
      raise OSError(f"{name} is damaged")

  async def batch():
    await asyncio.gather(read("a", 0, fails=True), read("b", 0.02), read("c", 0.05, fails=True))

  loop = asyncio.new_event_loop()  # as Orbax runs them: no cancelling of what is left, then close
  try:
    with pytest.raises(OSError, match="a is damaged"):
      loop.run_until_complete(checkpoint._reads_done(batch()))
    assert sorted(finished) == ["a", "b", "c"] and not asyncio.all_tasks(loop)
  finally:
    loop.close()


def test_phase2_starts_from_phase1(phase1_workdir, tiny_cfg, tmp_path):
  config = tiny_config("c_phase2", tiny_cfg.data_dir, "tiny,towers=locked", init_from=phase1_workdir, total_steps=3,
                       **{"optim.warmup_steps": 1, "eval.splits": ("test",), "eval.num_examples_png": 0})
  main.run(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  for modality in ("uav", "streetmap", "panorama", "ground", "uav_multiquery"):
    assert any(f"eval/test/{modality}/R@1" in r for r in rows)
  summary = open(tmp_path / "eval" / "test" / "summary.md").read()
  uav_views, uav_locations = map(int, re.search(r"uav (\d+), .*uav_multiquery (\d+)", summary).groups())
  assert uav_views == 2 * uav_locations  # the tiny world's two drone views per location, one query each
  phase1_loss = train_losses(phase1_workdir)[1]
  assert train_losses(str(tmp_path))[1] < phase1_loss  # trained weights, not a fresh init
  # towers=locked keeps phase 1's tower: panoramas and satellites embed exactly as before
  final = lambda workdir, key: [r[key] for r in read_metrics(workdir) if key in r][-1]
  for metric in ("R@1", "R@5", "R@10"):
    key = f"eval/test/panorama/{metric}"
    assert final(str(tmp_path), key) == final(phase1_workdir, key)
  from flax import nnx

  before, after = retrieve.load_model(phase1_workdir)[0], retrieve.load_model(str(tmp_path))[0]
  leaves = lambda module: [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]
  for x, y in zip(leaves(before.encoder), leaves(after.encoder), strict=True):
    np.testing.assert_array_equal(x, y)
  for m in ("uav", "streetmap", "ground"):  # each new tower started as that copy and has moved
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(before.encoder), leaves(getattr(after, f"{m}_encoder"))))
  rows = [r for r in rows if "batch_acc/ground" in r]
  assert rows and all(0 <= r[f"batch_acc/{m}"] <= 1 for r in rows for m in config.data.modalities)

  # the retrieve CLI places a ground photo in the panorama frame at the heading it is given
  from PIL import Image

  from gleam_jax.data import sources
  from gleam_jax.data.augment import query_in_frame
  source = sources.get_source(tiny_cfg, "test")
  index = sources.get_index(tiny_cfg, "test", source)
  gallery = tmp_path / "gallery"
  gallery.mkdir()
  rows = np.flatnonzero(index["modality"] == 3)[:4]  # ground photos of four locations
  for r in rows:
    Image.fromarray(source[int(r)]["satellite"]).save(gallery / f"loc{index['location_id'][r]}.png")
  record = source[int(rows[0])]
  Image.fromarray(record["query"]).save(tmp_path / "photo.png")
  with pytest.raises(GleamError, match="--heading_deg"):
    retrieve.search(str(tmp_path), str(tmp_path / "photo.png"), str(gallery), modality="ground")
  with pytest.raises(GleamError, match=r"query modalities uav, streetmap, ground, panorama: .*--modality"):
    retrieve.search(str(tmp_path), str(tmp_path / "photo.png"), str(gallery))
  top = retrieve.search(str(tmp_path), str(tmp_path / "photo.png"), str(gallery), k=4, modality="ground",
                        heading_deg=record["heading_deg"], fov_deg=record["fov_deg"])
  model, job = retrieve.load_model(str(tmp_path))
  framed = query_in_frame(record["query"], "ground", record, job.data)
  assert framed.shape[1] == 2 * framed.shape[0]
  q = np.asarray(model.encode(retrieve.prepare(framed, job.data.panorama_size, job.data)[None], tower="ground"))
  best = retrieve.prepare(retrieve.read_image(top[0][0]), job.data.satellite_size, job.data)[None]
  g = np.asarray(model.encode(best, tower="reference"))
  np.testing.assert_allclose(float(q[0] @ g[0]), top[0][1], rtol=1e-4, atol=1e-5)
  # ... or at the heading and field of view its EXIF records (a phone's compass and lens)
  from gleam_jax.data import photo_camera
  exif = Image.Exif()
  exif.get_ifd(photo_camera.GPS_IFD).update({photo_camera.GPS_IMG_DIRECTION_REF: "T",
                                             photo_camera.GPS_IMG_DIRECTION: record["heading_deg"]})
  exif.get_ifd(photo_camera.EXIF_IFD)[photo_camera.FOCAL_LENGTH_35MM] = 15
  Image.fromarray(record["query"]).save(tmp_path / "phone.jpg", exif=exif, quality=95)
  fov = photo_camera.horizontal_fov_deg(15, *record["query"].shape[1::-1])
  from_exif = retrieve.search(str(tmp_path), str(tmp_path / "phone.jpg"), str(gallery), k=4, modality="ground")
  given = retrieve.search(str(tmp_path), str(tmp_path / "phone.jpg"), str(gallery), k=4, modality="ground",
                          heading_deg=record["heading_deg"], fov_deg=fov)
  assert from_exif == given and 90 < fov < 92
  turned = retrieve.search(str(tmp_path), str(tmp_path / "phone.jpg"), str(gallery), k=4, modality="ground",
                           heading_deg=record["heading_deg"] + 180, fov_deg=fov)
  assert turned != given  # the heading matters: EXIF's was used

  # ... and a UAV view in the satellite frame from the camera it is given
  uav = source[int(np.flatnonzero((index["modality"] == 0) & (index["location_id"] == index["location_id"][rows[0]]))[0])]
  Image.fromarray(uav["query"]).save(tmp_path / "uav.png")
  camera = {k: uav[k] for k in ("heading_deg", "fov_deg", "pitch_deg", "altitude_m", "footprint_m")}
  with pytest.raises(GleamError, match="satellite frame.*--pitch_deg, --altitude_m"):
    retrieve.search(str(tmp_path), str(tmp_path / "uav.png"), str(gallery), modality="uav",
                    heading_deg=uav["heading_deg"], fov_deg=uav["fov_deg"], footprint_m=uav["footprint_m"])
  top = retrieve.search(str(tmp_path), str(tmp_path / "uav.png"), str(gallery), k=4, modality="uav", **camera)
  framed = query_in_frame(uav["query"], "uav", camera, job.data)
  q = np.asarray(model.encode(retrieve.prepare(framed, job.data.query_size, job.data)[None], tower="uav"))
  best = retrieve.prepare(retrieve.read_image(top[0][0]), job.data.satellite_size, job.data)[None]
  np.testing.assert_allclose(float(q[0] @ np.asarray(model.encode(best, tower="reference"))[0]), top[0][1],
                             rtol=1e-4, atol=1e-5)
  # ... or with the pose a DJI drone writes into the photo's XMP (the gallery's footprint given)
  xmp = (f'<x:xmpmeta><rdf:Description drone-dji:GimbalYawDegree="{(uav["heading_deg"] + 180) % 360 - 180:+.4f}" '
         f'drone-dji:GimbalPitchDegree="{-uav["pitch_deg"]:+.4f}" drone-dji:RelativeAltitude="{uav["altitude_m"]:+.4f}"/>'
         '</x:xmpmeta>')
  exif = Image.Exif()
  exif.get_ifd(photo_camera.EXIF_IFD)[photo_camera.FOCAL_LENGTH_35MM] = 26
  Image.fromarray(uav["query"]).save(tmp_path / "dji.jpg", exif=exif, xmp=xmp.encode(), quality=95)
  recorded = dict(heading_deg=round(uav["heading_deg"], 4), pitch_deg=round(uav["pitch_deg"], 4),
                  altitude_m=round(uav["altitude_m"], 4), fov_deg=photo_camera.horizontal_fov_deg(26, 1, 1))
  from_xmp = retrieve.search(str(tmp_path), str(tmp_path / "dji.jpg"), str(gallery), k=4, modality="uav",
                             footprint_m=uav["footprint_m"])
  given = retrieve.search(str(tmp_path), str(tmp_path / "dji.jpg"), str(gallery), k=4, modality="uav",
                          footprint_m=uav["footprint_m"], **recorded)
  assert [f for f, _ in from_xmp] == [f for f, _ in given]
  np.testing.assert_allclose([v for _, v in from_xmp], [v for _, v in given], rtol=1e-4, atol=1e-5)
  with pytest.raises(GleamError, match="does not record all of it.*--footprint_m"):
    retrieve.search(str(tmp_path), str(tmp_path / "dji.jpg"), str(gallery), modality="uav")
  # ... or a DJI video's frames, each with the pose its flight log (.SRT) records at that frame's time
  from gleam_jax.data import video_files
  from video_fixtures import write_frames
  views = [source[int(r)] for r in np.flatnonzero(index["modality"] == 0)[:4]]
  poses = [dict(heading_deg=round(v["heading_deg"], 4), pitch_deg=round(v["pitch_deg"], 4),
                altitude_m=round(v["altitude_m"], 4),
                fov_deg=photo_camera.horizontal_fov_deg(26, *v["query"].shape[1::-1])) for v in views]
  assert len({p["heading_deg"] for p in poses}) == 4  # the heading turns over the flight
  video = write_frames(tmp_path / "DJI_0001.MP4", [v["query"] for v in views], rate=2)
  (tmp_path / "DJI_0001.SRT").write_text("\n".join(
      f"{i + 1}\n00:00:0{i // 2},{i % 2 * 500:03d} --> 00:00:0{(i + 1) // 2},{(i + 1) % 2 * 500:03d}\n"
      f"[focal_len: 26.00] [rel_alt: {p['altitude_m']:.4f} abs_alt: 300.0] "
      f"[gb_yaw: {(p['heading_deg'] + 180) % 360 - 180:.4f} gb_pitch: {-p['pitch_deg']:.4f} gb_roll: 0.0]\n"
      for i, p in enumerate(poses)))
  frames, _ = video_files.extract_frames(video, 2.0, "test", str(tmp_path / "data"))
  from_log, _ = retrieve.search_all(str(tmp_path), frames, str(gallery), k=4, modality="uav", pngs=False,
                                    footprint_m=uav["footprint_m"])
  one_pose, _ = retrieve.search_all(str(tmp_path), frames, str(gallery), k=4, modality="uav", pngs=False,
                                    footprint_m=uav["footprint_m"], **poses[0])
  for frame, pose in zip(frames, poses):
    given = retrieve.search(str(tmp_path), frame, str(gallery), k=4, modality="uav", footprint_m=uav["footprint_m"],
                            **pose)
    assert [f for f, _ in from_log[frame]] == [f for f, _ in given]
    np.testing.assert_allclose([v for _, v in from_log[frame]], [v for _, v in given], rtol=1e-4, atol=1e-5)
  assert all(not np.allclose([v for _, v in from_log[f]], [v for _, v in one_pose[f]], rtol=1e-4, atol=1e-5)
             for f in frames[1:])  # one pose given for the whole flight is not each frame's

  # a pairs file of two modalities: each pair's query read by its modality's tower, an AUC per modality
  streetmap = np.flatnonzero(index["modality"] == 1)[:2]
  for i, r in enumerate(streetmap):
    Image.fromarray(source[int(r)]["query"]).save(tmp_path / f"map{i}.png")
    Image.fromarray(source[int(r)]["satellite"]).save(tmp_path / f"map_sat{i}.png")
  lines = [{"images": ["map0.png", "map_sat0.png"], "match": True, "modality": "streetmap"},
           {"images": ["map0.png", "map_sat1.png"], "match": False, "modality": "streetmap"},
           {"images": ["photo.png", "map_sat0.png"], "match": False, "modality": "ground"}]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  with pytest.raises(GleamError, match="--heading_deg"):  # ground photos need their camera here too
    retrieve.score_pairs(str(tmp_path), str(tmp_path / "pairs.jsonl"))
  scores, summary = retrieve.score_pairs(str(tmp_path), str(tmp_path / "pairs.jsonl"),
                                         heading_deg=record["heading_deg"], fov_deg=record["fov_deg"])
  read = lambda name, size: retrieve.prepare(retrieve.read_image(str(tmp_path / name)), size, job.data)[None]
  street = lambda name: read(name, retrieve.query_shape(job.data, "streetmap"))
  sat = lambda name: read(name, job.data.satellite_size)
  want = [float(np.asarray(model.encode(street("map0.png"), tower="streetmap"))[0]
                @ np.asarray(model.encode(sat(f"map_sat{i}.png"), tower="reference"))[0]) for i in (0, 1)]
  framed = query_in_frame(record["query"], "ground", record, job.data)
  ground = np.asarray(model.encode(retrieve.prepare(framed, job.data.panorama_size, job.data)[None], tower="ground"))
  want.append(float(ground[0] @ np.asarray(model.encode(sat("map_sat0.png"), tower="reference"))[0]))
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
  assert summary["cosine_auc/streetmap"] == (1.0 if scores[0] > scores[1] else 0.0)
  assert summary["cosine_auc/ground"] is None and summary["pairs"] == 3  # no matching ground pair


def test_phase2_without_phase1_says_what_to_do(tiny_cfg, tmp_path):
  config = tiny_config("c_phase2", tiny_cfg.data_dir, init_from=str(tmp_path / "missing"))
  with pytest.raises(GleamError, match="run phase 1 first"):
    main.run(config, str(tmp_path / "job"))


def test_batch_that_does_not_divide_fails_with_the_numbers(tiny_cfg, tmp_path):
  config = tiny_config("c_phase1", tiny_cfg.data_dir, batch_size=12)
  with pytest.raises(GleamError, match=r"config.batch_size=12 .*8 shards.*multiple of 8"):
    main.run(config, str(tmp_path))


def test_gradient_accumulation_that_does_not_divide_stops_before_training(tiny_cfg, tmp_path):
  with pytest.raises(GleamError, match=r"config.batch_size=16 does not split into config.grad_accum_steps=4 "
                                       r"micro-batches over the mesh's 8 data shards: use a multiple of 32"):
    main.run(tiny_config("c_phase1", tiny_cfg.data_dir, grad_accum_steps=4), str(tmp_path / "four"))
  with pytest.raises(GleamError, match=r"config.grad_accum_steps=0 must be positive"):
    main.run(tiny_config("c_phase1", tiny_cfg.data_dir, grad_accum_steps=0), str(tmp_path / "zero"))
  assert os.listdir(tmp_path / "four") == ["config.json"]  # no checkpoint, no metrics


def test_nan_loss_stops_naming_step_and_checkpoint(tiny_cfg, tmp_path, monkeypatch):
  original_next = pipeline.ModalityStreams.__next__
  count = [0]

  def poisoned(self):
    batch = original_next(self)
    count[0] += 1
    if count[0] == 6:
      batch["query"] = {m: np.full_like(q, np.nan) for m, q in batch["query"].items()}
    return batch

  monkeypatch.setattr(pipeline.ModalityStreams, "__next__", poisoned)
  config = tiny_config("c_phase1", tiny_cfg.data_dir, **{"eval.at_end": False})
  with pytest.raises(GleamError, match=r"the loss is nan and the grad norm is nan at step 6\. Last good checkpoint: "
                                       r"step 4 \(.*checkpoints/4\)\. Lower config\.optim\.lr, then run again"):
    main.run(config, str(tmp_path))
  # a gradient that is not finite stops the run too, though its loss (computed before the update) is:
  # the update would put NaN into the parameters that step's checkpoint saves
  with pytest.raises(GleamError, match=r"^the grad norm is inf at step 8\. Last good checkpoint: step 6 \(/c/6\)\. "
                                       r"Lower config\.optim\.lr or set config\.optim\.clip_norm, then run"):
    loop.check_finite([(7, {"loss": 2.0, "grad_norm": 1.0}), (8, {"loss": 2.0, "grad_norm": np.inf})],
                              (6, "/c/6"), clip_norm=None)


def test_phase2_tower_recipes():
  shared = load_config("c_phase2", "steps=10")  # the default: GLEAM-C's one encoder
  assert shared.model.modality_towers == () and "panorama" in shared.data.modalities
  modality = load_config("c_phase2", "towers=modality")
  assert modality.model.modality_towers == ("uav", "streetmap", "ground") and not modality.optim.frozen
  assert modality.data.modalities == ("uav", "streetmap", "panorama", "ground")
  locked = load_config("c_phase2", "towers=locked")
  assert locked.data.modalities == ("uav", "streetmap", "ground") and locked.optim.frozen
  assert locked.eval.modalities == ("uav", "streetmap", "panorama", "ground")
  with pytest.raises(GleamError, match="towers='separate'"):
    load_config("c_phase2", "towers=separate")
  # the synthetic world's views are read in the frames their cameras give; a published dataset's as they are
  assert (shared.data.ground_frame, shared.data.uav_frame) == ("panorama", "satellite")
  u1652 = load_config("c_phase2", "data=university1652")
  assert (u1652.data.ground_frame, u1652.data.uav_frame, u1652.data.modalities) == ("photo", "photo", ("uav", "ground"))
  # several drone views per location: also scored as one query per location, where evaluated
  multi_query = contrastive.multi_query_modalities
  assert multi_query(shared) == multi_query(locked) == multi_query(u1652) == ("uav",)
  assert multi_query(load_config("c_phase1", "data=university1652")) == ("uav",)
  assert multi_query(load_config("c_phase2", "data=vigor")) == multi_query(load_config("c_phase1")) == ()
  shared.eval.modalities = ("panorama",)
  assert multi_query(shared) == ()
  with pytest.raises(GleamError, match="unknown config knob 'towers'"):
    load_config("c_phase1", "towers=modality")
  # the knobs apply with tiny too: a real ConvNeXt variant, another input size, on the tiny world
  atto = load_config("c_phase1", "tiny,variant=atto,res=48")
  assert atto.model.variant == "atto" and atto.model.dims is None and atto.data.query_size == (48, 48) and atto.data.config == "tiny"


def test_unknown_config_key_is_rejected_on_one_line(tmp_path):
  """A typo in an override stops before anything is written: one line naming the flag, with the hint."""
  workdir = tmp_path / "job"
  result = subprocess.run(
      [sys.executable, "-m", "gleam_jax.main", "--config=configs/c_phase1.py:tiny", f"--workdir={workdir}",
       "--config.batch_size=8", "--config.optim.lrr=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --config.optim.lrr: the config has no field 'lrr'. Did you mean \"lr\" instead of \"lrr\"? The "
      "config is locked: its fields are in the config file (and --helpfull)."]
  assert not workdir.exists()


@pytest.mark.parametrize("args, line", [
    (["--config=configs/c_phase1.py:tny"], "error: --config=configs/c_phase1.py:tny: unknown preset 'tny' in 'tny'; "
     "use 'tiny' or key=value with the knobs variant, data, res, steps, batch, sampler, loss, lr, modalities, vit, lora."),
    (["--config=configs/c_phase1.py:steps=ten"],
     "error: --config=configs/c_phase1.py:steps=ten: config knob steps='ten' must be an integer."),
    (["--config=configs/c_phase1.py:data=s32"], "error: --config=configs/c_phase1.py:data=s32: data.config='s32' is "
     "not a builder config of synthetic_cvgl; choose one of ('tiny', 's64', 's128')."),
    (["--config=configs/c_phase9.py"], "error: --config=configs/c_phase9.py: cannot load this config file ([Errno 2] "
     "No such file or directory: 'configs/c_phase9.py'); give the path of a config file, e.g. "
     "--config=configs/c_phase1.py."),
    ([], "error: --config is required, e.g. --config=configs/c_phase1.py (presets after a colon: :tiny)."),
    (["--config=configs/c_phase1.py:tiny", "--config.optim.lr=fast"],
     "error: flag --config.optim.lr=fast: could not convert string to float: 'fast'"),
])
def test_bad_config_arguments_stop_on_one_line(args, line, tmp_path):
  """A config that cannot be built stops before anything is written, on one line naming the argument."""
  workdir = tmp_path / "job"
  result = subprocess.run([sys.executable, "-m", "gleam_jax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert (result.returncode, result.stderr.strip().splitlines()) == (2, [line])
  assert not workdir.exists()


@pytest.mark.parametrize("args,line", [
    (["--pairs=p.jsonl", "--query=q.png"], "error: --pairs scores the pairs of a file against their own satellites: "
     "leave out --query and --gallery."),
    (["--query=q.png"], "error: give --query (an image or a folder) and --gallery (a folder of satellites), or "
     "--pairs."),
])
def test_retrieve_command_needs_a_query_and_gallery_or_pairs(args, line, tmp_path):
  result = subprocess.run([sys.executable, "-m", "gleam_jax.retrieve", f"--workdir={tmp_path}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert (result.returncode, result.stderr.strip().splitlines()) == (2, [line])


def test_benchmark_config_typo_is_rejected_on_one_line():
  """bench.train_step reads the same configs: a typo in its overrides stops the same way, also when
  it runs on its default config (configs/c_phase1.py, added to the arguments when none is named)."""
  result = subprocess.run([sys.executable, "-m", "gleam_jax.bench.train_step", "--config.batch_sise=8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --config.batch_sise: the config has no field 'batch_sise'. Did you mean \"batch_size\" instead of "
      "\"batch_sise\"? The config is locked: its fields are in the config file (and --helpfull)."]


def test_folders_that_cannot_be_made_are_named(tiny_cfg, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(GleamError, match=r"--workdir=.*file/job: cannot create this folder \(Not a directory\)"):
    main.run(tiny_config("c_phase1", tiny_cfg.data_dir), str(tmp_path / "file" / "job"))
  config = tiny_config("c_phase1", str(tmp_path / "file" / "data"))
  with pytest.raises(GleamError, match=r"data.data_dir=.*file/data: cannot create this folder"):
    main.run(config, str(tmp_path / "job"))


def test_optimizer_values_adamw_cannot_train_with_stop_first(tiny_cfg, tmp_path):
  for field, value, rule in [("lr", -1.0, "> 0"), ("b2", 1.5, r"in \[0, 1\)"), ("weight_decay", -0.1, ">= 0"),
                             ("warmup_steps", -5, ">= 0")]:
    with pytest.raises(GleamError, match=rf"config.optim.{field}={value} must be {rule}"):
      main.run(tiny_config("c_phase1", tiny_cfg.data_dir, **{f"optim.{field}": value}), str(tmp_path / field))
    assert os.listdir(tmp_path / field) == ["config.json"]  # nothing trained
  # a warmup the steps cannot hold (total_epochs resolved to steps first) stops before any model is built
  with pytest.raises(GleamError, match=r"config.optim.warmup_steps=8 is not below the 4 total steps; lower it"):
    main.run(tiny_config("c_phase1", tiny_cfg.data_dir, total_steps=4, **{"optim.warmup_steps": 8}),
             str(tmp_path / "warmup"))
  assert os.listdir(tmp_path / "warmup") == ["config.json"]


def test_a_workdir_with_an_unreadable_config_is_refused_and_kept(tiny_cfg, tmp_path):
  (tmp_path / "config.json").write_text("{ not json")
  with pytest.raises(GleamError, match=r"config.json is not a job's config .*empty workdir"):
    main.run(tiny_config("c_phase1", tiny_cfg.data_dir), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == "{ not json"


def test_retrieve_ranks_gallery_files_and_writes_png(phase1_workdir, tiny_cfg, tmp_path, capsys, monkeypatch):
  from PIL import Image

  from gleam_jax.data import sources

  source = sources.get_source(tiny_cfg, "test")
  index = sources.get_index(tiny_cfg, "test", source)
  gallery = tmp_path / "gallery"
  gallery.mkdir()
  rows = np.flatnonzero(index["modality"] == 2)[:5]  # panoramas of five locations
  for r in rows:
    Image.fromarray(source[int(r)]["satellite"]).save(gallery / f"loc{index['location_id'][r]}.png")
  (gallery / "notes.txt").write_text("not an image")
  query = tmp_path / "query.jpg"
  Image.fromarray(source[int(rows[0])]["query"]).save(query)

  top = retrieve.search(phase1_workdir, str(query), str(gallery), k=3)
  out = capsys.readouterr().out
  assert len(top) == 3 and "1 non-image files skipped" in out
  scores = [s for _, s in top]
  assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
  # The scores are the model's cosine similarities.
  model, config = retrieve.load_model(phase1_workdir)
  prep = lambda path, size: retrieve.prepare(retrieve.read_image(path), size, config.data)[None]
  q = np.asarray(model.encode(prep(str(query), config.data.panorama_size), tower="query"))
  g = np.asarray(model.encode(prep(top[0][0], config.data.satellite_size), tower="reference"))
  np.testing.assert_allclose(float(q[0] @ g[0]), top[0][1], rtol=1e-4, atol=1e-5)
  assert os.path.exists(os.path.join(phase1_workdir, "retrieve", "query_top3.png"))

  # The gallery's embeddings are kept and reused while its files stay the same, embedded again when
  # one changes: the same ranking either way.
  assert retrieve.search(phase1_workdir, str(query), str(gallery), k=3) == top
  assert "gallery embeddings from" in capsys.readouterr().out
  first = gallery / f"loc{index['location_id'][rows[0]]}.png"
  Image.fromarray(source[int(rows[0])]["satellite"][::-1]).save(first)  # the top-1 tile, flipped
  changed = retrieve.search(phase1_workdir, str(query), str(gallery), k=5)
  assert "gallery embeddings from" not in capsys.readouterr().out
  assert dict(changed)[str(first)] != pytest.approx(dict(top).get(str(first), 2.0))
  cached = retrieve.search(phase1_workdir, str(query), str(gallery), k=5)
  assert "gallery embeddings from" in capsys.readouterr().out and cached == changed

  # A folder of queries: each ranked as alone, a PNG each in `out`.
  queries = tmp_path / "queries"
  queries.mkdir()
  for r in rows[:3]:
    Image.fromarray(source[int(r)]["query"]).save(queries / f"q{index['location_id'][r]}.png")
  paths, fps = retrieve.query_files(str(queries))
  assert fps == 2.0  # a folder's frame rate is the one given (a flight's frames)
  found, recall = retrieve.search_all(phase1_workdir, paths, str(gallery), k=2, out=str(tmp_path / "pngs"))
  assert list(found) == paths and recall is None
  for path in paths:
    alone = retrieve.search(phase1_workdir, path, str(gallery), k=2)
    assert [f for f, _ in found[path]] == [f for f, _ in alone]
    np.testing.assert_allclose([s for _, s in found[path]], [s for _, s in alone], rtol=1e-5, atol=1e-6)
  assert sorted(os.listdir(tmp_path / "pngs")) == sorted(
      f"{os.path.splitext(os.path.basename(p))[0]}_top2.png" for p in paths)
  # --one_place: the folder's images as views of one place, one query with the mean of their embeddings
  place, _ = retrieve.search_all(phase1_workdir, paths, str(gallery), k=5, one_place=True,
                                 results=str(tmp_path / "place.jsonl"))
  assert list(place) == [str(queries)]
  views = np.asarray(model.encode(np.concatenate([prep(p, config.data.panorama_size) for p in paths]), tower="query"))
  mean = views.mean(axis=0) / np.linalg.norm(views.mean(axis=0))
  gallery_files = retrieve.image_files(str(gallery), "--gallery")[0]
  satellites = np.asarray(model.encode(np.concatenate([prep(f, config.data.satellite_size) for f in gallery_files]),
                                       tower="reference"))
  want = np.argsort(-(satellites @ mean))
  assert [f for f, _ in place[str(queries)]] == [gallery_files[i] for i in want]
  np.testing.assert_allclose([s for _, s in place[str(queries)]], (satellites @ mean)[want], rtol=1e-4, atol=1e-5)
  assert os.path.exists(os.path.join(phase1_workdir, "retrieve", "queries_top5.png"))
  assert json.loads((tmp_path / "place.jsonl").read_text())["views"] == paths
  assert "3 views as one place" in capsys.readouterr().out
  with pytest.raises(GleamError, match="--one_place .* --match_by_name .*: give one of them"):
    retrieve.search_all(phase1_workdir, paths, str(gallery), one_place=True, match_by_name=True)
  # queries named as their satellites: a results file without PNGs, and R@K over the folder
  named = tmp_path / "named"
  named.mkdir()
  for r in rows[:3]:
    Image.fromarray(source[int(r)]["query"]).save(named / f"loc{index['location_id'][r]}.jpg")
  pngs_before = sorted(os.listdir(os.path.join(phase1_workdir, "retrieve")))
  results = tmp_path / "results" / "top2.jsonl"
  found, recall = retrieve.search_all(phase1_workdir, retrieve.query_files(str(named))[0], str(gallery), k=2,
                                      pngs=False, results=str(results), match_by_name=True)
  assert sorted(os.listdir(os.path.join(phase1_workdir, "retrieve"))) == pngs_before
  lines = [json.loads(line) for line in results.read_text().splitlines()]
  assert [line["query"] for line in lines] == list(found) and len(lines) == 3
  hits = {1: [], 2: []}
  for line in lines:
    assert [(t["file"], t["score"]) for t in line["top"]] == found[line["query"]] and line["modality"] == "panorama"
    assert line["true"] == str(gallery / (os.path.splitext(os.path.basename(line["query"]))[0] + ".png"))
    for K in hits:
      hits[K].append(line["true"] in [t["file"] for t in line["top"][:K]])
  assert recall == {"R@1": np.mean(hits[1]), "R@2": np.mean(hits[2])}
  assert f"3 queries matched by name: R@1 {np.mean(hits[1]):.1%}" in capsys.readouterr().out
  (named / "stray.jpg").write_bytes((named / os.listdir(named)[0]).read_bytes())
  with pytest.raises(GleamError, match=r"--match_by_name: 1 of 4 queries have no gallery image of the same name"):
    retrieve.search_all(phase1_workdir, retrieve.query_files(str(named))[0], str(gallery), match_by_name=True)
  with pytest.raises(GleamError, match="--query=.*missing.png"):
    retrieve.query_files(str(tmp_path / "missing.png"))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(GleamError, match=r"--out=.*a_file/pngs: cannot create this folder"):
    retrieve.search_all(phase1_workdir, paths, str(gallery), k=2, out=str(tmp_path / "a_file" / "pngs"))

  # requests that cannot be answered stop before anything is embedded
  with pytest.raises(GleamError, match=r"--k=0: ask for at least one"):
    retrieve.search(phase1_workdir, str(query), str(gallery), k=0)
  with pytest.raises(GleamError, match=r"--modality=uav: .* trained for the query modalities panorama; give one"):
    retrieve.search(phase1_workdir, str(query), str(gallery), modality="uav")
  with monkeypatch.context() as patch:  # as a user without write permission there (root may write anywhere)
    patch.setattr(retrieve.os, "access", lambda path, mode: False)
    with pytest.raises(GleamError, match=r"--out=.*q.png: cannot write in .* \(permission denied\)"):
      retrieve.search(phase1_workdir, str(query), str(gallery), out=str(tmp_path / "q.png"))

  (gallery / "broken.png").write_bytes(b"not a png")
  with pytest.raises(GleamError, match="broken.png"):
    retrieve.search(phase1_workdir, str(query), str(gallery), k=3)


def test_retrieve_measures_how_far_candidates_are_from_where_queries_were_taken(phase1_workdir, tiny_cfg, tmp_path,
                                                                                capsys):
  """A gallery named by its centres (VIGOR's satellite_<lat>_<lon>.png) or given them in a CSV, and queries whose
  EXIF GPS records where they were taken (the world's coordinates of their location): each candidate's distance
  (haversine, by hand here), Dis@1 and the hit rates within 25-250 m; a place's position is its views' mean."""
  from PIL import Image

  from gleam_jax.data import photo_camera, sources
  from gleam_jax.eval import geo_distance
  from test_geo_distance import photo_with_gps

  source = sources.get_source(tiny_cfg, "test")
  index = sources.get_index(tiny_cfg, "test", source)
  rows = np.flatnonzero(index["modality"] == 2)[:5]  # panoramas of five locations
  named, plain, queries = (tmp_path / d for d in ("named", "plain", "queries"))
  for d in (named, plain, queries):
    d.mkdir()
  centres = {}
  for r in rows:
    lat, lon = index["coords"][r]
    satellite = Image.fromarray(source[int(r)]["satellite"])
    satellite.save(named / f"satellite_{lat:.7f}_{lon:.7f}.png")
    satellite.save(plain / f"loc{index['location_id'][r]}.png")
    centres[f"loc{index['location_id'][r]}.png"] = (float(f"{lat:.7f}"), float(f"{lon:.7f}"))
  (plain / "centres.csv").write_text("file,latitude,longitude\n" + "".join(
      f"{name},{lat},{lon}\n" for name, (lat, lon) in centres.items()))
  taken = {}
  for r in rows[:3]:
    path = photo_with_gps(queries / f"q{index['location_id'][r]}.jpg", *index["coords"][r], pixels=source[int(r)]["query"])
    taken[path] = photo_camera.recorded_position(path)
  paths, _ = retrieve.query_files(str(queries))
  results = tmp_path / "top5.jsonl"
  found, scores = retrieve.search_all(phase1_workdir, paths, str(named), k=5, pngs=False, results=str(results))
  lines = [json.loads(line) for line in results.read_text().splitlines()]
  top1 = []
  for line in lines:
    lat, lon = taken[line["query"]]
    for entry in line["top"]:
      centre = [float(v) for v in os.path.splitext(os.path.basename(entry["file"]))[0].split("_")[1:]]
      assert entry["distance_m"] == pytest.approx(float(geo_distance.distance_m(lat, lon, *centre)), rel=1e-9)
    true = [e["distance_m"] for e in line["top"] if e["distance_m"] < 1.0]
    assert len(true) == 1  # the location's own satellite: where the photo was taken, to the DMS seconds' rounding
    top1.append(line["top"][0]["distance_m"])
  assert 0 < max(top1) and scores == geo_distance.summary(top1)
  out = capsys.readouterr().out
  assert f"3 of 3 queries record where they were taken: {geo_distance.format_summary(scores)}" in out
  assert re.search(r"  1\. [0-9.]+  .*satellite_.*\.png  [0-9]+ m\n", out)
  assert re.search(r"  [0-9]\. [0-9.]+  .*satellite_.*\.png  [0-9]+\.[0-9] km\n", out)  # the other city's
  # the centres from a CSV instead of the names: the same distances
  from_csv, csv_scores = retrieve.search_all(phase1_workdir, paths, str(plain), k=5, pngs=False,
                                             gallery_coords=str(plain / "centres.csv"))
  assert csv_scores == pytest.approx(scores, rel=1e-6)
  assert [len(v) for v in from_csv.values()] == [len(v) for v in found.values()]
  # a place of two views: its position is their mean
  place_top, place = retrieve.search_all(phase1_workdir, paths[:2], str(named), k=1, pngs=False, one_place=True)
  (best, _), = next(iter(place_top.values()))
  centre = [float(v) for v in os.path.splitext(os.path.basename(best))[0].split("_")[1:]]
  assert place["Dis@1_m"] == pytest.approx(float(geo_distance.distance_m(*np.mean([taken[p] for p in paths[:2]], axis=0), *centre)),
                                           rel=1e-9)
  # a gallery without centres, or queries without GPS: no distances, and the scores stay None
  _, none = retrieve.search_all(phase1_workdir, paths, str(plain), k=2, pngs=False)
  assert none is None


def test_retrieve_scores_a_pairs_file_as_the_gleam_x_baseline(phase1_workdir, tiny_cfg, tmp_path, capsys):
  """`retrieve --pairs`: each pair's cosine similarity (the model's own, by the tower its modality names
  or the job's one), their ROC AUC against the pairs' match and the best threshold's accuracy, a results
  line per pair; pairs of a modality the job never saw stop with the line named."""
  from PIL import Image

  from gleam_jax.data import sources
  from gleam_jax.eval import explain
  from gleam_jax.eval import metrics

  source = sources.get_source(tiny_cfg, "test")
  index = sources.get_index(tiny_cfg, "test", source)
  rows = np.flatnonzero(index["modality"] == 2)[:4]  # panoramas of four locations
  for i, r in enumerate(rows):
    Image.fromarray(source[int(r)]["query"]).save(tmp_path / f"q{i}.png")
    Image.fromarray(source[int(r)]["satellite"]).save(tmp_path / f"s{i}.png")
  lines = []
  for i in range(4):  # its own satellite, then the next location's; half the lines name their modality
    named = {"modality": "panorama"} if i % 2 else {}
    lines.append({"images": [f"q{i}.png", f"s{i}.png"], "match": True, **named})
    lines.append({"images": [f"q{i}.png", f"s{(i + 1) % 4}.png"], "match": False, **named})
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
  results = tmp_path / "out" / "scores.jsonl"
  scores, summary = retrieve.score_pairs(phase1_workdir, str(pairs), results=str(results))
  model, config = retrieve.load_model(phase1_workdir)
  embed = lambda name, size, tower: np.asarray(model.encode(
      retrieve.prepare(retrieve.read_image(str(tmp_path / name)), size, config.data)[None], tower=tower))[0]
  want = [float(embed(line["images"][0], config.data.panorama_size, "panorama")
                @ embed(line["images"][1], config.data.satellite_size, "reference")) for line in lines]
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
  matches = [line["match"] for line in lines]
  accuracy, threshold = metrics.best_threshold_accuracy(scores, matches)
  assert summary == dict(pairs=8, matches=4, cosine_auc=explain.verdict_auc(scores, matches),
                         best_threshold_accuracy=accuracy, best_threshold=threshold)
  assert f"8 pairs scored by GLEAM-C (panorama 8), 4 matching: cosine AUC {summary['cosine_auc']:.3f}" in (
      capsys.readouterr().out)
  written = [json.loads(line) for line in results.read_text().splitlines()]
  assert [(w["score"], w["match"], w["modality"]) for w in written] == [
      (float(x), m, "panorama") for x, m in zip(scores, matches)]
  assert written[1]["line"].endswith("pairs.jsonl:2") and written[1]["satellite"] == str(tmp_path / "s1.png")
  # without answers or match: scores only
  pairs.write_text(json.dumps({"images": ["q0.png", "s0.png"]}) + "\n")
  again, summary = retrieve.score_pairs(phase1_workdir, str(pairs))
  assert summary is None and again[0] == pytest.approx(scores[0], abs=1e-6)
  # a flight's pair (its frames as the query): the normalised mean of the frames' embeddings (the job's one
  # query tower: it knows no drone views)
  pairs.write_text(json.dumps({"video": ["q0.png", "q1.png"], "images": ["s0.png"], "match": True}) + "\n")
  flight, _ = retrieve.score_pairs(phase1_workdir, str(pairs))
  mean = embed("q0.png", config.data.panorama_size, "panorama") + embed("q1.png", config.data.panorama_size, "panorama")
  assert flight[0] == pytest.approx(float(mean / np.linalg.norm(mean) @ embed(
      "s0.png", config.data.satellite_size, "reference")), abs=1e-5)
  assert not min(abs(flight[0] - x) for x in scores[:4]) < 1e-4  # neither frame's own score
  pairs.write_text(json.dumps({"images": ["q0.png", "s0.png"], "modality": "uav"}) + "\n")
  with pytest.raises(GleamError, match=r"pairs.jsonl:1: a uav pair, but .* trained for the query modalities panorama"):
    retrieve.score_pairs(phase1_workdir, str(pairs))


def test_a_job_written_before_newer_data_fields_still_loads(phase1_workdir, tmp_path):
  """retrieve reads a workdir whose config.json predates data fields added since (their defaults)."""
  with open(os.path.join(phase1_workdir, "config.json")) as f:
    saved = json.load(f)
  for key in ("ground_frame", "uav_frame", "manual_dir"):
    del saved["data"][key]
  del saved["data"]["augment"]["rotate_photo"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config = retrieve.load_config(str(tmp_path))
  assert (config.data.ground_frame, config.data.uav_frame, config.data.manual_dir) == ("photo", "photo", "")
  assert config.data.augment.rotate_photo
  assert tuple(config.data.panorama_size) == tuple(saved["data"]["panorama_size"])


def test_multi_query_evaluation_is_checked_before_training(tiny_cfg):
  contrastive.check_config(tiny_config("c_phase1", tiny_cfg.data_dir, **{"eval.multi_query": ("panorama",)}))
  with pytest.raises(GleamError, match=r"eval.multi_query names \['uav'\]"):
    contrastive.check_config(tiny_config("c_phase1", tiny_cfg.data_dir, **{"eval.multi_query": ("uav",)}))
  with pytest.raises(GleamError, match="under protocol 'vigor'"):
    contrastive.check_config(tiny_config("c_phase1", tiny_cfg.data_dir,
                                         **{"eval.multi_query": ("panorama",), "eval.protocol": "vigor"}))


def test_limited_field_of_view_evaluation_is_checked_before_training(tiny_cfg):
  from gleam_jax.train import contrastive
  ok = tiny_config("c_phase1", tiny_cfg.data_dir, **{"eval.panorama_fov_deg": (90, 180)})
  contrastive.check_config(ok)
  assert contrastive.fov_query_sets(ok) == {"panorama_fov90": 90.0, "panorama_fov180": 180.0}
  for fields in ({"eval.panorama_fov_deg": (400,)},
                 {"eval.panorama_fov_deg": (90,), "data.modalities": ("uav",)}):
    with pytest.raises(GleamError, match="eval.panorama_fov_deg"):
      contrastive.check_config(tiny_config("c_phase1", tiny_cfg.data_dir, **fields))
