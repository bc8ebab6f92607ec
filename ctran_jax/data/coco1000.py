"""``ctran_coco1000``: COCO-2014 labelled with the 1000 most frequent caption words (COCO-1000).

The partial-label setting C-Tran (Lanchantin et al., CVPR 2021) takes from Wang et al.'s
Feedback-prop: each image's labels are the frequent words of its five-odd human captions.

Source files: the same as ``ctran_coco2014`` (ctran_jax/data/coco.py), from ``manual_dir``
(each archive may instead be present extracted): ``train2014.zip`` (or ``train2014/``),
``val2014.zip`` (or ``val2014/``) and ``annotations_trainval2014.zip`` (or
``annotations/captions_{train,val}2014.json``); the captions are read instead of the
instances.  Images are stored as their original JPEG bytes, as in ``ctran_coco2014``.

Words (`caption_words`), applied to each caption:

1. lower-case (``str.lower``); a caption with non-ASCII characters is also NFKD-normalised
   and its combining marks removed, so "Café" -> "cafe";
2. tokens are the maximal runs of the letters ``a``-``z``: every other character (digits,
   spaces, punctuation, apostrophes, hyphens, remaining non-ASCII) separates words, so
   "man's" -> "man" "s", "t-shirt" -> "t" "shirt", "2 dogs" -> "dogs";
3. one-letter tokens are dropped ("a", "i", the "s" of "man's");
4. stop words are dropped: exactly the words of `STOP_WORDS` below (articles, pronouns,
   prepositions, conjunctions, auxiliary verbs, a few adverbs and quantifiers, and
   contraction pieces such as "don", "isn", "ll"), written out here (no NLTK download).
   "can" is deliberately not a stop word ("trash can"), nor are numbers ("two"), colours,
   "next", "top" or "front";
5. no stemming or plural merging: "dog" and "dogs" are different words.

Vocabulary: a word's count is the number of **train2014** images with the word in at least
one of their captions (an image whose five captions all say "dog" counts once).  Words are
ranked by count, descending, then **alphabetically** (Python string order, which is
alphabetical for a-z words): the labels are the first ``num_labels`` (1000) of that ranking,
in that order, so label 0 is the most frequent word, and of words tied at the cut-off the
alphabetically first ones are kept.  val2014 captions never change the vocabulary.
``info.metadata``: ``label_names`` (the words, label order), ``label_counts`` (their train
image counts), ``num_words`` (distinct words left in the train captions after steps 1-4),
``unlabelled_images`` (per split: images with none of the words, including images without
captions).

Labels: an image's ``labels`` (L,) uint8 has a 1 for each vocabulary word that appears in
any of its captions (train and val alike).  Every image listed in a split's captions file
is kept, those without a label (or without captions) with all-zero labels, as in
``ctran_coco2014``; their number per split is in ``unlabelled_images`` (not measured: no
COCO copy on this machine).  The vocabulary is not the reference's own list (Feedback-prop /
C-Tran's label files are not used here), so numbers compare to the paper only roughly.

Splits: ``train2014`` (82,783 images) and ``val2014`` (40,504), named as in
``ctran_coco2014`` so configs share settings; the reference uses val2014 as validation and
test set.  Examples are keyed by image id, identical files give identical datasets.

Configs: ``default`` (1000 labels) and ``tiny`` (5 labels, for the test fixture).

Cost of the words: on a synthetic train-sized captions file (82,783 images x 5 captions of
10 words, 42 MB) parsing and tokenising took 7 s and ranking 0.8 s on a shared 2-core CPU;
reading the ~19 GB of JPEGs dominates a real build (not timed: no COCO copy here).

Prepare:

    python -m ctran_jax.data.prepare coco1000 --manual_dir M --data_dir D
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ctran_jax.data import coco, common
from ctran_jax.data import files as files_lib

SPLITS = coco.SPLITS
VOCABULARY_SPLIT = "train2014"

# The stop words, sorted.  Single letters are dropped by the length rule, not listed here.
STOP_WORDS = frozenset("""
about above across after again against all along also although am among an and another any
are aren around as at be because been before behind being below beneath beside besides
between beyond both but by could couldn did didn do does doesn doing don down during each
either even ever few for from further had hadn has hasn have haven having he her here hers
herself him himself his how however if in inside into is isn it its itself just ll many may
me might more most much must mustn my myself near needn neither no nor not now of off on
once only onto or other others our ours ourselves out outside over own past per re same
several shall shan she should shouldn since so some still such than that the their theirs
them themselves then there these they this those though through throughout thus till to too
toward towards under underneath unless until up upon us ve very via was wasn we were weren
what when where whether which while who whom whose why will with within without won would
wouldn yet you your yours yourself yourselves
""".split())

_WORD = re.compile("[a-z]+")


def _captions_member(split: str) -> str:
  return f"annotations/captions_{split}.json"


def caption_words(caption: str) -> list[str]:
  """The words of one caption, in order, by the rules of the module docstring."""
  text = caption.lower()
  if not text.isascii():
    text = "".join(c for c in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(c))
  return [w for w in _WORD.findall(text) if len(w) > 1 and w not in STOP_WORDS]


def rank_words(image_words: Iterable[frozenset[str]]) -> list[tuple[str, int]]:
  """(word, number of images whose captions have it), count descending, ties alphabetical."""
  counts = collections.Counter(w for words in image_words for w in words)
  return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


# ------------------------------------------------------------------------------ captions


class _Caption(tuple):
  """(annotation id, image id, caption text)."""
  __slots__ = ()


def _caption_hook(obj: dict):
  if "image_id" in obj and "caption" in obj:
    return _Caption((obj.get("id"), obj["image_id"], obj["caption"]))
  return obj


def parse_captions(data: bytes, source: str) -> list[tuple[int, str, frozenset[str]]]:
  """A ``captions_*.json`` → ``[(image id, file name, words of all its captions)]`` by id.

  Images without captions get no words.  ``source`` names the file in error messages.
  """
  doc = coco.load_json(data, source, object_hook=_caption_hook)
  if not isinstance(doc, dict) or not {"images", "annotations"} <= set(doc):
    raise ValueError(f"{source}: expected a COCO captions file with 'images' and "
                     "'annotations'")
  names = coco.image_names(doc["images"], source)
  words: dict[int, set[str]] = {image_id: set() for image_id in names}
  for ann in doc["annotations"]:
    if not isinstance(ann, _Caption):
      raise ValueError(f"{source}: annotation without 'image_id' and 'caption': "
                       f"{ann!r:.200}; is this a captions_*2014.json file?")
    ann_id, image_id, caption = ann
    if image_id not in words:
      raise ValueError(f"{source}: caption {ann_id} refers to image id {image_id!r}, "
                       "which is not in the file's 'images'")
    if not isinstance(caption, str):
      raise ValueError(f"{source}: caption {ann_id} is not a string: {caption!r:.100}")
    words[image_id].update(caption_words(caption))
  return [(image_id, names[image_id], frozenset(words[image_id]))
          for image_id in sorted(names)]


# ------------------------------------------------------------------------------ builder


@dataclasses.dataclass
class CtranCoco1000Config(tfds.core.BuilderConfig):
  """The number of labels: the most frequent train2014 caption words."""

  num_labels: int = 1000


class CtranCoco1000(tfds.core.GeneratorBasedBuilder):
  """COCO-2014 train/val images with multi-hot labels over frequent caption words."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
      CtranCoco1000Config(name="default", description="COCO-1000: the 1000 most frequent "
                          "words of the train2014 captions."),
      CtranCoco1000Config(name="tiny", description="Test-sized: the 5 most frequent words.",
                          num_labels=5),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the original COCO-2014 files in manual_dir (zips, or their extracted folders):
    train2014.zip                 {coco.URLS["train2014"]}
    val2014.zip                   {coco.URLS["val2014"]}
    {coco.ANNOTATIONS_ZIP}  {coco.URLS[coco.ANNOTATIONS_ZIP]}
  Extracted instead: train2014/, val2014/, annotations/captions_train2014.json and
  annotations/captions_val2014.json.
  """

  @classmethod
  def missing_manual_files(cls, manual_dir: str) -> list[str]:
    """One line per required file that ``manual_dir`` lacks; [] when all are there."""
    return coco.missing_files(manual_dir, [_captions_member(split) for split in SPLITS])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=common.features(self.builder_config.num_labels, **{
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "image/filename": tfds.features.Text(),
        }),
        homepage="https://cocodataset.org",
        # Filled in by _split_generators: the words depend on the captions.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(common.manual_dir(self, dl_manager))
    num_labels = self.builder_config.num_labels
    # Parse (and check) both captions files before writing anything.
    with coco.annotation_files(manual_dir) as annotations:
      captions = {split: parse_captions(*coco.read_annotation_file(
                      annotations, _captions_member(split))) for split in SPLITS}
    ranked = rank_words(words for _, _, words in captions[VOCABULARY_SPLIT])
    if len(ranked) < num_labels:
      raise ValueError(f"{_captions_member(VOCABULARY_SPLIT)} has {len(ranked)} distinct "
                       f"words, fewer than the {num_labels} labels of config "
                       f"{self.builder_config.name!r}")
    label_names = [word for word, _ in ranked[:num_labels]]
    index = {word: i for i, word in enumerate(label_names)}
    records = {split: [(image_id, file_name,
                        common.multi_hot(sorted(index[w] for w in words if w in index),
                                         num_labels))
                       for image_id, file_name, words in captions[split]]
               for split in SPLITS}
    self.info.metadata.update(
        label_names=label_names, label_counts=[count for _, count in ranked[:num_labels]],
        num_words=len(ranked), vocabulary_split=VOCABULARY_SPLIT,
        unlabelled_images={split: int(sum(not labels.any() for _, _, labels in records[split]))
                           for split in SPLITS})
    return {split: self._generate_examples(coco.image_files(manual_dir, split), records[split])
            for split in SPLITS}

  def _generate_examples(self, images: files_lib.Files, records) -> Iterator[tuple[int, dict]]:
    return coco.generate_examples(images, records)
