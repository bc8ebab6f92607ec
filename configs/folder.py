"""Your own data: C-Tran on a folder of images + a labels file (the ``ctran_folder`` dataset).

1. Prepare once (see ctran_jax/data/folder.py for the labels-file format and options):

    python -m ctran_jax.data.prepare folder --manual_dir=MY_FOLDER --data_dir=DATA

2. Optional but strongly advised for a small dataset: ImageNet weights for the backbone
   (torchvision's resnet18-f37072fd.pth, downloaded by hand):

    python -m ctran_jax.convert resnet18-f37072fd.pth --out weights/r18 --backbone-only

3. Train and evaluate:

    python -m ctran_jax.main --config=configs/folder.py --workdir=runs/mine \\
        --config.data.data_dir=DATA --config.model.init_from=weights/r18

    python -m ctran_jax.main --config=configs/folder.py:tiny --workdir=/tmp/t \\
        --config.data.data_dir=DATA        # smoke test: 3 steps of a tiny model, seconds

Defaults suit a few hundred to a few tens of thousands of images: a ResNet-18 backbone
(512 channels, so the transformer runs at hidden 512 with no projection) at 224x224,
2 encoder layers, Adam 1e-4 with a cosine schedule, batch 32, 30 epochs, evaluation once
per epoch.  The overrides you will typically set:

  data.data_dir            the --data_dir you prepared into (required)
  data.eval_split, data.test_split   the split names: "validation"/"test" for the hash
                           split; your own names when the labels file has a split column;
                           "" skips one (e.g. no test split)
  data.image_size, data.scale_size, data.crop_sizes   input side S, the resize before the
                           crop (eval: resize to scale_size, centre crop S) and the train crop
                           sizes; keep crop_sizes <= scale_size, e.g. 448/512/(512, 448, 384)
  data.cache               True keeps decoded images in memory: fast, but only for small
                           images (it holds them at their stored size)
  model.init_from          converted ImageNet weights (step 2); without them use
                           optimizer.learning_rate=1e-3 and expect a much lower mAP
  model.backbone_depth     18/34 (hidden 512) or 50/101 (set model.hidden=2048, or keep 512
                           to add a 2048->512 projection)
  num_epochs or num_train_steps, batch_size (a multiple of the device count),
  optimizer.learning_rate, eval.batch_size.

CPU cost: train the full config on an accelerator (a ResNet-50 train step at batch 2 and
224^2 takes 1.6 s on 2 CPU cores); ``tiny`` runs anywhere.
"""

import ml_collections

from ctran_jax.config_util import load_sibling

default = load_sibling(__file__, "default")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/folder.py variant must be 'full' or 'tiny', got {variant!r}")
  c = default.get_config()
  c.data.name = "ctran_folder"      # one folder dataset per data_dir; set data.data_dir
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.test_split = "test"
  c.data.image_size = 224
  c.data.scale_size = 256
  c.data.crop_sizes = (256, 224, 192, 160)
  c.data.cache = False              # user images can be large; see the docstring

  c.model.backbone_depth = 18
  c.model.backbone_width = 64
  c.model.hidden = 512              # = ResNet-18's channels: no projection
  c.model.heads = 4
  c.model.layers = 2
  c.model.dropout = 0.1
  c.model.bn_mode = "train"

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4  # with init_from; 1e-3 from scratch
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 50
  c.batch_size = 32
  c.num_train_steps = 0
  c.num_epochs = 30.0
  c.log_every_steps = 20
  c.eval_every_steps = 0            # once per epoch
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2
  c.eval.batch_size = 64

  if variant == "tiny":             # seconds on a CPU; the tests use it
    c.data.image_size, c.data.scale_size, c.data.crop_sizes = 32, 36, (36, 32, 28)
    c.data.cache = True
    c.model.backbone_depth = 0      # the tiny basic ResNet of configs/default.py
    c.model.backbone_width = 8
    c.model.hidden = 32
    c.model.layers = 1
    c.schedule.name, c.schedule.warmup_steps = "constant", 0
    c.optimizer.learning_rate = 1e-3
    c.batch_size = 4
    c.mesh.num_devices = 1          # batch 4 need not divide the device count
    c.num_epochs = 0.0
    c.num_train_steps = 3
    c.log_every_steps = 1
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.eval.batch_size = 8
    c.eval.known_fractions = (0.0, 0.5)
  return c
