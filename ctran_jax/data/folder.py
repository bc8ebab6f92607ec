"""``ctran_folder``: your own multi-label dataset from a folder of images and a labels file.

Source files (the *manual dir*, ``M``):

* a labels file, ``M/labels.csv`` or ``M/labels.jsonl`` (or any file named by
  ``labels_file``; ``.jsonl``/``.json`` is read as JSON lines, anything else as CSV):

  - CSV, one image per row: ``filename,labels`` or ``filename,labels,split``.  ``labels`` is
    ``name1;name2;...`` (spaces around names are ignored; an empty field means the image has
    no label).  The header row is optional: a first row whose first field is ``filename`` is
    a header and may name the columns ``filename``, ``labels`` and (optional) ``split`` in
    any order; without a header the columns are positional and every row has the same
    number of fields.  Quote fields that contain commas (``"a,b.jpg",cat``).
  - JSON lines: ``{"filename": "a.jpg", "labels": ["cat", "dog"], "split": "train"}`` per
    line (``split`` optional, other keys ignored).
* the images, at ``filename`` relative to the *images root*: ``images_dir`` when given
  (relative to ``M`` or absolute), else ``M/images/`` when that folder exists, else ``M``.
  Filenames may contain sub-folders (``cats/001.jpg``) but no ``..`` and must be relative.
* optional: a label list, ``M/label_names.txt`` (or the file named by ``label_list``), one
  label name per line.  It fixes the label order (label ``i`` = line ``i``, blank lines
  skipped) and makes any other name in the labels file an error.  Without it the labels are
  the sorted set of all names in the labels file.

Problems of the labels file and label list (malformed lines, bad filenames or split names,
duplicate filenames, unknown or twice-listed labels) are all collected and raised as one
ValueError that lists each as ``file:line: reason`` (the first 50, then a count; a single
problem is raised as it is).  Images missing from the images root join that list when the
labels file has other problems; otherwise preparing names them all (FileNotFoundError).

Labels: ``labels`` is the multi-hot uint8 (L,) vector of the row's names.  The dataset's
``info.metadata`` holds ``label_names`` and what preparation counted: ``num_images``,
``label_counts`` (positives per label), ``images_without_labels``, ``skipped_images`` and
``skipped_files`` (see ``on_bad_image``), ``reencoded_images``, ``split_rule`` and a
``fingerprint`` of the labels file, label list and options.

Splits: with a ``split`` column (or key), each image goes to the split it names (any names
made of letters, digits, ``_`` and ``-``; every row must name one).  Otherwise the split is
a pure function of the filename (as stored in ``image/filename``: ``./a.jpg`` becomes
``a.jpg``), so it never changes when images are added or removed:
``u = int.from_bytes(sha256(filename.encode("utf-8"))[:8], "big") / 2**64``; ``test`` if
``u < test_fraction``, else ``validation`` if ``u < test_fraction + validation_fraction``,
else ``train`` (defaults 0.1 and 0.1).  A split that gets no image is left out (logged).

Images: every image is decoded once while preparing with ``tf.io.decode_image`` (the
decoder the training pipeline uses), so truncated or corrupt files are found before
training.  JPEG and PNG files are stored byte for byte; any other format TF decodes (GIF,
BMP, WebP) is stored as a lossless PNG of its first frame, in RGB.  EXIF orientation is not
applied (TF's decoder ignores it).  ``on_bad_image="fail"`` (default) stops with a list of
the bad files and their labels-file lines; ``"skip"`` leaves them out, logs them and counts
them in ``metadata["skipped_images"]``.  A missing image file is always an error.

Prepare (the options are builder keyword arguments, named in ``PREPARE_OPTIONS``)::

    python -m ctran_jax.data.prepare folder --manual_dir=M --data_dir=D

    # or from Python:
    tfds.builder("ctran_folder", data_dir=D, manual_dir=M, on_bad_image="skip") \\
        .download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=M))

The label count is only known from the data, so ``_info`` reads the labels file when the
builder is made: ``manual_dir`` must be a builder argument (a ``DownloadConfig.manual_dir``
alone is refused, since the features are fixed by then).  Without it the builder looks in
TFDS's default manual dir, ``D/downloads/manual``.  Once prepared, the stored dataset is the
source of truth: ``tfds.builder("ctran_folder", data_dir=D)`` restores the features and
metadata from ``D/ctran_folder/1.0.0`` with no options (so training only needs
``data.name="ctran_folder"`` and ``data.data_dir=D``), and
``tfds.builder_from_directory(D + "/ctran_folder/1.0.0")`` reads it without this module.
One data_dir holds one folder dataset.  Preparing again from a changed labels file, label
list or options is refused unless the download mode overwrites the dataset
(``REUSE_CACHE_IF_EXISTS``); a change to image files alone is not detected, so rebuild after
replacing images.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
import posixpath
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from ctran_jax.data import common

LABELS_FILES = ("labels.csv", "labels.jsonl")
LABEL_LIST_FILE = "label_names.txt"
IMAGES_SUBDIR = "images"
ON_BAD_IMAGE = ("fail", "skip")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
_KEPT_FORMATS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: stored as they are
_MAX_LISTED = 50  # problems named in one error message
_PLACE = re.compile(r"(.*?):(\d+): ")  # "file:line: " that starts a problem

PREPARE_OPTIONS = {
    "manual_dir": "folder with the images and the labels file",
    "labels_file": "labels file, relative to manual_dir or absolute "
                   "(default: labels.csv or labels.jsonl)",
    "label_list": "file with one label name per line fixing the label order "
                  "(default: label_names.txt when present)",
    "images_dir": "folder the filenames are relative to (default: manual_dir/images when "
                  "present, else manual_dir)",
    "validation_fraction": "share of images hashed to 'validation' when there is no split "
                           "column (default 0.1)",
    "test_fraction": "share of images hashed to 'test' when there is no split column "
                     "(default 0.1)",
    "on_bad_image": "'fail' (default) or 'skip' images that cannot be decoded",
}


@dataclasses.dataclass(frozen=True)
class FolderOptions:
  """How to read a folder; paths are relative to ``manual_dir`` unless absolute."""

  manual_dir: str | None = None
  labels_file: str | None = None
  label_list: str | None = None
  images_dir: str | None = None
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  on_bad_image: str = "fail"

  def __post_init__(self):
    for key in ("validation_fraction", "test_fraction"):  # flags may arrive as strings
      try:
        object.__setattr__(self, key, float(getattr(self, key)))
      except (TypeError, ValueError):
        raise ValueError(f"{key}={getattr(self, key)!r}; expected a number") from None
    v, t = self.validation_fraction, self.test_fraction
    if v < 0 or t < 0 or v + t >= 1:
      raise ValueError(f"need validation_fraction >= 0, test_fraction >= 0 and a sum < 1, "
                       f"got {v} and {t}")
    if self.on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f"on_bad_image={self.on_bad_image!r}; expected 'fail' or 'skip'")


@dataclasses.dataclass(frozen=True)
class Row:
  """One image of the labels file: ``line`` is its (last) line number there."""

  filename: str
  labels: tuple[str, ...]
  split: str | None
  line: int


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed folder: its rows, label names and where the files are."""

  manual_dir: str
  labels_path: str
  label_list_path: str | None
  images_root: str
  rows: tuple[Row, ...]
  label_names: tuple[str, ...]
  split_rule: str  # "column" or "hash"
  options: dict  # what decides the data, with paths relative to manual_dir (it may move)
  fingerprint: str  # of the labels file, the label list and ``options``


# ------------------------------------------------------------------------- labels files


def _resolve(manual_dir: str, path: str) -> str:
  return os.path.normpath(os.path.join(manual_dir, os.path.expanduser(path)))


def labels_path(manual_dir: str, labels_file: str | None = None) -> str | None:
  """The labels file to read (None: none there); both defaults present is an error."""
  if labels_file:
    return _resolve(manual_dir, labels_file)
  found = [n for n in LABELS_FILES if os.path.isfile(os.path.join(manual_dir, n))]
  if len(found) > 1:
    raise ValueError(f"{manual_dir} holds both {' and '.join(found)}; name the one to use "
                     "with labels_file")
  return os.path.join(manual_dir, found[0]) if found else None


def _clean_filename(raw, where: str) -> str:
  if not isinstance(raw, str) or not raw.strip():
    raise ValueError(f"{where}: empty or missing filename")
  name = raw.strip().replace("\\", "/")
  norm = posixpath.normpath(name)
  if name.startswith("/") or norm == ".." or norm.startswith("../"):
    raise ValueError(f"{where}: filename {raw!r} must be relative to the images folder, "
                     "without '..'")
  return norm


def _clean_split(raw, where: str) -> str:
  split = raw.strip() if isinstance(raw, str) else raw
  if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split) or split.lower() == "all":
    raise ValueError(f"{where}: split {raw!r} is not a split name (letters, digits, '_' "
                     "and '-'; not 'all'); give every row a split or drop the split column")
  return split


def _read_csv(path: str, problems: list[str]) -> list[Row]:
  rows, columns = [], None
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    for fields in reader:
      where = f"{path}:{reader.line_num}"
      if not any(field.strip() for field in fields):
        continue  # blank line
      if columns is None and fields[0].strip().lower() == "filename":
        columns = [field.strip().lower() for field in fields]
        unknown = set(columns) - {"filename", "labels", "split"}
        if unknown or "labels" not in columns or len(set(columns)) != len(columns):
          problems.append(f"{where}: header {fields} must name the columns filename, labels "
                          "and optionally split, each once (the rows were not read)")
          return rows
        continue
      if columns is None:  # no header: the first well-formed row fixes the column count
        if len(fields) not in (2, 3):
          problems.append(f"{where}: expected 'filename,labels' or 'filename,labels,split', "
                          f"got {len(fields)} field(s): {fields}")
          continue
        columns = ["filename", "labels", "split"][:len(fields)]
      if len(fields) != len(columns):
        problems.append(f"{where}: expected {len(columns)} fields ({','.join(columns)}), got "
                        f"{len(fields)}: {fields} (quote fields that contain commas)")
        continue
      record = dict(zip(columns, fields, strict=True))
      labels = tuple(n.strip() for n in record["labels"].split(";") if n.strip())
      try:
        split = _clean_split(record["split"], where) if "split" in record else None
        rows.append(Row(_clean_filename(record["filename"], where), labels, split,
                        reader.line_num))
      except ValueError as e:
        problems.append(str(e))
  return rows


def _read_jsonl(path: str, problems: list[str]) -> list[Row]:
  rows = []
  with open(path, encoding="utf-8-sig") as f:
    for number, line in enumerate(f, start=1):
      where = f"{path}:{number}"
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"{where}: not valid JSON ({e.msg}); each line must be one object "
                        'such as {"filename": "a.jpg", "labels": ["cat"]}')
        continue
      if not isinstance(record, dict):
        problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        continue
      labels = record.get("labels")
      if not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
        problems.append(f"{where}: 'labels' must be a list of label names, got {labels!r}")
        continue
      try:
        split = _clean_split(record["split"], where) if "split" in record else None
        rows.append(Row(_clean_filename(record.get("filename"), where),
                        tuple(n.strip() for n in labels if n.strip()), split, number))
      except ValueError as e:
        problems.append(str(e))
  return rows


def _parse_rows(path: str, problems: list[str]) -> list[Row]:
  """The well-formed rows of a labels file; every problem found is added to ``problems``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"labels file {path} does not exist")
  read = _read_jsonl if path.lower().endswith((".jsonl", ".json")) else _read_csv
  rows = read(path, problems)
  if not rows and not problems:
    problems.append(f"{path} lists no images; expected one 'filename,labels' row per image")
  first_line: dict[str, int] = {}
  unique = []
  for row in rows:
    if row.filename in first_line:
      problems.append(f"{path}:{row.line}: duplicate filename {row.filename!r} (first at line "
                      f"{first_line[row.filename]}); list each image once")
      continue
    first_line[row.filename] = row.line
    unique.append(row)
  with_split = [row for row in unique if row.split is not None]
  if with_split and len(with_split) != len(unique):
    problems.extend(f"{path}:{row.line}: no split, while line {with_split[0].line} has one; "
                    "give every row a split or none" for row in unique if row.split is None)
  return unique


def _raise_problems(problems: list[str], what: str) -> None:
  """One ValueError for all the ``problems`` of ``what`` (a single one: as it is), by file
  and line."""
  if len(problems) == 1:
    raise ValueError(problems[0])
  if problems:
    files: dict[str, int] = {}  # in the order first named

    def place(problem):
      match = _PLACE.match(problem)
      return (files.setdefault(match[1], len(files)), int(match[2])) if match else (-1, 0)

    places = [place(problem) for problem in problems]
    ordered = [problem for _, problem in sorted(zip(places, problems, strict=True),
                                                key=lambda pair: pair[0])]
    raise ValueError(f"{len(problems)} problems in {what}:\n  {_listed(ordered)}\nFix them "
                     "all, then prepare again.")


def read_rows(path: str) -> list[Row]:
  """Rows of a CSV or JSON-lines labels file, checked line by line (see module doc).

  Raises one ValueError that lists every problem found (file:line: reason).
  """
  problems: list[str] = []
  rows = _parse_rows(path, problems)
  _raise_problems(problems, f"the labels file {path}")
  return rows


def _parse_label_list(path: str, problems: list[str]) -> tuple[str, ...]:
  names: dict[str, int] = {}
  with open(path, encoding="utf-8-sig") as f:
    for number, line in enumerate(f, start=1):
      name = line.strip()
      if not name:
        continue
      if name in names:
        problems.append(f"{path}:{number}: label {name!r} listed twice (first at line "
                        f"{names[name]})")
        continue
      names[name] = number
  if not names:
    problems.append(f"label list {path} is empty; put one label name per line")
  return tuple(names)


def read_label_list(path: str) -> tuple[str, ...]:
  """Label names, one per line (blank lines skipped); duplicates are an error."""
  problems: list[str] = []
  names = _parse_label_list(path, problems)
  _raise_problems(problems, f"the label list {path}")
  return names


def hash_split(filename: str, validation_fraction: float, test_fraction: float) -> str:
  """The split of an image without a split column: a pure function of its filename."""
  u = int.from_bytes(hashlib.sha256(filename.encode("utf-8")).digest()[:8], "big") / 2**64
  if u < test_fraction:
    return "test"
  return "validation" if u < test_fraction + validation_fraction else "train"


def _sha256(path: str | None) -> str:
  if path is None:
    return ""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def read_source(manual_dir: str, options: FolderOptions) -> Source:
  """Parses the labels file (and label list) of a folder; no image is opened here."""
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  missing = CtranFolder.missing_manual_files(manual_dir, labels_file=options.labels_file,
                                             label_list=options.label_list,
                                             images_dir=options.images_dir)
  if missing:
    raise FileNotFoundError(f"ctran_folder: missing in {manual_dir}:\n  " + "\n  ".join(missing))
  path = labels_path(manual_dir, options.labels_file)
  problems: list[str] = []  # all of them, then one error
  rows = _parse_rows(path, problems)
  list_path = (_resolve(manual_dir, options.label_list) if options.label_list else
               os.path.join(manual_dir, LABEL_LIST_FILE))
  list_path = list_path if os.path.isfile(list_path) else None
  if list_path:
    names = _parse_label_list(list_path, problems)
    known = set(names)
    for row in rows:
      unknown = [n for n in row.labels if n not in known]
      if unknown:
        problems.append(f"{path}:{row.line}: unknown label {unknown[0]!r} (not in the label "
                        f"list {list_path}); add it there or fix the row"
                        + (f" (also unknown: {', '.join(map(repr, unknown[1:]))})"
                           if len(unknown) > 1 else ""))
  else:
    names = tuple(sorted({n for row in rows for n in row.labels}))
    if rows and not names:
      problems.append(f"{path}: no row has a label; expected 'name1;name2' in the labels "
                      "column")
  if options.images_dir:
    images_root = _resolve(manual_dir, options.images_dir)
  elif os.path.isdir(os.path.join(manual_dir, IMAGES_SUBDIR)):
    images_root = os.path.join(manual_dir, IMAGES_SUBDIR)
  else:
    images_root = manual_dir
  if problems:  # failing anyway: name the missing images too (else checked when preparing)
    problems.extend(f"{path}:{row.line}: {row.filename}: no such image in {images_root}"
                    for row in rows
                    if not os.path.isfile(os.path.join(images_root, row.filename)))
  _raise_problems(problems, f"the labels file {path}"
                  + (f" and the label list {list_path}" if list_path else ""))
  recorded = {
      "labels_file": os.path.relpath(path, manual_dir),
      "label_list": list_path and os.path.relpath(list_path, manual_dir),
      "images_dir": os.path.relpath(images_root, manual_dir),
      "validation_fraction": options.validation_fraction,
      "test_fraction": options.test_fraction, "on_bad_image": options.on_bad_image}
  fingerprint = hashlib.sha256(json.dumps(
      [_sha256(path), _sha256(list_path), recorded], sort_keys=True).encode())
  return Source(manual_dir=manual_dir, labels_path=path, label_list_path=list_path,
                images_root=images_root, rows=tuple(rows), label_names=names,
                split_rule="column" if rows[0].split is not None else "hash",
                options=recorded, fingerprint=fingerprint.hexdigest())


# ------------------------------------------------------------------------------- images


def check_image(path: str) -> tuple[bool, str | None]:
  """(needs re-encoding, error) after decoding the file as the training pipeline will."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except (OSError, tf.errors.OpError) as e:
    message = getattr(e, "message", None) or str(e)  # TF's, without its op decorations
    message = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:\w+\].*", "", message.strip().splitlines()[-1])
    return False, message[:200]
  return not data.startswith(_KEPT_FORMATS), None


def _stored_bytes(path: str, reencode: bool) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  if reencode:
    data = tf.io.encode_png(tf.io.decode_image(data, channels=3, expand_animations=False))
    data = data.numpy()
  return data


def _listed(problems: list[str]) -> str:
  more = len(problems) - _MAX_LISTED
  return "\n  ".join(problems[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else []))


# ------------------------------------------------------------------------------ builder


class CtranFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of images with a CSV / JSON-lines labels file (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put your images and a labels file in one folder and pass it as manual_dir:
    labels.csv    one row per image: filename,labels[,split] with labels 'cat;dog'
                  (or labels.jsonl: {"filename": ..., "labels": [...], "split": ...})
    images/...    the images (or next to labels.csv), at the filenames the labels file names
    label_names.txt  optional: one label name per line, fixing the label order
  """

  def __init__(self, *, manual_dir=None, labels_file=None, label_list=None, images_dir=None,
               validation_fraction=0.1, test_fraction=0.1, on_bad_image="fail", **kwargs):
    self._options = FolderOptions(
        manual_dir=os.fspath(manual_dir) if manual_dir else None, labels_file=labels_file,
        label_list=label_list, images_dir=images_dir,
        validation_fraction=validation_fraction, test_fraction=test_fraction,
        on_bad_image=on_bad_image)
    self._source: Source | None = None
    self._init_kwargs = {**kwargs, **dataclasses.asdict(self._options)}
    super().__init__(**kwargs)  # calls _info()
    stored = self._stored_metadata()
    if self._source and stored and stored.get("fingerprint") != self._source.fingerprint:
      logging.warning("ctran_folder: %s was prepared from other labels or options than %s has "
                      "now; rebuild it before reading it with this builder", self.data_path,
                      self._source.manual_dir)

  def __getstate__(self):
    """Pickling rebuilds the builder from its arguments (as TFDS does), ours included."""
    return {"init_kwargs": self._init_kwargs}

  def __setstate__(self, state):
    self.__init__(**state["init_kwargs"])

  @classmethod
  def missing_manual_files(cls, manual_dir: str, *, labels_file: str | None = None,
                           label_list: str | None = None,
                           images_dir: str | None = None) -> list[str]:
    """One line per missing required file of ``manual_dir`` ([] when all are there)."""
    manual_dir = os.fspath(manual_dir)
    missing = []
    if labels_file:
      if not os.path.isfile(_resolve(manual_dir, labels_file)):
        missing.append(f"{labels_file}: the labels file named by labels_file")
    elif not any(os.path.isfile(os.path.join(manual_dir, n)) for n in LABELS_FILES):
      missing.append("labels.csv (or labels.jsonl): one 'filename,labels[,split]' row per "
                     "image, labels as 'cat;dog' (see ctran_jax/data/folder.py)")
    if label_list and not os.path.isfile(_resolve(manual_dir, label_list)):
      missing.append(f"{label_list}: the label list named by label_list")
    if images_dir and not os.path.isdir(_resolve(manual_dir, images_dir)):
      missing.append(f"{images_dir}/: the images folder named by images_dir")
    return missing

  def _default_manual_dir(self) -> str:
    return os.path.join(os.fspath(self.data_dir_root), "downloads", "manual")

  def _stored_metadata(self) -> dict | None:
    path = os.path.join(os.fspath(self.data_path), "metadata.json")
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      return json.load(f)

  def _info(self) -> tfds.core.DatasetInfo:
    # A folder given to the builder decides the features (also when rebuilding); else a
    # prepared copy does; else TFDS's default manual dir, when it holds a labels file.
    stored = self._stored_metadata()
    folder = self._options.manual_dir
    if folder is None and stored is None and labels_path(self._default_manual_dir(),
                                                         self._options.labels_file):
      folder = self._default_manual_dir()
    if folder is None and stored is not None:
      features = tfds.features.FeaturesDict.from_config(os.fspath(self.data_path))
      # Given eagerly: TFDS's lazy metadata dict answers `.get` and `in` before loading.
      metadata = tfds.core.MetadataDict(stored)
    else:
      self._source = read_source(folder, self._options) if folder else None
      names = self._source.label_names if self._source else ()
      features = common.features(len(names), **{"image/filename": tfds.features.Text()})
      metadata = tfds.core.MetadataDict(label_names=list(names))
      if self._source:
        metadata.update(fingerprint=self._source.fingerprint, options=self._source.options,
                        split_rule=self._source.split_rule)
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features,
                                 metadata=metadata)

  def download_and_prepare(self, *, download_config=None, **kwargs):
    """TFDS's, after checking that the folder is the one ``_info`` read (see module doc)."""
    config = download_config or tfds.download.DownloadConfig()
    given = os.path.abspath(os.path.expanduser(config.manual_dir)) if config.manual_dir else None
    builds = (not self.is_prepared()
              or tfds.download.GenerateMode(config.download_mode).overwrite_dataset)
    source = self._source
    if builds and source is None:
      folder = given or self._default_manual_dir()
      opts = self._options
      missing = self.missing_manual_files(folder, labels_file=opts.labels_file,
                                          label_list=opts.label_list, images_dir=opts.images_dir)
      if missing:
        raise FileNotFoundError(f"ctran_folder: missing in {folder}:\n  " + "\n  ".join(missing))
    if builds and (source is None or (given and given != source.manual_dir)):
      raise ValueError(
          "ctran_folder reads its labels when the builder is made, so pass the folder "
          f"there: tfds.builder('ctran_folder', data_dir=..., manual_dir={given!r})"
          + (f" (this builder read {source.manual_dir})" if source else ""))
    if not builds and (source or given):
      fingerprint = (source or read_source(given, self._options)).fingerprint
      if fingerprint != (self._stored_metadata() or {}).get("fingerprint"):
        raise ValueError(
            f"{self.data_path} already holds a ctran_folder dataset prepared from another "
            f"labels file, label list or options than {(source.manual_dir if source else given)}"
            " has now. Rebuild it (DownloadConfig(download_mode=REUSE_CACHE_IF_EXISTS), "
            "prepare --overwrite), delete it, or use another data_dir.")
    return super().download_and_prepare(download_config=download_config, **kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # the folder was fixed when the builder was made
    source = self._source
    assert source is not None, "download_and_prepare checks that a folder was read"
    kept = self._decodable_images(source, self._existing_images(source))
    if not kept:
      raise ValueError(f"no image listed in {source.labels_path} could be decoded")
    splits: dict[str, list[tuple[Row, bool]]] = {}
    opts = self._options
    for row, reencode in kept:
      split = row.split or hash_split(row.filename, opts.validation_fraction, opts.test_fraction)
      splits.setdefault(split, []).append((row, reencode))
    if source.split_rule == "hash":
      for split in ("train", "validation", "test"):
        if split not in splits:
          logging.warning("ctran_folder: split %r got no image (of %d); it is left out", split,
                          len(kept))
    index = {name: i for i, name in enumerate(source.label_names)}
    counts = np.zeros(len(index), np.int64)
    for row, _ in kept:
      counts[[index[n] for n in set(row.labels)]] += 1
    self.info.metadata.update(
        num_images=len(kept), label_counts=counts.tolist(),
        images_without_labels=sum(not row.labels for row, _ in kept),
        reencoded_images=sum(reencode for _, reencode in kept))
    return {split: self._generate_examples(source, split_rows, index)
            for split, split_rows in sorted(splits.items())}

  def _existing_images(self, source: Source) -> list[Row]:
    missing = [f"{source.labels_path}:{row.line}: {row.filename}" for row in source.rows
               if not os.path.isfile(os.path.join(source.images_root, row.filename))]
    if missing:
      raise FileNotFoundError(
          f"{len(missing)} image(s) named in the labels file are not in {source.images_root}:"
          f"\n  {_listed(missing)}\nFix the filenames or remove those rows.")
    return list(source.rows)

  def _decodable_images(self, source: Source, rows: list[Row]) -> list[tuple[Row, bool]]:
    """(row, needs re-encoding) of the images that decode; bad ones fail or are skipped."""
    paths = [os.path.join(source.images_root, row.filename) for row in rows]
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      checks = list(pool.map(check_image, paths))  # in order: deterministic
    bad = [f"{path} ({source.labels_path}:{row.line}): {error}"
           for row, path, (_, error) in zip(rows, paths, checks, strict=True) if error]
    if bad and self._options.on_bad_image == "fail":
      raise ValueError(f"{len(bad)} image(s) cannot be decoded:\n  {_listed(bad)}\nFix or "
                       "remove them, or prepare with on_bad_image='skip' to leave them out.")
    if bad:
      logging.warning("ctran_folder: skipped %d image(s) that cannot be decoded:\n  %s",
                      len(bad), _listed(bad))
    skipped = [row.filename for row, (_, error) in zip(rows, checks, strict=True) if error]
    self.info.metadata.update(skipped_images=len(skipped), skipped_files=skipped)
    return [(row, reencode) for row, (reencode, error) in zip(rows, checks, strict=True)
            if not error]

  def _generate_examples(self, source: Source, rows, index: dict[str, int]):
    for row, reencode in rows:
      path = os.path.join(source.images_root, row.filename)
      yield row.filename, {"image": _stored_bytes(path, reencode),
                           "labels": common.multi_hot((index[n] for n in row.labels), len(index)),
                           "image/filename": row.filename}
