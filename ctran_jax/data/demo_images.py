"""Write demo images as PNG files, to try `ctran_jax.predict` and the interactive page on:

    python -m ctran_jax.data.demo_images --out=/tmp/ctran_demo_images --count=4

A module of its own because running ``ctran_jax.data.demo`` as ``__main__`` would register
its TFDS builder twice.
"""

import argparse

from ctran_jax.data import demo


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ctran_jax.data.demo_images",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
  parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
  parser.add_argument("--count", type=int, default=4)
  args = parser.parse_args(argv)
  from ctran_jax import console

  console.quiet_tool()
  if args.count < 1:
    parser.error(f"--count must be at least 1, got {args.count}")
  for path, names in demo.write_images(args.out, split=args.split, count=args.count):
    print(f"{path}  (true labels: {', '.join(names) or 'none'})")


if __name__ == "__main__":
  main()
