"""Input data: the generated ``ctran_demo`` TFDS dataset and tf.data pipelines over TFDS."""

from ctran_jax.data import demo
from ctran_jax.data.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetMeta,
    dataset_meta,
    default_data_config,
    eval_dataset,
    num_eval_batches,
    train_dataset,
)

__all__ = ["demo", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetMeta", "dataset_meta",
           "default_data_config", "eval_dataset", "num_eval_batches", "train_dataset"]
