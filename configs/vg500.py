"""Visual Genome VG-500, 500 labels: the reference C-Tran recipe on ``ctran_vg500``.

    python -m ctran_jax.data.prepare ctran_vg500 --manual_dir=M --data_dir=D   # once
    python -m ctran_jax.main --config=configs/vg500.py --workdir=DIR \
        --config.data.data_dir=D --config.model.init_from=resnet101_torchvision
    python -m ctran_jax.main --config=configs/vg500.py:tiny --workdir=DIR    # smoke test

Settings: those of configs/coco.py (ResNet-101, 576x576, resize 640 -> random crops ->
576, 3 layers, 4 heads, hidden 2048, dropout 0.1, BCE summed over unknown entries, Adam
1e-5, batch 16, reduce-on-plateau, one evaluation per epoch).  The reference gives no VG
command; this is its common recipe.  Data: ``ctran_vg500`` (ctran_jax/data/vg.py: labels
are the 500 most frequent normalised object names, images without any are dropped, ~9 % of
the images are ``test`` by a hash of the image id); evaluation and model selection on test,
which has no separate validation split here (``test_split=""``), as for COCO.

Label-mask training: ON (up to 75 % known labels), as the paper describes C-Tran's training
for every dataset and as its VG-500 partial-label results require (a model that never saw a
known label during training cannot use one at test time).  The reference *code* instead
trains VG with no known labels (``known_labels=0`` for the VG train set, ``load_data.py:107``)
while keeping the state embeddings; to reproduce that, run with
``--config.lmt.max_known_fraction=0.0``.  The labels are not the reference's own list (its
label files are no longer available), so numbers are comparable to the paper only roughly.
Expected cost: ~98k training images, ~6.1k steps per epoch at batch 16: accelerators only.
The ``tiny`` variant keeps every recipe switch with a tiny backbone and 64^2 inputs on the
demo dataset, so the recipe's code paths run in CI.
"""

import ml_collections

from ctran_jax.config_util import load_sibling

coco = load_sibling(__file__, "coco")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/vg500.py variant must be 'full' or 'tiny', got {variant!r}")
  c = coco.get_config(variant)
  c.model.use_lmt = True
  c.lmt.max_known_fraction = 0.75   # paper; 0.0 reproduces the reference code (see above)
  if variant == "full":
    c.data.name = "ctran_vg500"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.test_split = ""          # test is also the validation set
  return c
