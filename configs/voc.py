"""PASCAL VOC 2007, 20 labels: the reference C-Tran VOC recipe (COCO recipe, effective batch 32).

    python -m ctran_jax.main --config=configs/voc.py --workdir=DIR \
        --config.model.init_from=resnet101_torchvision     # from `python -m ctran_jax.convert`
    python -m ctran_jax.main --config=configs/voc.py:tiny --workdir=DIR    # smoke test

Reference settings: those of configs/coco.py (ResNet-101, 576x576, 3 layers, hidden 2048,
label-mask training, BCE summed over unknown entries, Adam 1e-5, reduce-on-plateau, one
evaluation per epoch) plus ``--grad_ac_steps 2``: the reference backpropagates every batch
of 16 and steps the optimizer every 2 batches with the gradients *summed*.

Here ``batch_size`` is the global batch per optimizer step, cut into ``grad_accum_steps``
micro-batches, so the same update is batch_size=32, grad_accum_steps=2: with
``loss.reduction="sum"`` `make_train_step` divides by 1 and sums the two micro-batch
gradients, i.e. the gradient of the BCE summed over all 32 examples' unknown entries -
exactly the reference's accumulated gradient; BatchNorm normalises each micro-batch of 16,
as the reference's per-batch forward passes do.  (The logged train loss is that 32-example
sum, twice the reference's per-batch number.)  An epoch of the 5011 trainval images is
156 steps.

Data: the builtin TFDS ``voc/2007`` (see ctran_jax/data/voc.py for preparing it and the
label rule: objects marked difficult are skipped), trained on train+validation (the
reference's VOC07 trainval) and evaluated on test, which the reference uses as validation
and test set (model selection on it, as for COCO).  The paper reports no VOC number; a
user reproduced mAP 93.3 / CF1 88.6 / OF1 90.4 with the reference command (issue #14).
Expected cost: as COCO per step, with 156 steps per epoch - accelerators only.
The ``tiny`` variant keeps every recipe switch (batch 32 in 2 micro-batches included) with
a tiny backbone and 64^2 inputs on the demo dataset, so the recipe's code paths run in CI.
"""

import ml_collections

from ctran_jax.config_util import load_sibling

coco = load_sibling(__file__, "coco")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/voc.py variant must be 'full' or 'tiny', got {variant!r}")
  c = coco.get_config(variant)
  c.batch_size = 32                 # reference: 2 batches of 16 per optimizer step
  c.grad_accum_steps = 2
  if variant == "full":
    c.data.name = "voc/2007"
    c.data.train_split = "train+validation"   # VOC07 trainval
    c.data.eval_split = "test"
    c.data.test_split = ""          # test is the reference's validation and test set
  return c
