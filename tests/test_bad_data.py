"""``data.on_bad_example``: a prepared dataset whose records hold image bytes that do not decode.

`BadImagesTest` writes the same records twice, into a clean and a damaged data_dir; in the
damaged one some records' image bytes are garbage.  The record ids (hence ``example_id``
and the shuffle order) are the same in both, so "skip" on the damaged copy must give the
clean copy's epochs with the bad examples taken out, each kept row still augmented as at
its position in the clean epoch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import default_data_config

from ctran_jax.data.pipeline import eval_dataset, num_eval_batches, open_source, train_dataset

NAME = "bad_images_test"
SIZES = {"train": 44, "validation": 10, "test": 10}
BROKEN = {"train": {3, 17, 30, 41}, "validation": {2, 7}, "test": set(range(8))}
GARBAGE = (b"not an image", b"\xff\xd8\xff\xe0" + bytes(20), b"\x89PNG\r\n\x1a\n" + bytes(9))


class BadImagesTest(tfds.core.GeneratorBasedBuilder):
  """Small PNG/JPEG images with 3 labels; ``broken=True`` garbles the records in BROKEN."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, broken: bool = False, **kwargs):
    self._broken = broken
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="png"),  # bytes are stored unchecked
        "labels": tfds.features.Tensor(shape=(3,), dtype=np.uint8)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    for i in range(SIZES[split]):
      rng = np.random.default_rng([len(split), i])
      pixels = rng.integers(0, 256, (16 + i % 5, 18, 3), dtype=np.uint8)
      image = (tf.io.encode_png if i % 2 else tf.io.encode_jpeg)(pixels).numpy()
      if self._broken and i in BROKEN[split]:
        image = GARBAGE[i % len(GARBAGE)]
      yield i, {"image": image, "labels": rng.integers(0, 2, 3).astype(np.uint8)}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """{"clean": data_dir, "bad": data_dir}."""
  dirs = {}
  for kind in ("clean", "bad"):
    dirs[kind] = str(tmp_path_factory.mktemp(kind))
    tfds.builder(NAME, data_dir=dirs[kind], broken=kind == "bad").download_and_prepare()
  return dirs


def config(data_dir, **overrides):
  return default_data_config(name=NAME, data_dir=data_dir, image_size=16, scale_size=20,
                             crop_sizes=(20, 16, 12), **overrides)


def bad_ids(data_dir, split):
  ds = tfds.builder(NAME, data_dir=data_dir).as_dataset(
      split, read_config=tfds.ReadConfig(add_tfds_id=True),
      decoders={"image": tfds.decode.SkipDecoding()})
  return {int(tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2**62)) for ex in ds
          if ex["image"].numpy() in GARBAGE}


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def rows(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_damaged_copy_has_the_same_record_ids(data_dirs):
  assert len(bad_ids(data_dirs["bad"], "train")) == len(BROKEN["train"])
  assert not bad_ids(data_dirs["clean"], "train")


@pytest.mark.parametrize("cache, resize_on_device", [(False, False), (True, False),
                                                     (False, True)])
def test_fail_stops_with_a_one_line_error_naming_split_and_fix(data_dirs, cache,
                                                              resize_on_device):
  source = open_source(config(data_dirs["bad"], cache=cache,
                              resize_on_device=resize_on_device))
  with pytest.raises(ValueError) as e:
    take(train_dataset(source, batch_size=4, seed=0), 11)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"split 'train' of dataset {NAME!r}: an example's image cannot be "
                            "decoded (")
  assert message.endswith("set config.data.on_bad_example=skip to drop such examples, or "
                          "prepare the dataset again")
  with pytest.raises(ValueError, match=r"^split 'validation' of .*on_bad_example=skip"):
    list(eval_dataset(source, "validation", batch_size=4))


def test_unknown_policy_is_refused(data_dirs):
  with pytest.raises(ValueError, match=r"on_bad_example='ignore'; expected one of"):
    open_source(config(data_dirs["bad"], on_bad_example="ignore"))


def expected_epoch(clean_ids, bad, epoch_size):
  """(ids, positions, skipped) of a "skip" epoch: the clean permutation read twice over,
  bad ids left out, cut to epoch_size."""
  kept = [(p, i) for p, i in enumerate(np.concatenate([clean_ids, clean_ids])) if i not in bad]
  kept = kept[:epoch_size]
  positions = np.array([p for p, _ in kept])
  skipped = np.diff(positions, prepend=-1) - 1
  return np.array([i for _, i in kept]), positions, skipped


# batch 8: 5 batches of the 40 good examples; batch 11: 4 batches need 44, so every epoch
# reads into the second pass over its permutation.
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("batch_size", [8, 11])
def test_skip_drops_bad_examples_deterministically_and_counts_them(data_dirs, cache,
                                                                   batch_size):
  n, epochs = SIZES["train"], 3
  steps_per_epoch = n // batch_size
  clean = take(train_dataset(open_source(config(data_dirs["clean"], cache=cache)),
                             batch_size=n, seed=4), epochs)  # batch e: all of epoch e
  bad = bad_ids(data_dirs["bad"], "train")
  batches = train_dataset(open_source(config(data_dirs["bad"], cache=cache,
                                             on_bad_example="skip")), batch_size=batch_size,
                          seed=4)
  total = 0
  for epoch in range(epochs):
    got = rows(take(batches, steps_per_epoch))
    ids, positions, skipped = expected_epoch(clean[epoch]["example_id"], bad,
                                             steps_per_epoch * batch_size)
    np.testing.assert_array_equal(got["example_id"], ids)
    np.testing.assert_array_equal(got["skipped"], skipped)
    assert not set(got["example_id"]) & bad
    first = positions < n  # augmented as at that position of the clean epoch
    for key in ("image", "labels"):
      np.testing.assert_array_equal(got[key][first], clean[epoch][key][positions[first]])
    total += skipped.sum()
  assert batches.skipped == total >= epochs * (len(bad) - 1)
  assert got["skipped"].dtype == np.int32


@pytest.mark.parametrize("cache", [False, True])
def test_skip_resume_equals_skipping_batches_across_epochs(data_dirs, cache):
  source = open_source(config(data_dirs["bad"], cache=cache, on_bad_example="skip"))
  reference = take(train_dataset(source, batch_size=11, seed=7), 10)  # 4 batches an epoch
  for start in (3, 4, 6):
    resumed = train_dataset(source, batch_size=11, seed=7, start_step=start)
    for x, y in zip(reference[start:], take(resumed, 10 - start), strict=True):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
    assert resumed.skipped == sum(b["skipped"].sum() for b in reference[start:])


def test_skip_without_bad_examples_equals_fail(data_dirs):
  fail = take(train_dataset(open_source(config(data_dirs["clean"], cache=False)),
                            batch_size=8, seed=1), 7)
  skip = take(train_dataset(open_source(config(data_dirs["clean"], cache=False,
                                               on_bad_example="skip")),
                            batch_size=8, seed=1, start_step=2), 5)
  for x, y in zip(fail[2:], skip, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
    assert not y["skipped"].any()


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("resize_on_device", [False, True])
def test_eval_skip_keeps_lockstep_and_counts(data_dirs, cache, process_count, resize_on_device):
  source = open_source(config(data_dirs["bad"], cache=cache, on_bad_example="skip",
                              resize_on_device=resize_on_device))
  clean = open_source(config(data_dirs["clean"], cache=cache,
                             resize_on_device=resize_on_device))
  expected = num_eval_batches(source, "validation", batch_size=3, process_count=process_count)
  ids, skipped = [], 0
  for p in range(process_count):
    batches = eval_dataset(source, "validation", batch_size=3, process_index=p,
                           process_count=process_count)
    got = take(batches, expected + 1)
    assert len(got) == expected
    got = rows(got)
    assert not (got["valid"] & got["skipped"]).any()
    ids += got["example_id"][got["valid"]].tolist()
    skipped += batches.skipped
    assert batches.skipped == got["skipped"].sum()
    reference = rows(list(eval_dataset(clean, "validation", batch_size=3, process_index=p,
                                       process_count=process_count)))
    # A bad example's row is padding in its place: the good ones keep theirs.
    keep = reference["valid"] & ~got["skipped"]
    for key in reference:  # image (+ extent, origin with resize_on_device) included
      np.testing.assert_array_equal(got[key][keep], reference[key][keep])
    assert not got["labels"][got["skipped"]].any()
  assert skipped == len(BROKEN["validation"])
  bad = bad_ids(data_dirs["bad"], "validation")
  assert len(ids) == len(set(ids)) == SIZES["validation"] - len(bad) and not set(ids) & bad


@pytest.mark.parametrize("cache", [False, True])
def test_skip_refuses_a_split_that_cannot_fill_an_epoch(data_dirs, cache):
  source = open_source(config(data_dirs["bad"], cache=cache, on_bad_example="skip",
                              train_split="test"))
  # 2 of 10 decode: an epoch of 2 batches of 4 cannot be filled from 2 x 2 good examples.
  with pytest.raises(ValueError, match=r"^split 'test' of .*too few examples decode"):
    take(train_dataset(source, batch_size=4, seed=0), 3)
