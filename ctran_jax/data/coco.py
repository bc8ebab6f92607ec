"""``ctran_coco2014``: COCO-2014 as 80-label multi-label classification (C-Tran's COCO-80).

Source files, from ``manual_dir`` (each archive may instead be present extracted):

* ``train2014.zip`` (~13 GB, 82,783 JPEGs) or the folder ``train2014/``;
* ``val2014.zip`` (~6 GB, 40,504 JPEGs) or the folder ``val2014/``;
* ``annotations_trainval2014.zip`` or ``annotations/instances_{train,val}2014.json``.

The archives are read in place, member by member (`files.Files`; nothing is extracted to
disk); where both a zip and its folder exist, the zip wins (a folder may be a partial
extraction).
Images are stored as their original JPEG bytes (no decode / re-encode); a few COCO images
are greyscale, which the pipeline's 3-channel decode turns into RGB.

Labels: ``labels`` is an 80-dim multi-hot ``uint8``; index ``i`` is the ``i``-th of the 80
COCO category ids in increasing order (ids 1..90 with gaps: 1 person -> 0, ...,
90 toothbrush -> 79), the usual convention of multi-label COCO work (C-Tran's own label
pickles are not public; see docs).  ``info.metadata["label_names"]`` and
``["category_ids"]`` hold the names and ids in that order.  A label is positive when the
image has at least one instance annotation of the category, **crowd annotations
(``iscrowd=1``) included**: a crowd region is still that object being in the picture.
The JSON files are parsed with the standard library (no pycocotools); their category list
must be exactly the 80 categories below, and an annotation naming an unknown image or
category id is an error (ValueError naming the JSON file).

Images without any instance annotation are **kept, with all-zero labels** (they are real
val2014 images, and dropping them would silently change the evaluation set); the builder
counts them per split in ``info.metadata["unlabelled_images"]``.  From the public annotation
statistics (82,081 of 82,783 train and 40,137 of 40,504 val images have instances, the
counts multi-label papers report) the expected numbers are 702 (train2014) and 367
(val2014); they were not measured here (no COCO copy on this machine).  Filter them in a
pipeline if a protocol needs the annotated images only.

Splits: ``train2014`` and ``val2014``, the official ones (the reference C-Tran recipe uses
val2014 as validation and test set).  Examples are keyed by image id; TFDS writes them in a
deterministic hashed order, so the same files give byte-identical datasets.

Builtin TFDS ``coco/2014`` can be used instead: the adapter registered here for builder
``coco`` maps its examples (boxes with ClassLabel ``label``) to the same 80 multi-hot
labels in the same order, matching the ClassLabel names to ours by name.

Prepare (Python API; the ``tfds`` CLI needs apache-beam):

    python -m ctran_jax.data.prepare ctran_coco2014 --manual_dir M --data_dir D
    # or: tfds.builder("ctran_coco2014", data_dir=D).download_and_prepare(
    #         download_config=tfds.download.DownloadConfig(manual_dir=M))
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from ctran_jax.data import adapters, common
from ctran_jax.data import files as files_lib

# The 80 COCO object categories as (category id, name), in id order = label order.
CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"),
    (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"),
    (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench"),
    (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)
CATEGORY_IDS = tuple(i for i, _ in CATEGORIES)
LABEL_NAMES = tuple(name for _, name in CATEGORIES)
NUM_LABELS = len(CATEGORIES)
SPLITS = ("train2014", "val2014")
ANNOTATIONS_ZIP = "annotations_trainval2014.zip"
URLS = {
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",
    ANNOTATIONS_ZIP: "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
}


def _instances_member(split: str) -> str:
  return f"annotations/instances_{split}.json"


# ------------------------------------------------------------------------- annotations


class _Annotation(tuple):
  """(annotation id, image id, category id): all an instance annotation is needed for."""
  __slots__ = ()


def _slim(obj: dict):
  """``json`` object hook: keep the three ids of an instance annotation, drop the rest.

  Run on every JSON object as it is parsed, so the ~600k segmentation polygons of
  instances_train2014.json are freed at once instead of held until the end (measured on a
  synthetic quarter-size file, 80 MB with 151k annotations: +114 MB peak memory against
  +494 MB for a plain ``json.loads``).
  """
  if "image_id" in obj and "category_id" in obj:
    return _Annotation((obj.get("id"), obj["image_id"], obj["category_id"]))
  return obj


def load_json(data: bytes, source: str, object_hook=None):
  """``json.loads`` with errors as a ValueError naming ``source`` (a file in the zip)."""
  try:
    return json.loads(data, object_hook=object_hook)
  except json.JSONDecodeError as e:
    raise ValueError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: "
                     f"{e.msg}); re-download {ANNOTATIONS_ZIP}") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{source}: not a UTF-8 JSON file ({e})") from None


def image_names(images, source: str) -> dict[int, str]:
  """A COCO file's ``images`` list → {image id: file name} in file order, checked."""
  names: dict[int, str] = {}
  for image in images:
    if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
      raise ValueError(f"{source}: image entry without 'id' and 'file_name': {image!r:.200}")
    if not isinstance(image["id"], int):
      raise ValueError(f"{source}: image id {image['id']!r} is not an integer")
    if image["id"] in names:
      raise ValueError(f"{source}: image id {image['id']} appears twice")
    names[image["id"]] = str(image["file_name"])
  return names


def parse_instances(data: bytes, source: str) -> list[tuple[int, str, np.ndarray]]:
  """An ``instances_*.json`` → ``[(image id, file name, labels (80,) uint8)]`` by image id.

  ``source`` names the file in error messages.
  """
  doc = load_json(data, source, object_hook=_slim)
  if not isinstance(doc, dict) or not {"images", "annotations", "categories"} <= set(doc):
    raise ValueError(f"{source}: expected a COCO instances file with 'images', "
                     "'annotations' and 'categories'")
  _check_categories(doc["categories"], source)
  category_index = {cid: i for i, cid in enumerate(CATEGORY_IDS)}

  names = image_names(doc["images"], source)
  image_index = {image_id: row for row, image_id in enumerate(names)}
  files = list(names.values())
  labels = np.zeros((len(files), NUM_LABELS), np.uint8)
  for ann in doc["annotations"]:
    if not isinstance(ann, _Annotation):
      raise ValueError(f"{source}: annotation without 'image_id' and 'category_id': "
                       f"{ann!r:.200}")
    ann_id, image_id, category_id = ann
    row = image_index.get(image_id)
    if row is None:
      raise ValueError(f"{source}: annotation {ann_id} refers to image id {image_id!r}, "
                       "which is not in the file's 'images'")
    column = category_index.get(category_id)
    if column is None:
      raise ValueError(f"{source}: annotation {ann_id} refers to category id "
                       f"{category_id!r}, not one of the 80 COCO categories")
    labels[row, column] = 1  # crowd annotations (iscrowd=1) count as positives
  return [(image_id, files[image_index[image_id]], labels[image_index[image_id]])
          for image_id in sorted(image_index)]


def _check_categories(categories, source: str) -> None:
  try:
    found = [(c["id"], c["name"]) for c in categories]
    got = set(found)
  except (TypeError, KeyError):
    raise ValueError(f"{source}: 'categories' must be a list of {{id, name, ...}} "
                     "objects") from None
  expected = set(CATEGORIES)
  if got != expected or len(found) != len(CATEGORIES):
    raise ValueError(
        f"{source}: its categories are not the 80 COCO-2014 categories (missing "
        f"{sorted(expected - got)[:5]}, unexpected {list(got - expected)[:5]}, "
        f"{len(found)} in all); is this an instances_*2014.json file?")


# ------------------------------------------------------------------------------ files


def annotation_files(manual_dir: epath.Path) -> files_lib.Files:
  """The annotations zip when there is one, else the manual dir with the extracted JSONs
  (both hold them as ``annotations/{instances,captions}_<split>.json``; ctran_coco1000
  reads the captions)."""
  zip_path = manual_dir / ANNOTATIONS_ZIP
  if zip_path.exists():
    return files_lib.Files(zip_path, url=URLS[ANNOTATIONS_ZIP])
  return files_lib.Files(manual_dir)


def image_files(manual_dir: epath.Path, split: str) -> files_lib.Files | None:
  """A split's zip, else its folder (a folder may be a partial extraction), else None."""
  for path in (manual_dir / f"{split}.zip", manual_dir / split):
    if path.exists():
      return files_lib.Files(path, url=URLS[split])
  return None


def read_annotation_file(files: files_lib.Files, member: str) -> tuple[bytes, str]:
  """(bytes, description for messages) of ``annotations/<name>.json`` in the zip or folder."""
  try:
    return files.read(member), files.describe(member)
  except FileNotFoundError:
    raise FileNotFoundError(f"{files.path} has no member {member!r}; is it the original "
                            f"{ANNOTATIONS_ZIP} ({URLS[ANNOTATIONS_ZIP]})?") from None


def missing_files(manual_dir: str, annotation_members) -> list[str]:
  """One line per required file that ``manual_dir`` lacks: the two image zips (or folders)
  and the annotations zip (or its extracted ``annotation_members``); [] when all are there."""
  root = epath.Path(manual_dir)
  missing = [f"{split}.zip (or folder {split}/): {URLS[split]}"
             for split in SPLITS if image_files(root, split) is None]
  annotations = annotation_files(root)
  lacking = [] if annotations.is_zip else annotations.missing(annotation_members)
  if lacking:
    missing.append(f"{ANNOTATIONS_ZIP} (or {' and '.join(lacking)}): "
                   f"{URLS[ANNOTATIONS_ZIP]}")
  return missing


def generate_examples(images: files_lib.Files, records) -> Iterator[tuple[int, dict]]:
  """Keyed examples of ``records`` [(image id, file name, labels)], each with the image's
  original bytes from ``images`` (a split's zip or folder); closes ``images``."""
  with images:
    # A zip holds the images under a folder (train2014/...): find them by base name.
    members = None if images.is_folder else {
        posixpath.basename(n): n for n in images.names()}
    for image_id, file_name, labels in records:
      try:
        data = images.read(file_name if members is None
                           else members[posixpath.basename(file_name)])
      except (KeyError, FileNotFoundError):
        raise FileNotFoundError(
            f"{images.describe(file_name)} is missing (listed in the annotations); is the "
            "folder completely extracted?" if members is None else
            f"{images.path} has no image {file_name!r} (listed in the annotations); the zip "
            "may be incomplete") from None
      yield image_id, {"image": data, "labels": labels,
                       "image/id": image_id, "image/filename": file_name}


# ------------------------------------------------------------------------------ builder


class CtranCoco2014(tfds.core.GeneratorBasedBuilder):
  """COCO-2014 train/val images with 80-dim multi-hot object labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the original COCO-2014 files in manual_dir (zips, or their extracted folders):
    train2014.zip                 {URLS["train2014"]}
    val2014.zip                   {URLS["val2014"]}
    {ANNOTATIONS_ZIP}  {URLS[ANNOTATIONS_ZIP]}
  Extracted instead: train2014/, val2014/, annotations/instances_train2014.json and
  annotations/instances_val2014.json.
  """

  @classmethod
  def missing_manual_files(cls, manual_dir: str) -> list[str]:
    """One line per required file that ``manual_dir`` lacks; [] when all are there."""
    return missing_files(manual_dir, [_instances_member(split) for split in SPLITS])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=common.features(NUM_LABELS, **{
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "image/filename": tfds.features.Text(),
        }),
        homepage="https://cocodataset.org",
        metadata=tfds.core.MetadataDict(
            label_names=list(LABEL_NAMES), category_ids=list(CATEGORY_IDS),
            unlabelled_images={}),
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(common.manual_dir(self, dl_manager))
    # Parse (and check) both annotation files before writing anything.
    with annotation_files(manual_dir) as annotations:
      records = {split: parse_instances(*read_annotation_file(
                     annotations, _instances_member(split))) for split in SPLITS}
    self.info.metadata["unlabelled_images"] = {
        split: int(sum(not labels.any() for _, _, labels in records[split]))
        for split in SPLITS}
    return {split: self._generate_examples(image_files(manual_dir, split), records[split])
            for split in SPLITS}

  def _generate_examples(self, images: files_lib.Files, records) -> Iterator[tuple[int, dict]]:
    return generate_examples(images, records)


# ------------------------------------------------------------- builtin TFDS coco/2014


def builtin_label_permutation(class_names) -> np.ndarray:
  """Our label index for each class index of builtin ``coco``'s ``objects/label``.

  A prepared builtin copy names its classes from the annotation file (in file order, which
  is category-id order, so this is the identity in practice); matching by name keeps the
  labels right whatever the order.  Unnamed classes ("0".."79", e.g. under
  ``tfds.testing.mock_data`` without metadata) are taken to be in category-id order.
  """
  names = [str(n) for n in class_names]
  if len(names) != NUM_LABELS:
    raise ValueError(f"builtin coco has {len(names)} object classes; expected {NUM_LABELS}")
  if names == [str(i) for i in range(NUM_LABELS)]:
    return np.arange(NUM_LABELS)
  index = {name: i for i, name in enumerate(LABEL_NAMES)}
  unknown = sorted(set(names) - set(index))
  if unknown or len(set(names)) != NUM_LABELS:
    raise ValueError(f"builtin coco class names do not match the 80 COCO categories "
                     f"(unknown: {unknown[:5]})")
  return np.array([index[n] for n in names])


def builtin_to_example(permutation: np.ndarray):
  """In-graph map: raw builtin coco example -> ``{image: bytes, labels: int32 (80,)}``.

  Every object's class is a positive, crowd objects (``is_crowd``) included, as in
  ``ctran_coco2014``; an image without objects gets all-zero labels.  Other keys
  (``tfds_id``, ``image/id``, ``image/filename``) pass through; ``objects`` is dropped.
  """
  table = tf.constant(permutation, tf.int64)

  def to_example(ex: dict) -> dict:
    classes = tf.gather(table, tf.cast(tf.reshape(ex["objects"]["label"], [-1]), tf.int64))
    out = {k: v for k, v in ex.items() if k != "objects"}
    out["labels"] = common.multi_hot_graph(classes, NUM_LABELS)
    return out

  return to_example


@adapters.register("coco")
def coco_adapter(builder) -> adapters.Adapter:
  """Builtin TFDS ``coco`` (any config; meant for ``coco/2014``) as 80-label examples."""
  features = builder.info.features
  if "objects" not in features:
    raise ValueError(f"builtin {builder.info.full_name} has no 'objects' feature (the "
                     "panoptic configs are not supported); use coco/2014")
  names = features["objects"]["label"].names
  return adapters.Adapter(label_names=LABEL_NAMES,
                          to_example=builtin_to_example(builtin_label_permutation(names)))
