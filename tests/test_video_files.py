"""Video files: sampled as transformers' Qwen2.5-VL video processor samples them, decoded as its PyAV
reader decodes them, extracted once for pairs files."""
import json
import os
import sys

import av
import numpy as np
import pytest
from PIL import Image
from transformers import video_utils

from gleam_jax.data import pair_files, video_files
from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import processor
from video_fixtures import frame_index, write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return write_video(tmp_path_factory.mktemp("video") / "flight.mp4", 95)


def test_a_clip_is_sampled_and_decoded_as_transformers_reads_it(clip):
  """95 frames at 30 fps, sampled at 2 fps: 6 frames (3.17 s floored to whole temporal patches) at
  0, 15.8, 31.7, ... truncated; they stand for 6 / 95 x 30 = 1.89 frames a second; the pixels are
  those of transformers' `read_video_pyav` at the same indices."""
  assert video_files.probe(clip) == (95, 30.0)
  frames, rate, indices = video_files.read_clip(clip, fps=2.0)
  np.testing.assert_array_equal(indices, [0, 15, 31, 47, 63, 79])
  assert [frame_index(f) for f in frames] == [0, 15, 31, 47, 63, 79]
  assert rate == pytest.approx(6 / 95 * 30)
  theirs, metadata = video_utils.read_video_pyav(clip, sample_indices_fn=lambda metadata, **_: indices)
  assert (metadata.total_num_frames, metadata.fps) == (95, 30.0)
  np.testing.assert_array_equal(np.stack(frames), theirs)
  assert rate == pytest.approx(metadata.sampled_fps)
  short, rate, indices = video_files.read_clip(clip, fps=0.1)  # 0.3 frames: the 4-frame floor
  np.testing.assert_array_equal(indices, [0, 23, 47, 71])
  assert rate == pytest.approx(4 / 95 * 30) and len(short) == 4


def test_a_container_without_a_frame_count_is_counted(tmp_path):
  """Matroska does not record the frame count: the stream's packets are counted instead."""
  path = write_video(tmp_path / "flight.mkv", 9, rate=10, container="matroska")
  with av.open(path) as container:
    assert container.streams.video[0].frames == 0
  assert video_files.probe(path) == (9, 10.0)
  frames, rate, indices = video_files.read_clip(path, fps=2.0)  # 0.9 s: the 4-frame floor
  np.testing.assert_array_equal(indices, [0, 2, 4, 6])
  assert [frame_index(f) for f in frames] == [0, 2, 4, 6] and rate == pytest.approx(4 / 9 * 10)


def test_frames_are_extracted_once_per_file_and_rate(clip, tmp_path, monkeypatch, capsys):
  """The PNG frames hold the decoded pixels; the same file at the same rate is not decoded again; another
  rate, or a changed file, is extracted anew."""
  data_dir = str(tmp_path / "data")
  paths, rate = video_files.extract_frames(clip, 2.0, data_dir=data_dir)
  frames, expected_rate, _ = video_files.read_clip(clip, 2.0)
  assert rate == expected_rate
  np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in paths]), np.stack(frames))
  assert [os.path.basename(p) for p in paths] == [f"frame_{i:06d}.png" for i in (0, 15, 31, 47, 63, 79)]
  with open(os.path.join(os.path.dirname(paths[0]), video_files.CLIP_FILE), encoding="utf-8") as f:
    assert json.load(f)["indices"] == [0, 15, 31, 47, 63, 79]
  assert capsys.readouterr().err == f"extracted 6 frames of {clip} (sampled at 2 fps) to {os.path.dirname(paths[0])}\n"
  with monkeypatch.context() as patch:
    patch.setattr(video_files, "read_frames", lambda *a, **k: pytest.fail("decoded again"))
    assert video_files.extract_frames(clip, 2.0, data_dir=data_dir) == (paths, rate)
  other, _ = video_files.extract_frames(clip, 1.0, data_dir=data_dir)
  assert os.path.dirname(other[0]) != os.path.dirname(paths[0]) and len(other) == 4
  changed = write_video(tmp_path / "flight.mp4", 40)
  again, _ = video_files.extract_frames(changed, 2.0, data_dir=data_dir)
  assert len(again) == 4 and [os.path.basename(p) for p in again] == [f"frame_{i:06d}.png" for i in (0, 10, 20, 30)]
  assert sorted(os.listdir(video_files.frames_root(data_dir))) == sorted(
      os.path.basename(os.path.dirname(p)) for p in (paths, other, again) for p in p[:1])  # no staging left


def test_bad_video_files_stop_with_the_fix(tmp_path, monkeypatch):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"not a video at all")
  with pytest.raises(GleamError, match="broken.mp4 is not a video PyAV can read"):
    video_files.read_clip(str(bad))
  with pytest.raises(GleamError, match="video .*missing.mp4 not found"):
    video_files.extract_frames(str(tmp_path / "missing.mp4"), data_dir=str(tmp_path))
  one = write_video(tmp_path / "one.mp4", 1)
  with pytest.raises(GleamError, match="one.mp4.*too short to sample"):
    video_files.read_clip(one)
  monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
  with pytest.raises(GleamError, match=r"needs PyAV: pip install 'gleam_jax\[video\]'"):
    video_files.read_clip(one)
  assert not os.path.exists(video_files.frames_root(str(tmp_path)))  # nothing written


def test_a_pairs_file_reads_a_video_file_as_its_sampled_frames(clip, tmp_path, monkeypatch):
  """Ours (`video`) and LLaMA-Factory's (`videos`) layouts: the query is the clip's extracted frames at
  the rate they stand for, and `visuals_of` reads the decoded pixels."""
  monkeypatch.setenv("GLEAM_DATA_DIR", str(tmp_path / "data"))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "sat.png")
  os.symlink(clip, tmp_path / "flight.mp4")
  lines = [dict(video="flight.mp4", images=["sat.png"], fps=1.0, answer="Yes. The same crossroads."),
           dict(videos=["flight.mp4"], images=["sat.png"], messages=[
               dict(role="user", content="<video><image>Same place?"), dict(role="assistant", content="No.")])]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  ours, theirs = pair_files.read_pairs(str(path))
  assert ours["fps"] == pytest.approx(4 / 95 * 30) and theirs["fps"] == pytest.approx(6 / 95 * 30)
  assert pair_files.is_video_pair(ours) and len(ours["query"]) == 4 and len(theirs["query"]) == 6
  assert ours["modality"] == theirs["modality"] == "flight" and theirs["question"] == "Same place?"
  _, videos = pair_files.visuals_of(theirs)
  np.testing.assert_array_equal(np.stack(videos[0]), np.stack(video_files.read_clip(clip, 2.0)[0]))
  images, video_args = pair_files.prompt_visuals(theirs)
  assert video_args["fps"] == theirs["fps"] and len(images) == 1
  assert "2 with a video query (2 from video files), 4-6 frames, fps: 1.263 1, 1.895 1" in pair_files.summary(
      [ours, theirs])
  path.write_text(json.dumps(dict(video="notes.txt", images=["sat.png"], answer="No.")) + "\n")
  with pytest.raises(GleamError, match="notes.txt is neither a folder of frames nor a video file"):
    pair_files.read_pairs(str(path))


def test_a_sampled_video_is_timed_by_the_rate_its_frames_stand_for():
  """transformers times a sampled video's temporal patches by `VideoMetadata.sampled_fps`: 10 frames at
  30 fps sampled at 2 fps keep 4 (the floor), which stand for 12 frames a second: 2 / 12 s a patch."""
  metadata = video_utils.VideoMetadata(total_num_frames=10, fps=30.0, frames_indices=[0, 2, 5, 7])
  assert processor.sampled_fps(4, 10, 30.0) == pytest.approx(metadata.sampled_fps) == pytest.approx(12.0)
  cfg = processor.ImageConfig(video_min_pixels=28 * 28)
  frames = [np.full((56, 56, 3), 10 * i, np.uint8) for i in range(10)]
  values, grid, seconds = processor.preprocess_video(frames, cfg, fps=2.0, source_fps=30.0)
  assert seconds == pytest.approx(2 / 12) and grid[0] == 2
  direct, _, _ = processor.preprocess_video([frames[i] for i in (0, 2, 5, 7)], cfg, fps=12.0)
  np.testing.assert_array_equal(values, direct)
  _, _, each = processor.preprocess_videos([frames[:4], frames[4:8]], cfg, fps=[2.0, 4.0])
  np.testing.assert_allclose(each, [1.0, 0.5])
  with pytest.raises(GleamError, match="2 frame rates were given for 1 videos"):
    processor.preprocess_videos([frames[:4]], cfg, fps=[2.0, 4.0])


def test_a_video_query_is_its_sampled_frames(clip, tmp_path, monkeypatch):
  """`retrieve --query=flight.mp4` / `localize --query=flight.mp4`: the queries are the clip's frames
  sampled at --fps, extracted under the data dir."""
  from gleam_jax import retrieve  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GLEAM_DATA_DIR", str(tmp_path))
  paths, rate = retrieve.query_files(clip, fps=1.0)
  assert (paths, rate) == video_files.extract_frames(clip, 1.0) and rate == pytest.approx(4 / 95 * 30)
  assert [frame_index(np.asarray(Image.open(p))) for p in paths] == [0, 23, 47, 71]
  assert os.path.commonpath(paths).startswith(video_files.frames_root(str(tmp_path)))


def test_a_jobs_pairs_file_extracts_video_files_under_its_data_dir(clip, tmp_path):
  """A GLEAM-X job reading a pairs file of video files extracts their frames under `data.data_dir`."""
  from config_files import tiny_config  # pylint: disable=g-import-not-at-top
  from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "sat.png")
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(dict(video=clip, images=["sat.png"], answer="Yes. The same place.")) + "\n")
  data_dir = str(tmp_path / "job_data")
  config = tiny_config("x_sft", data_dir, **{"examples.train_file": str(path), "examples.eval_file": str(path)})
  (pair,) = sft.load_examples(config, "train")
  assert pair["video_file"] == clip and len(pair["query"]) == 6
  assert os.path.commonpath(pair["query"]).startswith(video_files.frames_root(data_dir))
