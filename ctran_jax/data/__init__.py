"""Input data: TFDS builders (importing this package registers them) and tf.data pipelines.

Builders: ``ctran_demo`` (generated), ``ctran_coco2014``, ``ctran_cub``, ``ctran_vg500``,
``ctran_folder``; adapters for the builtin TFDS ``coco/2014`` and ``voc/2007``.
Prepare real datasets with ``python -m ctran_jax.data.prepare NAME``.
"""

from ctran_jax.data import coco, cub, demo, folder, vg, voc
from ctran_jax.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetMeta,
    DataSource,
    default_data_config,
    eval_dataset,
    num_eval_batches,
    open_source,
    train_dataset,
)

__all__ = ["coco", "cub", "demo", "folder", "vg", "voc", "IMAGENET_MEAN", "IMAGENET_STD",
           "DatasetMeta", "DataSource", "default_data_config", "eval_dataset",
           "num_eval_batches", "open_source", "train_dataset"]
