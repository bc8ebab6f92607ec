"""Builtin TFDS datasets (``coco/2014``, ``voc/2007``) read as C-Tran examples.

The pipeline needs ``{image, labels}`` with a multi-hot ``labels`` (L,).  Our own builders
emit that directly; a builtin TFDS dataset has its own features (boxes with class ids), so
an *adapter* maps each raw example, in the tf.data graph, to that form.  Adapters are
looked up by the builder's name, so ``data.name = "coco/2014"`` just works once a prepared
copy exists in ``data.data_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow_datasets as tfds


@dataclasses.dataclass(frozen=True)
class Adapter:
  """How to read one builtin dataset.

  label_names: the L label names, in label-index order.
  to_example: in-graph function: a raw TFDS example whose ``image`` is still encoded bytes
    -> ``{"image": <encoded bytes>, "labels": int32 (L,) multi-hot}`` (extra keys allowed).
  """
  label_names: tuple[str, ...]
  to_example: Callable[[dict], dict]

  @property
  def num_labels(self) -> int:
    return len(self.label_names)


_FACTORIES: dict[str, Callable[[tfds.core.DatasetBuilder], Adapter]] = {}


def register(builder_name: str):
  """Decorator: ``factory(builder) -> Adapter`` serves TFDS builders named ``builder_name``."""
  def wrap(factory):
    _FACTORIES[builder_name] = factory
    return factory
  return wrap


def adapter_for(builder: tfds.core.DatasetBuilder) -> Adapter | None:
  """The adapter for ``builder`` (None: it already has ``image`` + multi-hot ``labels``)."""
  factory = _FACTORIES.get(builder.name)
  return factory(builder) if factory else None


def registered() -> list[str]:
  return sorted(_FACTORIES)
