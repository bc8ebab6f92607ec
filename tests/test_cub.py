"""CUB-312 end to end: CUB transforms, concept-only label masks, extra-label evaluation."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import default_data_config

from ctran_jax import label_mask, train
from ctran_jax.data import pipeline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import cub as cub_config  # noqa: E402
from test_data_cub import build, fixture_files, write_tgz  # noqa: E402


@pytest.fixture(scope="module")
def cub_data_dir(tmp_path_factory):
  manual = tmp_path_factory.mktemp("cub_manual")
  write_tgz(manual / "CUB_200_2011.tgz", fixture_files())
  data_dir = tmp_path_factory.mktemp("cub_tfds")
  build(manual, data_dir)
  return str(data_dir)


def test_cub_eval_transform_is_a_centre_crop_with_zero_padding():
  data = default_data_config(transform="cub", image_size=8, mean=(0, 0, 0),
                             std=(1 / 255,) * 3)          # normalise = identity
  image = tf.reshape(tf.range(10 * 12 * 3) % 251, (10, 12, 3))
  out = pipeline.cub_eval_image(tf.cast(image, tf.uint8), data).numpy()
  np.testing.assert_allclose(out, image.numpy()[1:9, 2:10], atol=1e-3)
  small = tf.ones((6, 5, 3), tf.uint8) * 7
  out = pipeline.cub_eval_image(small, data).numpy()
  assert out.shape == (8, 8, 3)
  np.testing.assert_allclose(out[1:7, 1:6], 7, atol=1e-4)        # pad 1/1 rows, 1/2 columns
  assert (out[0] == 0).all() and (out[:, 0] == 0).all() and (out[:, 6:] == 0).all()


def test_cub_train_transform_is_seeded_and_normalised():
  data = default_data_config(transform="cub", image_size=16, mean=(0.5,) * 3,
                             std=(2.0,) * 3)
  image = tf.cast(tf.random.stateless_uniform((40, 30, 3), (1, 2), 0, 256, tf.int32), tf.uint8)
  key = tf.constant([3, 4], tf.int64)
  a = pipeline.cub_train_image(image, key, data).numpy()
  b = pipeline.cub_train_image(image, key, data).numpy()
  c = pipeline.cub_train_image(image, tf.constant([3, 5], tf.int64), data).numpy()
  assert a.shape == (16, 16, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # mean 0.5 / std 2 maps [0, 1] to [-0.25, 0.25].
  assert a.min() >= -0.25 - 1e-6 and a.max() <= 0.25 + 1e-6


def test_cub_tiny_trains_and_reports_extra_label_accuracy(cub_data_dir, tmp_path):
  config = cub_config.get_config("tiny")
  config.data.data_dir = cub_data_dir
  config.data.image_size, config.data.scale_size, config.data.crop_sizes = 32, 32, (32,)
  config.model.hidden = 32
  config.batch_size = config.eval.batch_size = 8
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 3, 3, 3
  result = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite([r["loss"] for r in result["train_log"]]).all()
  report = result["reports"]["test"]
  groups = report["known_groups"]
  assert list(groups) == ["0", "1", "2"]
  for values in groups.values():
    assert 0.0 <= values["class_acc"] <= 1.0 and 0.0 <= values["concept_acc"] <= 1.0
  assert "class_acc" in report["known"]["0"]

  # The fraction of concepts given equals the visible concepts of the seeded groups.
  builder = tfds.builder("ctran_cub/tiny", data_dir=cub_data_dir)
  meta = builder.info.metadata
  visible = np.stack([ex["label_visible"] for ex in tfds.as_numpy(builder.as_dataset(
      "test", decoders={"image": tfds.decode.SkipDecoding()}))])
  order = label_mask.group_order(int(meta["num_groups"]), seed=config.eval.seed)
  concepts = int(meta["num_concepts"])
  for n in (0, 1, 2):
    in_groups = np.isin(np.asarray(meta["concept_groups"]), order[:n])
    expected = np.mean(in_groups[None] & visible[:, :concepts])
    assert groups[str(n)]["known_concepts"] == pytest.approx(expected)
  assert groups["0"]["known_concepts"] == 0.0


def test_known_groups_on_a_dataset_without_concepts_is_an_error(demo_data_dir, tmp_path):
  config = cub_config.default.get_config()
  config.data.name, config.data.data_dir = "ctran_demo/tiny", demo_data_dir
  config.model.backbone_width, config.model.hidden, config.model.layers = 8, 32, 1
  config.data.image_size, config.data.scale_size, config.data.crop_sizes = 32, 36, (36, 32)
  config.num_train_steps = 1
  config.eval.known_groups = (0, 10)
  with pytest.raises(ValueError, match="known_groups.*concept groups"):
    train.train_and_evaluate(config, str(tmp_path))
