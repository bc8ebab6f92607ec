"""``ctran_cub``: CUB-200-2011 as C-Tran's "CUB-312" (112 concepts + 200 classes).

C-Tran's CUB experiment uses the Concept Bottleneck Models (Koh et al. 2020) preprocessing:
112 of CUB's 312 binary bird attributes, with *class-level* labels, followed by a one-hot of
the 200 species, i.e. 312 label tokens.  Here that preprocessing is rebuilt from the
original archive so the dataset is a pure function of the files.

Source (manual download, see ``MANUAL_DOWNLOAD_INSTRUCTIONS``): ``CUB_200_2011.tgz`` from
https://data.caltech.edu/records/65de6-vvk48, read as a stream (never extracted), or its
extracted folder (used instead of the archive when both are there).  Files used
(``attributes.txt`` sits at the archive's top level; a folder may also hold it in
``CUB_200_2011/attributes/``):

* ``images.txt`` (id, path under ``images/``), ``image_class_labels.txt``,
  ``classes.txt``, ``train_test_split.txt`` (1 = official training image);
* ``attributes.txt`` (312 ``group::value`` names), ``attributes/certainties.txt``
  (1 = not visible, 2 guessing, 3 probably, 4 definitely) and
  ``attributes/image_attribute_labels.txt`` (image, attribute, is_present, certainty,
  time; only the first four fields are read, as a few lines carry extra ones).

Labels (``select_concepts``), following CBM's rule:

1. Per class, vote each attribute over the class's *official training* images (before
   the validation carve-out below, so validation images vote too): present votes are
   images with ``is_present=1``; absent votes are images with ``is_present=0`` *unless*
   the attribute is "not visible" there (certainty 1), as CBM does.  The class-level
   value is 1 when present votes >= absent votes (ties, including no votes at all, give 1,
   as in CBM).
2. Keep the attributes that are 1 for at least ``min_classes`` classes (10 in CBM, which
   reports 112 attributes; ``CBM_CONCEPT_ATTRIBUTES`` lists CBM's published indices).
3. ``labels`` = [the image's class's voted values of the kept attributes, one-hot class].

CBM voted over *its* training part, left after a random 20 % validation split, so its set
and votes can differ slightly from the ones computed here.  NOT VERIFIED: this code could
not be run on the real data when it was written (no copy was available), so that the
``default`` config gives 112 attributes on CUB is CBM's number, not a measured one.  The
build logs how many attributes it kept, which, and how they differ from
``CBM_CONCEPT_ATTRIBUTES``, and stops with a ValueError if the count differs from the
config's ``num_concepts`` (the ``labels`` shape is fixed before the data is read).  The
``cbm`` config takes CBM's published 112 indices instead (values voted as above); ``tiny``
(4 classes, ``min_classes=1``, 4 concepts) fits the test fixture.

Per image, ``label_visible`` is False at a concept whose attribute has certainty 1 (not
visible) in that image, and True at the class positions; C-Tran removes such concepts from
the known labels at test time.  ``attribute_labels`` / ``attribute_certainty`` keep the raw
per-image annotations of all 312 attributes.

Splits: ``test`` = the official test images (5,794 in CUB-200-2011); ``validation`` =
the official training images whose ``crc32(f"ctran_cub:{image_id}") % 5 == 0`` (about
20 %, a fixed function of the image id); ``train`` = the other official training images
(train + validation = the 5,994 official training images).  The build logs each split's
size.

``info.metadata``: ``label_names`` (concept attribute names, then class names),
``num_concepts``, ``num_classes``, ``concept_attributes`` (0-based indices into the 312),
``concept_groups`` (per concept, an index into ``group_names``), ``group_names`` (the
``has_...`` part before ``::`` of the concepts' attributes, in attribute order),
``num_groups``, ``attribute_names`` (all 312), ``min_classes``.

Prepare (the ``tfds`` CLI needs apache-beam, so use Python)::

  python -c "import tensorflow_datasets as tfds, ctran_jax.data.cub; \\
    tfds.builder('ctran_cub', data_dir='D').download_and_prepare(download_config=\\
    tfds.download.DownloadConfig(manual_dir='M'))"

(or ``python -m ctran_jax.data.prepare ctran_cub --manual_dir M --data_dir D``) with
``CUB_200_2011.tgz`` (or the extracted ``CUB_200_2011/``) in ``M``.  A tgz is streamed
four times (once for the annotations and the member list, then once per split).
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ctran_jax.data import common
from ctran_jax.data import files as files_lib

URL = "https://data.caltech.edu/records/65de6-vvk48"
ARCHIVE = "CUB_200_2011.tgz"
ROOT = "CUB_200_2011"
NUM_ATTRIBUTES = 312
NOT_VISIBLE = 1  # certainty id of "not visible"
ATTRIBUTES_TXT = ("attributes.txt", f"{ROOT}/attributes/attributes.txt")
# Paths inside the archive (and under the manual dir for the extracted folder).
IMAGES_TXT = f"{ROOT}/images.txt"
IMAGE_CLASSES_TXT = f"{ROOT}/image_class_labels.txt"
CLASSES_TXT = f"{ROOT}/classes.txt"
SPLIT_TXT = f"{ROOT}/train_test_split.txt"
IMAGE_ATTRIBUTES_TXT = f"{ROOT}/attributes/image_attribute_labels.txt"
CERTAINTIES_TXT = f"{ROOT}/attributes/certainties.txt"
_TABLES = (IMAGES_TXT, IMAGE_CLASSES_TXT, CLASSES_TXT, SPLIT_TXT, IMAGE_ATTRIBUTES_TXT,
           CERTAINTIES_TXT)
IMAGES_DIR = f"{ROOT}/images/"

# CBM's 112 attributes (0-based indices into the 312), as listed in the docstring of its
# CUB/generate_data.py; C-Tran's class_attr_data_10 pickles hold these.
CBM_CONCEPT_ATTRIBUTES = (
    1, 4, 6, 7, 10, 14, 15, 20, 21, 23, 25, 29, 30, 35, 36, 38, 40, 44, 45, 50, 51, 53, 54,
    56, 57, 59, 63, 64, 69, 70, 72, 75, 80, 84, 90, 91, 93, 99, 101, 106, 110, 111, 116,
    117, 119, 125, 126, 131, 132, 134, 145, 149, 151, 152, 153, 157, 158, 163, 164, 168,
    172, 178, 179, 181, 183, 187, 188, 193, 194, 196, 198, 202, 203, 208, 209, 211, 212,
    213, 218, 220, 221, 225, 235, 236, 238, 239, 240, 242, 243, 244, 249, 253, 254, 259,
    260, 262, 268, 274, 277, 283, 289, 292, 293, 294, 298, 299, 304, 305, 308, 309, 310,
    311)


# ------------------------------------------------------------------------ concept selection


def select_concepts(image_attributes, image_classes, num_classes: int = 200,
                    min_classes: int = 10, image_certainties=None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """CBM's class-level concepts: (kept attribute indices (K,), class table (C, K) uint8).

  ``image_attributes`` (N, A) holds 0/1 ``is_present`` of the images that vote (the
  official training images), ``image_classes`` (N,) their 0-based classes.  A class's
  value of an attribute is 1 when its present votes >= its absent votes (a tie, or a
  class without votes, gives 1, as in CBM); with ``image_certainties`` (N, A), an absent
  label whose certainty is 1 (not visible) casts no vote (CBM's rule).  Attributes that
  are 1 for >= ``min_classes`` classes are kept, in index order.

  On the real CUB training images with ``min_classes=10`` CBM reports 112 attributes; this
  function was not run on the real data here (see the module docstring).
  """
  attributes = np.asarray(image_attributes)
  classes = np.asarray(image_classes)
  if attributes.ndim != 2 or classes.shape != attributes.shape[:1]:
    raise ValueError(f"need image_attributes (N, A) and image_classes (N,), got shapes "
                     f"{attributes.shape} and {classes.shape}")
  if not np.isin(attributes, (0, 1)).all():
    raise ValueError("image_attributes must hold only 0 and 1")
  if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
    raise ValueError(f"image_classes must lie in [0, {num_classes}), got "
                     f"[{classes.min()}, {classes.max()}]")
  absent = attributes == 0
  if image_certainties is not None:
    certainties = np.asarray(image_certainties)
    if certainties.shape != attributes.shape:
      raise ValueError(f"image_certainties has shape {certainties.shape}, image_attributes "
                       f"{attributes.shape}")
    absent &= certainties != NOT_VISIBLE
  # Vote counts by matrix products (float64 is exact for counts below 2**53 and, unlike
  # integer products, uses BLAS).
  members = (classes[:, None] == np.arange(num_classes)).T.astype(np.float64)  # (C, N)
  present_votes = members @ (attributes == 1).astype(np.float64)
  absent_votes = members @ absent.astype(np.float64)
  table = (present_votes >= absent_votes).astype(np.uint8)
  indices = np.flatnonzero(table.sum(axis=0) >= min_classes)
  return indices, table[:, indices]


def is_validation(image_id: int) -> bool:
  """The validation rule for official training images: ~20 %, a fixed hash of the id."""
  return zlib.crc32(f"ctran_cub:{image_id}".encode()) % 5 == 0


def group_of(attribute_name: str) -> str:
  """``has_bill_shape::dagger`` -> ``has_bill_shape``."""
  return attribute_name.split("::", 1)[0]


# ------------------------------------------------------------------------- text files


def _rows(source: str, data: bytes, min_fields: int, usage: str, max_split: int = -1
          ) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of the non-blank lines; too few fields is a ValueError."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{source} is not UTF-8 text ({e}); re-extract it from {ARCHIVE}") from e
  for number, line in enumerate(text.splitlines(), 1):
    fields = line.split(None, max_split)
    if not fields:
      continue
    if len(fields) < min_fields:
      raise _bad_line(source, number, line, usage)
    yield number, fields


def _bad_line(source: str, number: int, line, usage: str) -> ValueError:
  return ValueError(f"{source}, line {number}: expected '{usage}', got {line!r}; the file "
                    f"is damaged or not from {ARCHIVE} (get a fresh copy from {URL})")


def _ints(source: str, number: int, fields: list[str], usage: str) -> list[int]:
  try:
    return [int(f) for f in fields]
  except ValueError:
    raise _bad_line(source, number, " ".join(fields), usage) from None


def _id_table(source: str, data: bytes, usage: str, value) -> dict[int, object]:
  """``<id> <value>`` lines -> {id: value(text)}; duplicate ids are a ValueError."""
  table = {}
  for number, fields in _rows(source, data, 2, usage, max_split=1):
    (key,) = _ints(source, number, fields[:1], usage)
    if key in table:
      raise ValueError(f"{source}, line {number}: id {key} appears twice")
    try:
      table[key] = value(fields[1].strip())
    except ValueError:
      raise _bad_line(source, number, " ".join(fields), usage) from None
  return table


def _check_ids(source: str, ids, count: int, what: str) -> None:
  if sorted(ids) != list(range(1, count + 1)):
    raise ValueError(f"{source}: expected {what} ids 1..{count}, found {len(ids)} ids "
                     f"(min {min(ids, default=None)}, max {max(ids, default=None)})")


@dataclasses.dataclass(frozen=True)
class Annotations:
  """The parsed CUB text files, one row per image of images.txt, sorted by image id."""

  image_ids: np.ndarray  # (N,) int64
  paths: tuple[str, ...]  # relative to CUB_200_2011/images/
  classes: np.ndarray  # (N,) int64, 0-based
  is_train: np.ndarray  # (N,) bool, official split
  attributes: np.ndarray  # (N, 312) uint8 is_present
  certainties: np.ndarray  # (N, 312) uint8, 1..4
  attribute_names: tuple[str, ...]
  class_names: tuple[str, ...]


def parse_annotations(files: dict[str, bytes], num_classes: int, describe=None) -> Annotations:
  """Parses the six tables plus attributes.txt (keys: paths in the archive).

  ``describe(name)`` says where a file is, for error messages.
  """
  src = describe or str

  attribute_txt = next(name for name in ATTRIBUTES_TXT if name in files)
  attribute_names = _id_table(src(attribute_txt), files[attribute_txt],
                              "<attribute_id> <group>::<value>", str)
  _check_ids(src(attribute_txt), attribute_names, NUM_ATTRIBUTES, "attribute")
  class_names = _id_table(src(CLASSES_TXT), files[CLASSES_TXT], "<class_id> <name>", str)
  _check_ids(src(CLASSES_TXT), class_names, num_classes, "class (the config's num_classes)")
  certainty_names = _id_table(src(CERTAINTIES_TXT), files[CERTAINTIES_TXT],
                              "<certainty_id> <name>", str)
  _check_ids(src(CERTAINTIES_TXT), certainty_names, 4, "certainty")
  if certainty_names[NOT_VISIBLE].lower() != "not visible":
    raise ValueError(f"{src(CERTAINTIES_TXT)}: certainty {NOT_VISIBLE} must be 'not visible', "
                     f"got {certainty_names.get(NOT_VISIBLE)!r}")
  paths = _id_table(src(IMAGES_TXT), files[IMAGES_TXT], "<image_id> <path>", str)
  image_classes = _id_table(src(IMAGE_CLASSES_TXT), files[IMAGE_CLASSES_TXT],
                            "<image_id> <class_id>", int)
  is_train = _id_table(src(SPLIT_TXT), files[SPLIT_TXT], "<image_id> <0 or 1>", int)
  ids = sorted(paths)
  for name, table in ((IMAGE_CLASSES_TXT, image_classes), (SPLIT_TXT, is_train)):
    if set(table) != set(ids):
      odd = sorted(set(table) ^ set(ids))
      raise ValueError(f"{src(name)} and {IMAGES_TXT} list different image ids, e.g. {odd[:5]}")
  for i in ids:
    if not 1 <= image_classes[i] <= num_classes:
      raise ValueError(f"{src(IMAGE_CLASSES_TXT)}: image {i} has class {image_classes[i]}, "
                       f"outside 1..{num_classes}")
    if is_train[i] not in (0, 1):
      raise ValueError(f"{src(SPLIT_TXT)}: image {i} has is_training_image={is_train[i]}")

  attributes, certainties = _attribute_table(
      src(IMAGE_ATTRIBUTES_TXT), files[IMAGE_ATTRIBUTES_TXT], np.asarray(ids, np.int64),
      sorted(certainty_names))
  return Annotations(
      image_ids=np.asarray(ids, np.int64), paths=tuple(paths[i] for i in ids),
      classes=np.asarray([image_classes[i] - 1 for i in ids], np.int64),
      is_train=np.asarray([is_train[i] == 1 for i in ids]),
      attributes=attributes, certainties=certainties,
      attribute_names=tuple(attribute_names[i] for i in range(1, NUM_ATTRIBUTES + 1)),
      class_names=tuple(class_names[i] for i in range(1, num_classes + 1)))


_ATTRIBUTE_USAGE = "<image_id> <attribute_id> <is_present> <certainty_id> <time>"


def _attribute_table(source: str, data: bytes, ids: np.ndarray, certainty_ids
                     ) -> tuple[np.ndarray, np.ndarray]:
  """image_attribute_labels.txt -> is_present and certainty, (images, 312) uint8 each.

  The real file has 3.7 M lines, so numpy's C parser reads them; only when it fails or a
  value is off are the lines re-read one by one in Python, for an exact error message.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
      values = np.loadtxt(io.BytesIO(data), dtype=np.int64, usecols=range(4), comments=None,
                          ndmin=2)
  except ValueError:
    values = None
  if values is not None:
    image_id, attribute_id, present, certainty = values.T
    rows = np.minimum(np.searchsorted(ids, image_id), max(len(ids) - 1, 0))
    cells = rows * NUM_ATTRIBUTES + attribute_id - 1
    ok = (len(ids) > 0 and (ids[rows] == image_id).all()
          and ((attribute_id >= 1) & (attribute_id <= NUM_ATTRIBUTES)).all()
          and np.isin(present, (0, 1)).all() and np.isin(certainty, certainty_ids).all()
          and np.bincount(cells, minlength=1).max(initial=0) <= 1)
  if values is None or not ok:
    rows, attribute_id, present, certainty = _attribute_lines(source, data, ids, certainty_ids)
    cells = rows * NUM_ATTRIBUTES + attribute_id - 1
  attributes = np.zeros((len(ids), NUM_ATTRIBUTES), np.uint8)
  certainties = np.zeros((len(ids), NUM_ATTRIBUTES), np.uint8)  # 0 = no line
  attributes.flat[cells] = present
  certainties.flat[cells] = certainty
  unset = np.argwhere(certainties == 0)
  if len(unset):
    row, column = unset[0]
    raise ValueError(f"{source}: {len(unset)} (image, attribute) pairs have no line, e.g. "
                     f"image {ids[row]}, attribute {column + 1}; the file is incomplete")
  return attributes, certainties


def _attribute_lines(source: str, data: bytes, ids: np.ndarray, certainty_ids):
  """The slow, line-by-line reading of ``_attribute_table``: raises naming the line."""
  row_of = {int(image_id): row for row, image_id in enumerate(ids)}
  seen = set()
  columns = []
  for number, fields in _rows(source, data, 4, _ATTRIBUTE_USAGE):
    image_id, attribute_id, present, certainty = _ints(source, number, fields[:4],
                                                       _ATTRIBUTE_USAGE)
    row = row_of.get(image_id)
    if (row is None or not 1 <= attribute_id <= NUM_ATTRIBUTES or present not in (0, 1)
        or certainty not in certainty_ids):
      raise _bad_line(source, number, " ".join(fields), _ATTRIBUTE_USAGE + " with a listed "
                      f"image, attribute 1..{NUM_ATTRIBUTES}, is_present 0/1 and a certainty "
                      f"id of {CERTAINTIES_TXT}")
    if (row, attribute_id) in seen:
      raise ValueError(f"{source}, line {number}: image {image_id}, attribute {attribute_id} "
                       "appears twice")
    seen.add((row, attribute_id))
    columns.append((row, attribute_id, present, certainty))
  return np.asarray(columns, np.int64).reshape(-1, 4).T


# ---------------------------------------------------------------------------- sources


def _files(manual_dir: str) -> files_lib.Files:
  """The extracted folder when it has images.txt (random access), else the archive."""
  if os.path.isfile(os.path.join(manual_dir, *IMAGES_TXT.split("/"))):
    return files_lib.Files(manual_dir)
  return files_lib.Files(os.path.join(manual_dir, ARCHIVE), url=URL)


# ---------------------------------------------------------------------------- builder


@dataclasses.dataclass
class CtranCubConfig(tfds.core.BuilderConfig):
  """How concepts are chosen, and the label vector size that results.

  ``num_concepts`` fixes the ``labels`` shape (``num_concepts + num_classes``) before any
  data is read, so a selection of another size stops the build with a ValueError.
  ``concept_attributes`` fixes the attributes instead of selecting by ``min_classes``.
  """

  min_classes: int = 10
  num_concepts: int = 112
  num_classes: int = 200
  concept_attributes: tuple[int, ...] | None = None


class CtranCub(tfds.core.GeneratorBasedBuilder):
  """CUB-200-2011 with CBM's class-level concepts + one-hot class: C-Tran's CUB-312."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
      CtranCubConfig(name="default", description="CBM's rule: attributes voted present "
                     "for >= 10 classes (expects 112)."),
      CtranCubConfig(name="cbm", description="CBM's published 112 attribute indices, "
                     "class-level values voted here.",
                     concept_attributes=CBM_CONCEPT_ATTRIBUTES),
      CtranCubConfig(name="tiny", description="Test-sized: 4 classes, attributes voted "
                     "present for >= 1 class (expects 4).",
                     min_classes=1, num_concepts=4, num_classes=4),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {ARCHIVE} (1.1 GB) from {URL} and put it in the manual_dir, or put its\n"
      f"extracted {ROOT}/ folder there with the archive's top-level attributes.txt (beside\n"
      f"{ROOT}/ or as {ROOT}/attributes/attributes.txt). The archive is read as is.")

  @classmethod
  def missing_manual_files(cls, manual_dir: str) -> list[str]:
    """One line per required file missing from ``manual_dir`` ([] when all are there)."""
    if os.path.isfile(os.path.join(manual_dir, ARCHIVE)):
      return []
    if not os.path.isdir(os.path.join(manual_dir, ROOT)):
      return [f"{ARCHIVE} (or its extracted folder {ROOT}/ with attributes.txt): {URL}"]
    folder = files_lib.Files(manual_dir)
    missing = []
    if len(folder.missing(ATTRIBUTES_TXT)) == len(ATTRIBUTES_TXT):
      missing.append(f"attributes.txt (top level of {ARCHIVE}; put it beside {ROOT}/ or in "
                     f"{ROOT}/attributes/): {URL}")
    missing += [f"{name} (part of {ARCHIVE}): {URL}" for name in folder.missing(_TABLES)]
    if not os.path.isdir(os.path.join(manual_dir, *IMAGES_DIR.split("/"))):
      missing.append(f"{IMAGES_DIR} (part of {ARCHIVE}): {URL}")
    return missing

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    num_labels = c.num_concepts + c.num_classes
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=common.features(
            num_labels,
            class_label=tfds.features.ClassLabel(num_classes=c.num_classes),
            attribute_labels=tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.uint8),
            attribute_certainty=tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.uint8),
            label_visible=tfds.features.Tensor(shape=(num_labels,), dtype=np.bool_),
            **{"image/id": tfds.features.Scalar(dtype=np.int64),
               "image/filename": tfds.features.Text()}),
        # Filled from the annotations in _split_generators and saved with the dataset.
        metadata=tfds.core.MetadataDict(),
        homepage=URL,
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    files = _files(common.manual_dir(self, dl_manager))
    # One pass over a tgz reads the tables and lists the images.
    tables = dict(files.read_all({*ATTRIBUTES_TXT, *_TABLES}))
    absent = [name for name in _TABLES if name not in tables]
    if not any(name in tables for name in ATTRIBUTES_TXT):
      absent.insert(0, " or ".join(ATTRIBUTES_TXT))
    if absent:
      raise FileNotFoundError(f"{files.path} lacks {', '.join(absent)}; get a complete "
                              f"{ARCHIVE} from {URL}")
    ann = parse_annotations(tables, c.num_classes, files.describe)
    missing_images = files.missing(IMAGES_DIR + p for p in ann.paths)
    if missing_images:
      raise FileNotFoundError(
          f"{len(missing_images)} image(s) listed in {IMAGES_TXT} are missing from "
          f"{files.path}, e.g. {missing_images[0]}; get a complete {ARCHIVE} from {URL}")

    concepts, table = self._concepts(ann)
    self._set_metadata(ann, concepts)
    validation = np.asarray([is_validation(int(i)) for i in ann.image_ids])
    rows = {"train": np.flatnonzero(ann.is_train & ~validation),
            "validation": np.flatnonzero(ann.is_train & validation),
            "test": np.flatnonzero(~ann.is_train)}
    logging.info("ctran_cub: %s", ", ".join(f"{k} {len(v)}" for k, v in rows.items()))
    return {split: self._generate_examples(files, ann, concepts, table, r)
            for split, r in rows.items()}

  def _concepts(self, ann: Annotations) -> tuple[np.ndarray, np.ndarray]:
    """Kept attribute indices and the (classes, concepts) table; checks the count."""
    c = self.builder_config
    train = ann.is_train
    found, table = select_concepts(ann.attributes[train], ann.classes[train], c.num_classes,
                                   c.min_classes, ann.certainties[train])
    logging.info("ctran_cub: %d attributes are present for >= %d classes: %s", len(found),
                 c.min_classes, found.tolist())
    if c.num_classes == 200 and c.min_classes == 10:
      extra = sorted(set(found.tolist()) - set(CBM_CONCEPT_ATTRIBUTES))
      lacking = sorted(set(CBM_CONCEPT_ATTRIBUTES) - set(found.tolist()))
      logging.info("ctran_cub: vs CBM's 112: extra %s, lacking %s", extra, lacking)
    if c.concept_attributes is not None:  # same votes, fixed attributes
      _, votes = select_concepts(ann.attributes[train], ann.classes[train], c.num_classes, 0,
                                 ann.certainties[train])
      found = np.asarray(c.concept_attributes, np.int64)
      table = votes[:, found]
    if len(found) != c.num_concepts:
      raise ValueError(
          f"config {c.name!r} expects {c.num_concepts} concepts but the data give "
          f"{len(found)} attributes present for >= {c.min_classes} classes: {found.tolist()}. "
          "Use the 'cbm' config (CBM's published 112) or a config with that num_concepts.")
    return found, table

  def _set_metadata(self, ann: Annotations, concepts: np.ndarray) -> None:
    c = self.builder_config
    names = [ann.attribute_names[i] for i in concepts]
    groups = list(dict.fromkeys(group_of(n) for n in names))
    self.info.features["class_label"].names = list(ann.class_names)
    self.info.metadata.update(
        label_names=names + list(ann.class_names), num_concepts=len(concepts),
        num_classes=c.num_classes, concept_attributes=[int(i) for i in concepts],
        concept_groups=[groups.index(group_of(n)) for n in names], group_names=groups,
        num_groups=len(groups), attribute_names=list(ann.attribute_names),
        min_classes=c.min_classes)

  def _generate_examples(self, files, ann: Annotations, concepts, table, rows):
    c = self.builder_config
    row_of = {IMAGES_DIR + ann.paths[r]: r for r in rows}
    seen = 0
    for name, data in files.read_all(row_of):
      r = row_of[name]
      label = int(ann.classes[r])
      visible = ann.certainties[r, concepts] != NOT_VISIBLE
      seen += 1
      yield int(ann.image_ids[r]), {
          "image": data,
          "labels": np.concatenate([table[label], common.multi_hot([label], c.num_classes)]),
          "class_label": label,
          "attribute_labels": ann.attributes[r],
          "attribute_certainty": ann.certainties[r],
          "label_visible": np.concatenate([visible, np.ones(c.num_classes, bool)]),
          "image/id": int(ann.image_ids[r]),
          "image/filename": ann.paths[r],
      }
    if seen != len(row_of):
      raise FileNotFoundError(f"{files.path}: {len(row_of) - seen} image(s) of this split "
                              "disappeared while reading; check the archive")
