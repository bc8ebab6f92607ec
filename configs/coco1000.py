"""COCO-1000, 1000 caption-word labels: the COCO recipe with C-Tran's partial-label evaluation.

    python -m ctran_jax.data.prepare coco1000 --manual_dir=M --data_dir=D      # once
    python -m ctran_jax.main --config=configs/coco1000.py --workdir=DIR \
        --config.data.data_dir=D --config.model.init_from=resnet101_torchvision
    python -m ctran_jax.main --config=configs/coco1000.py:tiny --workdir=DIR    # smoke test

Settings: those of configs/coco.py (ResNet-101, 576x576, resize 640 -> random crops -> 576,
3 layers, 4 heads, hidden 2048, dropout 0.1, BCE summed over unknown entries, Adam 1e-5,
batch 16, reduce-on-plateau, one evaluation per epoch, val2014 as validation and test set)
on ``ctran_coco1000`` (ctran_jax/data/coco1000.py: the labels are the 1000 most frequent
non-stop words of the train2014 captions, counted once per image, ties alphabetical).

Partial labels, as in the paper: label-mask training on (up to 75 % of the labels known
during training) and evaluation with 0, 25, 50 and 75 % of each image's labels given as
known (``eval.known_fractions``; mAP over the unknown labels at each).

Expected result: unmeasured (no COCO copy or accelerator time here).  The paper's
COCO-1000 numbers are not quoted here (not checked against the paper in this work); the
vocabulary is this project's documented rule, not the reference's label list, so any
comparison with published COCO-1000 numbers is approximate.  Expected cost: as
configs/coco.py (~5.1k steps per epoch at batch 16; accelerators only), with 1000 label
tokens instead of 80 in the transformer.

The ``tiny`` variant keeps every recipe switch with a tiny backbone and 64^2 inputs on the
demo dataset, so the recipe's code paths run in CI.
"""

import ml_collections

from ctran_jax.config_util import load_sibling

coco = load_sibling(__file__, "coco")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/coco1000.py variant must be 'full' or 'tiny', got {variant!r}")
  c = coco.get_config(variant)
  c.model.use_lmt = True
  c.lmt.max_known_fraction = 0.75
  c.eval.known_fractions = (0.0, 0.25, 0.5, 0.75)
  if variant == "full":
    c.data.name = "ctran_coco1000"
  return c
