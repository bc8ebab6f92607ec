"""CUB-200-2011 as CUB-312 (112 concepts + 200 classes): the reference C-Tran CUB recipe.

    python -m ctran_jax.data.prepare cub --manual_dir=DIR_WITH_CUB_200_2011.tgz --data_dir=D
    python -m ctran_jax.main --config=configs/cub.py --workdir=W --config.data.data_dir=D \
        --config.model.init_from=inception_v3_torchvision   # from `python -m ctran_jax.convert`

Reference settings: Inception-v3 (ImageNet weights) Mixed_7c feature map -> 64 image tokens
at 299x299; 312 label tokens; 3 encoder layers, 4 heads, hidden 2048, dropout 0.1; train
transform colour jitter (brightness 32/255, saturation 0.5-1.5) -> random-resized crop 299
-> flip, test centre crop 299 (no resize), normalisation mean 0.5 / std 2; label-mask
training over the 112 concepts only (0..84 known), the 200 class labels always unknown;
BCE averaged over unknown entries (also on the one-hot class part); Adam, reference
defaults lr 2e-4 and batch 32 (it gives no CUB command), reduce-on-plateau; model selection
by class accuracy. Evaluation: regular inference, then "extra labels": the concepts of 0 /
10 / 15 / 20 of the 28 concept groups given as known (~0/36/54/71 % of the concepts, minus
those not visible in the image). The paper reports class accuracy 83.8 / 90.0 / 97.0 / 98.0.

The ``tiny`` variant keeps the recipe's switches (CUB transforms, concept-only label
masking, extra-label evaluation) with a tiny ResNet at 64^2, for tests on a fixture.
"""

import ml_collections

from ctran_jax.config_util import load_sibling

default = load_sibling(__file__, "default")

NUM_CONCEPTS = 112


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/cub.py variant must be 'full' or 'tiny', got {variant!r}")
  c = default.get_config()
  c.data.name = "ctran_cub"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.test_split = "test"
  c.data.transform = "cub"
  c.data.image_size = 299
  c.data.scale_size = 299           # unused by the CUB transforms
  c.data.crop_sizes = (299,)
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (2.0, 2.0, 2.0)
  c.data.cache = False

  c.model.backbone = "inception_v3"
  c.model.hidden = 2048
  c.model.heads = 4
  c.model.layers = 3
  c.model.dropout = 0.1
  c.model.bn_mode = "train"

  c.lmt.num_maskable = NUM_CONCEPTS
  c.lmt.max_known_fraction = 0.75
  c.lmt.all_unknown_fraction = 0.0  # the reference's mask law and loss (the demo's default
  c.loss.labels = "unknown"         # differs: docs/benchmarks.md, "What LMT costs")
  c.loss.reduction = "mean"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-4
  c.schedule.name = "plateau"
  c.schedule.warmup_steps = 0
  c.batch_size = 32
  c.num_train_steps = 0
  c.num_epochs = 100.0
  c.eval_every_steps = 0            # once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval.batch_size = 64
  c.eval.known_fractions = (0.0,)
  c.eval.known_groups = (0, 10, 15, 20)
  c.eval.selection_metric = "class_acc"

  if variant == "tiny":             # the 4-class `ctran_cub/tiny` fixture of the tests
    c.data.name = "ctran_cub/tiny"
    c.lmt.num_maskable = 4
    c.eval.known_groups = (0, 1, 2)
    c.model.backbone = "resnet"
    c.model.backbone_depth = 0
    c.model.backbone_width = 8
    c.model.hidden = 64
    c.model.layers = 1
    c.data.image_size = 64
    c.data.scale_size = 64
    c.data.crop_sizes = (64,)
    c.batch_size = 8
    c.eval.batch_size = 8
    c.num_epochs = 0.0
    c.num_train_steps = 6
    c.eval_every_steps = 3
    c.log_every_steps = 3
    c.checkpoint_every_steps = 6
  return c
