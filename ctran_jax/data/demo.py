"""``ctran_demo``: a generated multi-label image dataset whose labels co-occur by design.

C-Tran's point is that known labels help predict the unknown ones, so the demo needs labels
that are (a) visually learnable by a tiny CNN on a CPU in minutes and (b) strongly
correlated with each other.  Nothing is downloaded: every image is drawn with numpy from a
seed, so two builds hold identical examples and the dataset is a pure function of its config.

Generative process, per example (its own ``np.random.Generator`` seeded from
``(seed, split, index)``, so an example never depends on the ones before it):

1. Background: a linear gradient between two muted random colours at a random angle, 0-3
   thin (about 1 px) strokes in muted colours, and (at the end) Gaussian pixel noise.
2. Objects: ``n ~ uniform{1..5}`` instances.  A theme ``t ~ uniform(THEMES)`` is drawn;
   each instance is a category of theme ``t`` with probability ``THEME_PROBABILITY`` and a
   uniformly drawn category of another theme (a distractor) otherwise.  Repeats are
   allowed, so an image has 1-5 distinct labels.
3. Each instance gets a random half-size (12-18 px at 64x64), a centre (the best of a few
   random draws at keeping centres apart, so occlusion stays partial), a small rotation and
   a saturated random colour.  Colour says nothing about the category; the silhouette
   (9 shapes) or the two-tone pattern filling a square or disc patch (7 textures) does.
4. Instances are painted in order with hard masks computed on the pixel-coordinate grid; an
   instance that later ones leave less than ``MIN_VISIBLE`` visible is removed and the
   image repainted, so every label is actually visible (hence fewer 5-object images).
5. ``labels`` is the multi-hot set of the categories painted; ``num_objects`` counts the
   painted instances and ``theme`` is the theme drawn in step 2.

Calibration (a training probe on 2 CPU cores): C-Tran on a 16-wide, one-block-per-stage
basic ResNet (hidden 64, 2 layers) with label-mask training, batch 64, Adam 3e-3, 100
warmup steps and a cosine decay reaches test mAP ~0.88 after 1200 steps and 0.90-0.93
after 1500.  Textures are learnt first, silhouettes later; with half the labels
known, mAP on the other half is 0.01-0.04 higher.  Stars, crescents and chevrons (and 20
categories) were tried and dropped: too slow to learn for a minutes-long demo.

``info.metadata`` holds ``label_names`` (category names, label order) and ``themes``
(lists of label indices), so pipelines and tests need no import of this module's constants.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import tensorflow_datasets as tfds

from ctran_jax import console
from ctran_jax.data import common

# Four themes of four categories (9 shapes, 7 textures); within a theme the categories look
# unrelated on purpose, so co-occurrence is something to learn, not a visual shortcut.
THEMES = (
    ("disc", "triangle", "stripes", "target"),
    ("ring", "diamond", "checker", "t_shape"),
    ("square", "saltire", "dots", "bands"),
    ("frame", "plus", "grid", "zigzag"),
)
LABEL_NAMES = tuple(sorted(name for theme in THEMES for name in theme))
THEME_PROBABILITY = 0.85  # chance that an instance comes from the image's theme
MAX_OBJECTS = 5
MIN_VISIBLE = 0.45  # fraction of an instance's pixels that must stay unoccluded
TEXTURES = ("stripes", "bands", "zigzag", "checker", "dots", "grid", "target")


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of a shape in unit local coordinates (|u|, |v| <= 1 is its box; v down)."""
  au, av = np.abs(u), np.abs(v)
  rho = np.hypot(u, v)
  if name == "disc":
    return rho <= 1.0
  if name == "ring":
    return (rho <= 1.0) & (rho >= 0.55)
  if name == "square":
    return np.maximum(au, av) <= 0.85
  if name == "frame":
    return (np.maximum(au, av) <= 0.9) & (np.maximum(au, av) >= 0.55)
  if name == "triangle":  # apex up
    return (v <= 0.75) & (au <= (v + 1.0) * 0.6)
  if name == "diamond":
    return au + av <= 1.0
  if name == "plus":
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
  if name == "saltire":
    a, b = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)
    return ((a <= 0.27) | (b <= 0.27)) & (np.maximum(au, av) <= 0.9)
  if name == "t_shape":
    return (av <= 0.95) & (((v <= -0.4) & (au <= 0.95)) | (au <= 0.3))
  raise ValueError(f"unknown shape {name!r}")


def _texture(name: str, y: np.ndarray, x: np.ndarray, centre, rng: np.random.Generator
             ) -> np.ndarray:
  """Boolean "ink" pattern of a texture on pixel coordinates (periods of 5-7 px)."""
  period = rng.uniform(5.0, 7.0)
  y0, x0 = rng.uniform(0, period, size=2)
  if rng.random() < 0.5 and name in ("bands", "zigzag"):  # horizontal or vertical
    y, x = x, y
  if name == "stripes":  # diagonal, either direction
    t = (x + y) if rng.random() < 0.5 else (x - y)
    return np.mod(t / np.sqrt(2) - x0, period) < period / 2
  if name == "bands":
    return np.mod(y - y0, period) < period / 2
  if name == "zigzag":
    return np.mod(y + np.abs(np.mod(x / period, 1.0) - 0.5) * period - y0, period) < period / 2
  if name == "checker":
    cell = period / 2 + 0.5
    return (np.floor((x - x0) / cell) + np.floor((y - y0) / cell)) % 2 == 0
  if name == "dots":
    dy, dx = np.mod(y - y0, period) - period / 2, np.mod(x - x0, period) - period / 2
    return np.hypot(dy, dx) <= period * 0.28
  if name == "grid":
    return (np.mod(y - y0, period) < 1.6) | (np.mod(x - x0, period) < 1.6)
  if name == "target":  # concentric rings around the patch centre
    return np.mod(np.hypot(y - centre[0], x - centre[1]), period) < period / 2
  raise ValueError(f"unknown texture {name!r}")


def _hsv_to_rgb(h, s, v) -> np.ndarray:
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _object_colour(rng: np.random.Generator) -> np.ndarray:
  return 255 * _hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))


def _background(rng: np.random.Generator, size: int, y, x) -> np.ndarray:
  """Muted gradient + thin random strokes; noise is added after the objects."""
  c0, c1 = (255 * _hsv_to_rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.15, 0.6))
            for _ in range(2))
  angle = rng.uniform(0, 2 * np.pi)
  t = ((x * np.cos(angle) + y * np.sin(angle)) / size + 1) / 2
  image = c0 + (c1 - c0) * t[..., None]
  for _ in range(rng.integers(0, 4)):
    (ya, xa), (yb, xb) = rng.uniform(0, size, size=(2, 2))
    dy, dx = yb - ya, xb - xa
    length2 = dy * dy + dx * dx + 1e-6
    s = np.clip(((y - ya) * dy + (x - xa) * dx) / length2, 0, 1)
    dist = np.hypot(y - ya - s * dy, x - xa - s * dx)
    colour = 255 * _hsv_to_rgb(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.1, 0.8))
    image[dist <= rng.uniform(0.4, 0.7)] = colour
  return image


def _place(rng: np.random.Generator, sizes: np.ndarray, image_size: int) -> np.ndarray:
  """Centres (n, 2) inside the image, kept apart where possible (best of a few tries)."""
  best, best_score = None, -np.inf
  for _ in range(30):
    centres = np.stack([rng.uniform(r, image_size - r, size=2) for r in sizes])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    gaps = gaps / (0.75 * (sizes[:, None] + sizes[None]))
    score = np.min(gaps + np.eye(len(sizes)) * 1e9)
    if score > best_score:
      best, best_score = centres, score
    if score >= 1.0:
      break
  return best


def render_example(rng: np.random.Generator, image_size: int = 64) -> dict:
  """One example: image (uint8 HWC), multi-hot labels, num_objects and theme."""
  label_index = {name: i for i, name in enumerate(LABEL_NAMES)}
  y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
  theme = int(rng.integers(len(THEMES)))
  others = [name for i, t in enumerate(THEMES) if i != theme for name in t]
  num = int(rng.integers(1, MAX_OBJECTS + 1))
  names = [THEMES[theme][rng.integers(4)] if rng.random() < THEME_PROBABILITY
           else others[rng.integers(len(others))] for _ in range(num)]
  scale = image_size / 64
  sizes = rng.uniform(12.0, 18.0, size=num) * scale  # half-size in pixels
  centres = _place(rng, sizes, image_size)
  background = _background(rng, image_size, y, x)
  masks, colours = [], []
  for name, r, (cy, cx) in zip(names, sizes, centres, strict=True):
    theta = rng.uniform(-0.15, 0.15)
    cos, sin = np.cos(theta), np.sin(theta)
    u = ((x - cx) * cos + (y - cy) * sin) / r
    v = (-(x - cx) * sin + (y - cy) * cos) / r
    colour = _object_colour(rng)
    if name in TEXTURES:
      outline = "square" if rng.random() < 0.5 else "disc"
      mask = _shape_mask(outline, u, v)
      ink = _texture(name, y, x, (cy, cx), rng)
      dark = colour * rng.uniform(0.0, 0.35)
      colour = np.where(ink[..., None], colour, dark)
    else:
      mask = _shape_mask(name, u, v)
    masks.append(mask)
    colours.append(colour)
  # Drop instances that later ones hide too much, then repaint (their pixels then show
  # whatever lies underneath, which is background or an earlier instance).
  keep = list(range(num))
  while True:
    covered = np.zeros((image_size, image_size), bool)
    visible = {}
    for i in reversed(keep):
      area = max(int(masks[i].sum()), 1)
      visible[i] = (masks[i] & ~covered).sum() / area
      covered |= masks[i]
    hidden = [i for i in keep if visible[i] < MIN_VISIBLE]
    if not hidden:
      break
    keep.remove(min(hidden, key=lambda i: visible[i]))
  image = background
  for i in keep:
    image = np.where(masks[i][..., None], colours[i], image)
  labels = common.multi_hot((label_index[names[i]] for i in keep), len(LABEL_NAMES))
  image = image + rng.normal(0, 8.0, size=image.shape)
  return {"image": np.clip(np.rint(image), 0, 255).astype(np.uint8), "labels": labels,
          "num_objects": np.int32(len(keep)), "theme": np.int32(theme)}


@dataclasses.dataclass
class CtranDemoConfig(tfds.core.BuilderConfig):
  """Split sizes, image side and seed of one variant of the demo."""

  num_train: int = 5000
  num_validation: int = 500
  num_test: int = 1000
  image_size: int = 64
  seed: int = 0


class CtranDemo(tfds.core.GeneratorBasedBuilder):
  """Generated multi-label shapes and textures with themed label co-occurrence."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
      CtranDemoConfig(name="default", description="5000/500/1000 images of 64x64."),
      CtranDemoConfig(name="tiny", description="Test-sized: 240/60/100 images of 64x64.",
                      num_train=240, num_validation=60, num_test=100),
  ]
  # Marks builders that ctran_jax.data prepares on demand (nothing to download).
  GENERATED = True

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=common.features(
            len(LABEL_NAMES), image=tfds.features.Image(shape=(size, size, 3), dtype=np.uint8),
            num_objects=tfds.features.Scalar(dtype=np.int32),
            theme=tfds.features.Scalar(dtype=np.int32)),
        metadata=tfds.core.MetadataDict(
            label_names=list(LABEL_NAMES),
            themes=[[LABEL_NAMES.index(n) for n in theme] for theme in THEMES]),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    name = self.name if c.name == "default" else f"{self.name}/{c.name}"
    progress = console.ProgressBar(
        c.num_train + c.num_validation + c.num_test,
        f"generating {name} ({c.num_train}/{c.num_validation}/{c.num_test} images)")
    return {"train": self._generate_examples("train", c.num_train, progress),
            "validation": self._generate_examples("validation", c.num_validation, progress),
            "test": self._generate_examples("test", c.num_test, progress)}

  def _generate_examples(self, split: str, count: int, progress=None):
    c = self.builder_config
    split_seed = zlib.crc32(split.encode())
    for index in range(count):
      rng = np.random.default_rng([c.seed, split_seed, index])
      yield index, render_example(rng, c.image_size)
      if progress is not None:
        progress.update()
        if progress.done == progress.total:
          progress.close()


def write_images(out: str, *, split: str = "test", count: int = 4, config: str = "default"
                 ) -> list[tuple[str, list[str]]]:
  """Render the first `count` examples of a split as PNG files (the same pixels the dataset
  holds); returns (path, label names) per image. For trying `ctran_jax.predict`
  (command line: ``python -m ctran_jax.data.demo_images``)."""
  import os

  from PIL import Image

  c = next(b for b in CtranDemo.BUILDER_CONFIGS if b.name == config)
  os.makedirs(out, exist_ok=True)
  written = []
  for index in range(count):
    rng = np.random.default_rng([c.seed, zlib.crc32(split.encode()), index])
    example = render_example(rng, c.image_size)
    path = os.path.join(out, f"{split}_{index:04d}.png")
    Image.fromarray(example["image"]).save(path)
    written.append((path, [LABEL_NAMES[i] for i in np.flatnonzero(example["labels"])]))
  return written

