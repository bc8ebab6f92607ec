"""Demo: a tiny C-Tran on the generated ``ctran_demo`` dataset, end to end on a laptop CPU.

    python -m ctran_jax.main --config=configs/default.py --workdir=/tmp/ctran_demo

No download: the first run generates the dataset (~15 s) into the TFDS data_dir. Expected on
a 2-core CPU: under 5 minutes in all (1500 steps at ~10 steps/s), test mAP ~0.96 with no
label known and ~0.96 on the unknown labels when half the labels are given (3 seeds in
docs/benchmarks.md, "What label-mask training costs").

The ``modern`` variant (``--config=configs/default.py:modern``) switches on the modern
multi-label recipe (`modernise`: ASL, EMA, RandAugment + Cutout, one-cycle AdamW) on the same
demo, model and step budget; docs/benchmarks.md compares the two.

Every other config starts from this one and overrides what differs; `check_config` in
ctran_jax/train.py lists the accepted values.
"""

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "modern"):
    raise ValueError(f"configs/default.py variant must be '' or 'modern', got {variant!r}")
  c = _demo()
  if variant == "modern":
    modernise(c, learning_rate=c.optimizer.learning_rate)
  return c


def modernise(c: ml_collections.ConfigDict, learning_rate: float) -> None:
  """The modern multi-label recipe (ASL, Query2Label, ML-Decoder) on top of a config, with
  C-Tran's label-mask training kept (in the mixture form that costs nothing at 0 % known).

  The learning rate is the one-cycle peak: the configs pass their own (1e-4 for an ImageNet
  backbone as in ASL/Q2L; the demo, which trains from scratch, keeps its 3e-3).
  """
  c.loss.name = "asl"
  c.loss.gamma_neg, c.loss.gamma_pos, c.loss.clip = 4.0, 0.0, 0.05
  c.loss.reduction = "mean"
  c.lmt.all_unknown_fraction = 0.75
  c.loss.labels = "all"
  c.ema.decay = 0.9997
  c.data.randaugment_n, c.data.randaugment_m = 2, 9.0
  c.data.cutout = 0.5
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = learning_rate
  c.optimizer.weight_decay = 1e-4
  c.optimizer.decay_mask = "kernels"
  c.schedule.name = "onecycle"
  c.schedule.warmup_steps = 0       # one-cycle has its own rise (pct_start)


def _demo() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "ctran_demo"        # a TFDS dataset name
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/tensorflow_datasets
  c.data.prepare = False            # also build non-generated datasets on first use
  c.data.train_split = "train"
  c.data.eval_split = "validation"  # periodic evaluation, model selection, plateau schedule
  c.data.test_split = "test"        # evaluated at the end with eval_split
  c.data.image_size = 64            # model input side
  c.data.scale_size = 72            # train: resize, random crop, resize; test: resize, centre crop
  c.data.crop_sizes = (72, 64, 56)
  c.data.flip = True
  c.data.randaugment_n = 0          # RandAugment: ops per train image (0: off, reference)
  c.data.randaugment_m = 9.0        # its magnitude, 0..10 (0: every op is the identity)
  c.data.cutout = 0.0               # Cutout: probability of erasing one square (0: off)
  c.data.cutout_size = 0.5          # its side, a fraction of image_size; filled with `mean`
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.shuffle_buffer = 4096
  c.data.prefetch = 2
  c.data.cache = True               # keep decoded examples in memory (small datasets only)
  c.data.transform = "ctran"        # "ctran" (reference COCO/VOC/VG) or "cub" transforms
  c.data.resize_on_device = False   # "ctran": host decodes, train/eval steps resize
  c.data.on_bad_example = "fail"    # an image that does not decode: "fail" (stop, say which
                                    # split) or "skip" (drop it, counted in each batch)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet"       # "resnet" or "inception_v3" (CUB)
  c.model.backbone_depth = 0        # 0: the tiny stage_sizes/block below; else 18..152
  c.model.backbone_width = 16
  c.model.backbone_stage_sizes = (1, 1, 1, 1)
  c.model.backbone_block = "basic"
  c.model.hidden = 64
  c.model.heads = 4
  c.model.layers = 2
  c.model.ffn_dim = 0               # 0: = hidden (reference)
  c.model.dropout = 0.1
  c.model.use_lmt = True
  c.model.train_unknown_state = False  # True: the unknown state's embedding learns (ref: fixed)
  c.model.pos_emb = False
  c.model.image_tokens = True
  c.model.bn_mode = "train"         # "train" (reference) or "frozen"
  c.model.dtype = "float32"         # compute dtype: float32 or bfloat16
  c.model.init_from = ""            # a model directory from `python -m ctran_jax.convert`
  c.model.remat = "none"            # recompute in backward: none | backbone | encoder | all

  c.lmt = ml_collections.ConfigDict()
  c.lmt.max_known_fraction = 0.75   # known labels per example ~ U{0..floor(0.75 M)}
  c.lmt.num_maskable = 0            # M: only the first M labels may be known (0: all L)
  c.lmt.all_unknown_fraction = 0.75  # share of examples shown no label (0: reference law);
                                    # 0.75 with loss.labels="all": LMT costs ~nothing at 0 %
                                    # known (docs/benchmarks.md, "What label-mask training
                                    # costs")

  c.loss = ml_collections.ConfigDict()
  c.loss.reduction = "mean"         # "sum" (reference) or "mean" over the entries in the loss
  c.loss.labels = "all"             # entries in the loss: "unknown" (reference) or "all"
  c.loss.name = "bce"               # per-entry loss: "bce" (reference), "asl" or "focal"
  c.loss.gamma_neg = 0.0            # asl/focal: focusing exponent of negatives (ASL paper: 4)
  c.loss.gamma_pos = 0.0            # asl/focal: of positives (ASL: 0; focal: = gamma_neg)
  c.loss.clip = 0.0                 # asl: probability margin of negatives (ASL: 0.05);
                                    # all three 0 for "bce", which refuses them

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"         # adam | adamw | sgd
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.decay_mask = "kernels"  # weight decay on: "kernels" (Conv/Linear kernels; not
                                    # biases, norms, embeddings) or "all" (torch's)
  c.optimizer.momentum = 0.9        # sgd only
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 0.0  # 0: no clipping (reference)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"        # constant | plateau | cosine | onecycle
  c.schedule.warmup_steps = 100
  c.schedule.end_fraction = 0.05    # cosine: final lr = end_fraction * learning_rate
  c.schedule.plateau_factor = 0.1   # plateau: lr *= factor after `patience` evaluations
  c.schedule.plateau_patience = 5   # without a lower validation loss (reference: per epoch)
  c.schedule.pct_start = 0.3        # onecycle: share of the steps rising to learning_rate
  c.schedule.div_factor = 25.0      # onecycle: starts at learning_rate / div_factor
  c.schedule.final_div_factor = 1e4  # onecycle: ends at start / final_div_factor

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0                 # EMA of the weights, e.g. 0.9997 (0: off, reference)
  c.ema.warmup = True               # decay = min(decay, (1 + t) / (10 + t)) at step t
  c.ema.evaluate_raw = False        # also report the raw (non-EMA) weights at the end

  c.nan_policy = "stop"             # a non-finite loss/gradient: "stop" the run, or "skip"
  c.max_consecutive_nonfinite = 20  # "skip": stop after this many non-finite steps in a row

  c.batch_size = 64                 # global, per optimizer step
  c.grad_accum_steps = 1            # split each step's batch into this many micro-batches
  c.num_train_steps = 1500          # > 0 wins over num_epochs
  c.num_epochs = 0.0

  c.log_every_steps = 100           # a progress line every this many steps
  c.eval_every_steps = 500          # 0: once per epoch
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = -1           # -1: every device of every host (required when multi-host)
  c.mesh.fsdp = 1                   # devices a parameter is split over; 1: pure data parallel,
                                    # -1: all devices (the batch is split over all of them)
  c.mesh.fsdp_min_size = 2**16      # leaves with fewer elements stay replicated

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.known_fractions = (0.0, 0.25, 0.5, 0.75)
  c.eval.seed = 0                   # which labels are known at evaluation
  c.eval.known_groups = ()          # extra-label eval: numbers of concept groups given (CUB)
  c.eval.selection_metric = "mAP"   # best checkpoint: this metric at known_fractions[0]
  return c
