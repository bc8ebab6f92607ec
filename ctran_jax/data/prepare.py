r"""Prepare a dataset once, from its original files, into a TFDS data directory.

    python -m ctran_jax.data.prepare coco2014 --manual_dir=~/downloads/coco --data_dir=gs://b/tfds
    python -m ctran_jax.data.prepare coco1000 --manual_dir=~/downloads/coco --data_dir=gs://b/tfds
    python -m ctran_jax.data.prepare cub --manual_dir=~/downloads --data_dir=~/tensorflow_datasets
    python -m ctran_jax.data.prepare --list          # datasets and the files each one needs

Training then reads the prepared copy with ``--config.data.data_dir=<data_dir>`` (every host
streams its own shard of it). The original files are checked before anything is built: when
some are missing the command lists exactly which files it needs and where to get them, and
exits with status 2. Builtin TFDS datasets (``coco/2014``, ``voc/2007``) are prepared by TFDS
itself (from ``manual_dir`` when it holds the archives, else downloaded).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

# Dataset short names -> TFDS builder names (ours are registered by importing ctran_jax.data).
ALIASES = {
    "demo": "ctran_demo", "coco2014": "ctran_coco2014", "coco": "ctran_coco2014",
    "coco1000": "ctran_coco1000",
    "cub": "ctran_cub", "vg500": "ctran_vg500", "vg": "ctran_vg500", "folder": "ctran_folder",
    "voc2007": "voc/2007", "voc": "voc/2007",
}


def builder_name(name: str) -> str:
  return ALIASES.get(name, name)


def _builder_class(name: str):
  import tensorflow_datasets as tfds
  try:
    return tfds.builder_cls(name.split("/")[0])
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(ALIASES))} "
                     "(or any TFDS name)") from None


def _accepts(fn, key: str) -> bool:
  return key in inspect.signature(fn).parameters


def missing_files(name: str, manual_dir: str | None, builder_kwargs: dict | None = None
                  ) -> list[str]:
  """Human-readable lines for the original files `name` needs and `manual_dir` lacks."""
  cls = _builder_class(name)
  check = getattr(cls, "missing_manual_files", None)
  if check is None:
    return []
  if not manual_dir:
    return [f"--manual_dir is required for {name}: "
            + " ".join((cls.MANUAL_DOWNLOAD_INSTRUCTIONS or "").split())]
  options = {k: v for k, v in (builder_kwargs or {}).items() if _accepts(check, k)}
  return list(check(manual_dir, **options))


def list_datasets() -> str:
  lines = []
  for short in ("demo", "coco2014", "coco1000", "cub", "vg500", "folder", "voc"):
    name = ALIASES[short]
    cls = _builder_class(name)
    instructions = " ".join((cls.MANUAL_DOWNLOAD_INSTRUCTIONS or
                             ("generated, no files needed" if getattr(cls, "GENERATED", False)
                              else "builtin TFDS dataset")).split())
    lines.append(f"{short:10s} {name:16s} {instructions}")
  return "\n".join(lines)


def prepare(name: str, *, manual_dir: str | None, data_dir: str | None,
            builder_kwargs: dict | None = None, overwrite: bool = False):
  """Check the original files, build the dataset, return the prepared builder."""
  import tensorflow_datasets as tfds

  import ctran_jax.data  # noqa: F401  (registers our builders)

  name = builder_name(name)
  manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
  builder_kwargs = dict(builder_kwargs or {})
  missing = missing_files(name, manual_dir, builder_kwargs)
  if missing:
    raise FileNotFoundError(f"{name}: missing original files in {manual_dir!r}:\n  "
                            + "\n  ".join(missing))
  if manual_dir and _accepts(_builder_class(name).__init__, "manual_dir"):
    # Builders whose features depend on the files (ctran_folder: the label count) read
    # them when constructed, so they take the folder as an argument.
    builder_kwargs = {"manual_dir": manual_dir, **builder_kwargs}
  builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  if builder.is_prepared() and not overwrite:
    print(f"{name}: already prepared in {builder.data_dir} (--overwrite rebuilds it)")
    return builder
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                     else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  print(f"{name}: building into {builder.data_dir} from {manual_dir or 'the network'} ...",
        flush=True)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=download_config)
  print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
  return builder


def summary(builder, data_dir: str | None) -> str:
  info = builder.info
  splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(info.splits.items()))
  labels = info.features["labels"].shape[0] if "labels" in info.features else "adapter"
  name = builder.info.full_name.rsplit("/", 1)[0]
  return (f"{name}: {labels} labels; splits: {splits}\n"
          f"train with: --config.data.name={name}"
          + (f" --config.data.data_dir={data_dir}" if data_dir else ""))


def _parse_kwargs(pairs: list[str]) -> dict:
  kwargs = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"--builder_arg needs KEY=VALUE, got {pair!r}")
    kwargs[key] = value
  return kwargs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ctran_jax.data.prepare", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="datasets: " + ", ".join(sorted(ALIASES)) + " (see --list)")
  parser.add_argument("name", nargs="?", help="dataset (see --list)")
  parser.add_argument("--manual_dir", help="folder holding the original files")
  parser.add_argument("--data_dir", help="TFDS data directory to write "
                      "(default ~/tensorflow_datasets; gs:// works)")
  parser.add_argument("--config", help="builder config, e.g. 'tiny' (default: the first)")
  parser.add_argument("--builder_arg", action="append", default=[], metavar="KEY=VALUE",
                      help="extra builder argument (dataset specific), repeatable")
  parser.add_argument("--overwrite", action="store_true", help="rebuild a prepared dataset")
  parser.add_argument("--list", action="store_true", help="list datasets and their files")
  args = parser.parse_args(argv)
  try:
    if args.list:
      print(list_datasets())
      return 0
    if not args.name:
      parser.error("give a dataset name (or --list)")
    name = builder_name(args.name)
    if args.config:
      name = f"{name.split(':')[0]}/{args.config}" if "/" not in name else name
    builder = prepare(name, manual_dir=args.manual_dir, data_dir=args.data_dir,
                      builder_kwargs=_parse_kwargs(args.builder_arg), overwrite=args.overwrite)
    print(summary(builder, args.data_dir))
    return 0
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
