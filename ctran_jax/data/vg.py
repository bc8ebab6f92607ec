"""``ctran_vg500``: Visual Genome images labelled with the 500 most frequent object names (VG-500).

Source files, in the manual directory (the original downloads, zipped or extracted; an
extracted file or folder is read in preference to its zip):
  * ``objects.json.zip`` or ``objects.json`` (v1.4, ~0.4 GB unzipped): a list of
    ``{"image_id", "objects": [{"object_id", "names": [...], ...}], "image_url"}``.  Older
    dumps are read too: the id may be ``"id"`` or inside ``"image"``, an object may have one
    ``"name"`` instead of ``"names"``.
  * ``images.zip`` (or its folder ``VG_100K/``) and ``images2.zip`` (or ``VG_100K_2/``): the
    108k JPEGs, named ``<image_id>.jpg``.  An id found in both is read from ``VG_100K``.

Labels.  Each object name is normalised: lower-cased, runs of whitespace collapsed to one
space, then ASCII punctuation and spaces stripped from both ends ("Tree ," -> "tree",
"t-shirt" stays); names that end up empty are ignored.  No plural or synonym merging
("tree" and "trees" stay distinct): suffix rules break frequent names such as "glass",
"grass", "bus" and "dress", and the reference's list is not available to match anyway.
A name's frequency is the number of images with at least one object of that name; the
labels are the ``num_labels`` most frequent names (ties broken alphabetically), in that
order: label 0 is the most frequent name.  Frequencies are counted over all images of
``objects.json`` (both splits), as a fixed vocabulary would be.  An image is positive for a
label iff one of its objects has that name.  Images with none of the labels are dropped;
their number is ``info.metadata["num_dropped_no_labels"]`` (with ``label_counts``: images
per label, ``num_images``: entries in objects.json, ``num_names``: distinct names).

Split: an image is in ``test`` iff the first 8 bytes of SHA-256 of its decimal id, read as a
big-endian integer, modulo 10000 are below ``round(10000 * test_fraction)``, else in
``train``; ``test_fraction`` = 0.0925 (10,000 of the 108,077 images of v1.4, the size of the
usual VG-500 test set).  So an image's split never depends on the other images or on L.

Memory: an ``object_hook`` keeps only each image's set of normalised names while parsing,
instead of the full object dicts; the text itself is still read in one piece.  Measured on
a synthetic 136 MB objects.json (27k images x 35 objects with v1.4's fields): plain
``json.load`` grows the process by 0.96 GB, this parse by 0.35 GB; so expect ~1 GB rather
than ~3 GB for the real ~0.4 GB file.

Prepare (not timed on the full data; reading the ~15 GB of JPEGs dominates):

    python -m ctran_jax.data.prepare ctran_vg500 --manual_dir M --data_dir D

(or ``tfds.builder("ctran_vg500", data_dir=D).download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir=M))``).  Images are stored as their original
JPEG bytes, never re-encoded; identical inputs give identical datasets.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import string

import numpy as np
import tensorflow_datasets as tfds

from ctran_jax.data import common
from ctran_jax.data import files as files_lib

_OBJECTS = ("objects.json", "objects.json.zip")  # read in this order of preference
_OBJECTS_URL = ("https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/"
                "objects.json.zip")
# (folder, archive, url): the two halves of the images, in lookup order.
_IMAGE_SOURCES = (
    ("VG_100K", "images.zip", "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip"),
    ("VG_100K_2", "images2.zip",
     "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip"),
)
_SPLIT_BUCKETS = 10_000
_EDGES = string.punctuation + string.whitespace
_IMAGE_NAME = re.compile(r"(\d+)\.jpg")


def _required_files() -> list[tuple[tuple[str, ...], str | None, str]]:
  """(files, folder, line): the file is there when one of ``files`` or ``folder`` exists."""
  return [(_OBJECTS, None, f"objects.json.zip (or objects.json): {_OBJECTS_URL}")] + [
      ((archive,), folder, f"{archive} (or folder {folder}/): {url}")
      for folder, archive, url in _IMAGE_SOURCES]


def normalize_name(name: str) -> str:
  """The label form of an object name (see the module docstring); "" means ignore it."""
  return " ".join(name.lower().split()).strip(_EDGES)


def split_of(image_id: int, test_fraction: float) -> str:
  """"test" or "train" by the documented hash of the image id."""
  digest = hashlib.sha256(str(int(image_id)).encode()).digest()
  bucket = int.from_bytes(digest[:8], "big") % _SPLIT_BUCKETS
  return "test" if bucket < round(test_fraction * _SPLIT_BUCKETS) else "train"


def rank_names(image_names: dict[int, frozenset[str]]) -> list[tuple[str, int]]:
  """(name, number of images with it), most frequent first, ties alphabetical."""
  counts = collections.Counter(n for names in image_names.values() for n in names)
  return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


# ----------------------------------------------------------------------------- objects.json


@dataclasses.dataclass(frozen=True)
class _Entry:
  image_id: int
  names: frozenset[str]


def _compact(path: str):
  """``json`` object_hook: objects -> their normalised names, images -> ``_Entry``."""
  def hook(obj: dict):
    if "names" in obj or "name" in obj:  # one object annotation
      names = obj.get("names", obj.get("name"))
      names = [names] if isinstance(names, str) else names or []
      return frozenset(filter(None, (normalize_name(n) for n in names if isinstance(n, str))))
    if isinstance(obj.get("objects"), list):  # one image
      image = obj.get("image") if isinstance(obj.get("image"), dict) else {}
      image_id = next((d[k] for d in (obj, image) for k in ("image_id", "id") if k in d), None)
      if not isinstance(image_id, int):
        raise ValueError(f"{path}: an image entry has no integer 'image_id' (or 'id'); its "
                         f"keys are {sorted(obj)}. Is this Visual Genome's objects.json?")
      names = frozenset().union(*(o for o in obj["objects"] if isinstance(o, frozenset)))
      return _Entry(image_id, names)
    return obj
  return hook


def read_objects(manual_dir: str) -> tuple[str, dict[int, frozenset[str]]]:
  """(file read, {image_id: normalised object names}) from objects.json (else its zip)."""
  plain, archive = (os.path.join(manual_dir, f) for f in _OBJECTS)
  if os.path.isfile(plain):
    path, files, member = plain, files_lib.Files(manual_dir), _OBJECTS[0]
  else:
    path, files = archive, files_lib.Files(archive, url=_OBJECTS_URL)
    member = next((m for m in files.names() if posixpath.basename(m) == "objects.json"), None)
    if member is None:
      files.close()
      raise ValueError(f"{archive} holds no objects.json; download it again: {_OBJECTS_URL}")
  with files, files.open(member) as f:
    try:
      entries = json.load(f, object_hook=_compact(path))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); "
                       "the file is probably truncated: download it again") from None
  if not isinstance(entries, list) or not all(isinstance(e, _Entry) for e in entries):
    raise ValueError(f"{path}: expected a list of images with 'objects' (Visual Genome's "
                     "objects.json)")
  image_names: dict[int, frozenset[str]] = {}
  for entry in entries:  # an id listed twice gets the union of its names
    image_names[entry.image_id] = image_names.get(entry.image_id, frozenset()) | entry.names
  return os.path.basename(path), image_names


# ----------------------------------------------------------------------------- images


class _Images:
  """``<id>.jpg`` files of VG_100K / VG_100K_2, from the folders or the zips."""

  def __init__(self, manual_dir: str):
    self._files: list[files_lib.Files] = []
    self.index: dict[int, tuple[str, files_lib.Files, str]] = {}  # id -> (folder, files, name)
    for folder, archive, url in reversed(_IMAGE_SOURCES):  # earlier sources overwrite later
      directory = os.path.join(manual_dir, folder)
      files = files_lib.Files(directory if os.path.isdir(directory)
                              else os.path.join(manual_dir, archive), url=url)
      self._files.append(files)
      for name in files.names():
        # A folder holds its images at the top; a zip under a folder (VG_100K/...).
        match = _IMAGE_NAME.fullmatch(name if files.is_folder else posixpath.basename(name))
        if match:
          self.index[int(match.group(1))] = (folder, files, name)

  def filename(self, image_id: int) -> str:
    return f"{self.index[image_id][0]}/{image_id}.jpg"

  def read(self, image_id: int) -> bytes:
    _, files, name = self.index[image_id]
    return files.read(name)

  def close(self):
    for files in self._files:
      files.close()


# ----------------------------------------------------------------------------- builder


@dataclasses.dataclass
class CtranVg500Config(tfds.core.BuilderConfig):
  """Number of labels (the most frequent names) and the test fraction of the split rule."""

  num_labels: int = 500
  test_fraction: float = 0.0925


class CtranVg500(tfds.core.GeneratorBasedBuilder):
  """Visual Genome multi-label classification over the most frequent object names."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
      CtranVg500Config(name="default", description="VG-500: the 500 most frequent names."),
      CtranVg500Config(name="test", description="Test-sized: 4 labels, 30 % test.",
                       num_labels=4, test_fraction=0.3),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html and put "
      "in the manual directory (zips as downloaded, or their extracted contents):\n"
      f"  objects.json.zip (or objects.json): {_OBJECTS_URL}\n"
      + "".join(f"  {archive} (or folder {folder}/ with the <image_id>.jpg files): {url}\n"
                for folder, archive, url in _IMAGE_SOURCES))

  @classmethod
  def missing_manual_files(cls, manual_dir: str) -> list[str]:
    """One line per required file that ``manual_dir`` lacks ([] when complete)."""
    return [line for files, folder, line in _required_files()
            if not (any(os.path.isfile(os.path.join(manual_dir, f)) for f in files)
                    or (folder and os.path.isdir(os.path.join(manual_dir, folder))))]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=common.features(self.builder_config.num_labels, **{
            "image/filename": tfds.features.Text(),
            "image/id": tfds.features.Scalar(dtype=np.int64),
        }),
        # Filled in by _split_generators: the label names depend on objects.json.
        metadata=tfds.core.MetadataDict(),
        homepage="https://homes.cs.washington.edu/~ranjay/visualgenome/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = common.manual_dir(self, dl_manager)
    c = self.builder_config
    source, image_names = read_objects(manual_dir)
    ranked = rank_names(image_names)
    if len(ranked) < c.num_labels:
      raise ValueError(f"{source} has {len(ranked)} distinct object names, fewer than the "
                       f"{c.num_labels} labels of config {c.name!r}")
    label_names = [name for name, _ in ranked[:c.num_labels]]
    index = {name: i for i, name in enumerate(label_names)}
    splits = {"train": [], "test": []}
    for image_id in sorted(image_names):
      hot = [index[n] for n in image_names[image_id] if n in index]
      if hot:
        splits[split_of(image_id, c.test_fraction)].append((image_id, sorted(hot)))
    with contextlib.closing(_Images(manual_dir)) as images:  # fail before writing anything
      absent = [i for examples in splits.values() for i, _ in examples if i not in images.index]
    if absent:
      raise FileNotFoundError(
          f"{len(absent)} image(s) of {source} are in neither VG_100K nor VG_100K_2 "
          f"(folders, or images.zip / images2.zip) in {manual_dir}: "
          + ", ".join(f"{i}.jpg" for i in sorted(absent)[:10])
          + (" ..." if len(absent) > 10 else "") + "; the image download is incomplete")
    kept = sum(len(v) for v in splits.values())
    self.info.metadata.update(
        label_names=label_names, label_counts=[count for _, count in ranked[:c.num_labels]],
        num_images=len(image_names), num_names=len(ranked),
        num_dropped_no_labels=len(image_names) - kept, objects_file=source,
        test_fraction=c.test_fraction)
    return {split: self._generate_examples(manual_dir, examples)
            for split, examples in splits.items()}

  def _generate_examples(self, manual_dir: str, examples):
    with contextlib.closing(_Images(manual_dir)) as images:
      num_labels = self.builder_config.num_labels
      for image_id, hot in examples:
        yield image_id, {"image": images.read(image_id),
                         "image/filename": images.filename(image_id),
                         "image/id": image_id, "labels": common.multi_hot(hot, num_labels)}
