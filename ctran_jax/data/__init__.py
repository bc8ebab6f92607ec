"""Input data: TFDS builders (importing this package registers them) and tf.data pipelines.

Builders: ``ctran_demo`` (generated), ``ctran_coco2014``, ``ctran_coco1000``, ``ctran_cub``,
``ctran_vg500``, ``ctran_folder``; adapters for the builtin TFDS ``coco/2014`` and ``voc/2007``.
Prepare real datasets with ``python -m ctran_jax.data.prepare NAME``.  The data config
fields and their defaults are the ``data`` section of configs/default.py.
"""

from ctran_jax.data import coco, coco1000, cub, demo, folder, vg, voc
from ctran_jax.data.pipeline import (
    DatasetMeta,
    DataSource,
    eval_dataset,
    num_eval_batches,
    open_source,
    train_dataset,
)

__all__ = ["coco", "coco1000", "cub", "demo", "folder", "vg", "voc", "DatasetMeta", "DataSource",
           "eval_dataset", "num_eval_batches", "open_source", "train_dataset"]
