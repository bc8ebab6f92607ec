"""COCO-2014, 80 labels: the reference C-Tran recipe (Lanchantin et al., CVPR 2021).

    python -m ctran_jax.main --config=configs/coco.py --workdir=DIR \
        --config.model.init_from=resnet101_torchvision     # from `python -m ctran_jax.convert`
    python -m ctran_jax.main --config=configs/coco.py:tiny --workdir=DIR    # smoke test
    python -m ctran_jax.main --config=configs/coco.py:builtin --workdir=DIR \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets  # builtin TFDS coco/2014

Reference settings: ResNet-101 (ImageNet weights, BatchNorm in train mode), 576x576 inputs,
train transform resize 640 -> random crop 640/576/512/384/320 -> resize 576 -> flip, test
resize 640 -> centre crop 576, ImageNet normalisation; 3 encoder layers, 4 heads, hidden
2048, dropout 0.1; label-mask training with up to 75 % known labels and the BCE summed over
unknown entries; Adam lr 1e-5, no weight decay, batch 16, reduce-on-plateau (x0.1 after 5
evaluations without a lower validation loss), evaluation once per epoch; the paper reports
mAP 85.1 on val2014 (which the reference uses as validation and test set).

Needs the COCO-2014 TFDS dataset ``ctran_coco2014`` (ctran_jax/data/coco.py), prepared
once from the original zips with
``python -m ctran_jax.data.prepare ctran_coco2014 --manual_dir M --data_dir D``.
Expected cost: ~5.1k steps per epoch at batch 16; at the measured 3.5 s per batch-2 224^2
step on a 2-core CPU this recipe is for accelerators only.

The ``builtin`` variant is the same recipe on builtin TFDS ``coco/2014`` (splits ``train`` =
train2014 and ``validation`` = val2014; no separate test split), read through the adapter
in ctran_jax/data/coco.py, which gives the same 80 labels in the same order (crowd objects
positive, images without objects kept with all-zero labels).  It needs a prepared copy of
``coco/2014`` in ``data.data_dir`` (e.g. a bucket holding one); building it locally
downloads all four splits (~40 GB of archives).

The ``tiny`` variant keeps every recipe switch but uses a tiny backbone and 64^2 inputs on
the demo dataset, so the recipe's code paths run in CI.

The ``modern`` variant is the modern multi-label recipe with C-Tran's label-mask training
(`default.modernise`): ASL (gamma- 4, gamma+ 0, clip 0.05), EMA 0.9997, RandAugment 2/9 +
Cutout 0.5, one-cycle AdamW (peak lr 1e-4, weight decay 1e-4 on kernels), bfloat16, 576^2,
LMT with 75 % of the examples shown no label and the loss on all labels; batch 64, 40 epochs
(our choice). Expected result: unmeasured (for scale: Query2Label reports 86.5 mAP with
ResNet-101 at 576^2, without LMT; C-Tran 85.1).
"""

import ml_collections

from ctran_jax.config_util import load_sibling

default = load_sibling(__file__, "default")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny", "builtin", "modern"):
    raise ValueError(f"configs/coco.py variant must be 'full', 'tiny', 'builtin' or 'modern', "
                     f"got {variant!r}")
  c = default.get_config()
  c.data.name = "ctran_coco2014"
  c.data.train_split = "train2014"
  c.data.eval_split = "val2014"
  c.data.test_split = ""            # val2014 is the reference's validation and test set
  c.data.image_size = 576
  c.data.scale_size = 640
  c.data.crop_sizes = (640, 576, 512, 384, 320)
  c.data.cache = False
  c.data.resize_on_device = True    # host only decodes (input benchmark: 70-80 % vs ~33 %)

  c.model.backbone_depth = 101
  c.model.backbone_width = 64
  c.model.hidden = 2048
  c.model.heads = 4
  c.model.layers = 3
  c.model.dropout = 0.1
  c.model.bn_mode = "train"

  c.lmt.all_unknown_fraction = 0.0  # the reference's mask law and loss (the demo's default
  c.loss.labels = "unknown"         # differs: docs/benchmarks.md, "What LMT costs")
  c.loss.reduction = "sum"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-5
  c.schedule.name = "plateau"
  c.schedule.warmup_steps = 0
  c.batch_size = 16
  c.num_train_steps = 0
  c.num_epochs = 100.0
  c.eval_every_steps = 0            # once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval.batch_size = 64

  if variant == "modern":
    default.modernise(c, learning_rate=1e-4)
    c.model.dtype = "bfloat16"
    c.data.resize_on_device = False  # RandAugment runs on the host's decoded crop
    c.batch_size = 64
    c.num_epochs = 40.0

  if variant == "builtin":
    c.data.name = "coco/2014"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.test_split = ""

  if variant == "tiny":
    c.data = default.get_config().data
    c.data.resize_on_device = True  # the recipe's input path, on the demo data
    c.model.backbone_depth = 0
    c.model.backbone_width = 8
    c.model.hidden = 64
    c.num_epochs = 0.0
    c.num_train_steps = 20
    c.eval_every_steps = 10
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
  return c
