"""What label-mask training (LMT) costs at regular inference, and which setting removes it.

    python benchmarks/lmt_ablation.py --workroot /tmp/lmt                 # the full matrix
    python benchmarks/lmt_ablation.py --workroot /tmp/lmt --cells reference,no_lmt --seeds 0
    python benchmarks/lmt_ablation.py --workroot /tmp/lmt --report        # table only
    python benchmarks/lmt_ablation.py --workroot /tmp/lmt_folder --config configs/folder.py \\
        --set data.data_dir=DATA --set data.name=ctran_folder/mine        # your own data

Each cell is one training run of the main command (``python -m ctran_jax.main``) per seed,
with the cell's config overrides on top of the reference LMT settings (`REFERENCE_LMT`, so
the table means the same whatever the config's own defaults are); a cell's run is skipped
when its workdir already holds the final ``eval/results.json``, so an interrupted matrix
resumes where it stopped. The
table gives test-split mAP (over the unknown labels) at 0/25/50/75 % known, mean ± sample
standard deviation over the seeds, and the 0 %-known difference to the ``no_lmt`` cell of
the same budget. Every run of one budget sees the same data order for the same seed;
``--config.seed`` changes initialisation, data order, masks and dropout together.
Never run by the tests (a cell is minutes of CPU); ``--dry_run`` prints the commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it changes, overrides). "3x" cells triple the config's num_train_steps.
CELLS = {
    "reference": ("LMT as the reference: known count ~ U{0..0.75 L}, loss on unknown", {}),
    "no_lmt": ("no LMT: every label unknown in training", {"model.use_lmt": False}),
    "loss_all": ("LMT, loss on all labels (known ones too)", {"loss.labels": "all"}),
    "sum": ("LMT, summed loss (reference reduction)", {"loss.reduction": "sum"}),
    "mix50": ("LMT, 50 % of examples show no label", {"lmt.all_unknown_fraction": 0.5}),
    "learned_unknown": ("LMT, the unknown state's embedding learns",
                        {"model.train_unknown_state": True}),
    "mix50_loss_all": ("LMT, 50 % show no label, loss on all labels",
                       {"lmt.all_unknown_fraction": 0.5, "loss.labels": "all"}),
    "reference_3x": ("reference LMT, 3x the steps", {"_budget": 3}),
    "no_lmt_3x": ("no LMT, 3x the steps", {"model.use_lmt": False, "_budget": 3}),
    "mix50_3x": ("LMT, 50 % show no label, 3x the steps",
                 {"lmt.all_unknown_fraction": 0.5, "_budget": 3}),
    "mix75": ("LMT, 75 % of examples show no label", {"lmt.all_unknown_fraction": 0.75}),
    # Pretrained-like start: the no_lmt cell's final model (exported), trained on with or
    # without LMT for the same budget.
    "ft_reference": ("reference LMT from the no-LMT model (pretrained-like start)",
                     {"_init_from": "no_lmt"}),
    "ft_no_lmt": ("no LMT from the no-LMT model", {"model.use_lmt": False,
                                                  "_init_from": "no_lmt"}),
    "mix75_loss_all": ("LMT, 75 % show no label, loss on all labels",
                       {"lmt.all_unknown_fraction": 0.75, "loss.labels": "all"}),
}
DEFAULT_CELLS = ("reference", "no_lmt", "loss_all", "sum", "mix50", "mix75",
                 "learned_unknown", "mix50_loss_all", "reference_3x", "no_lmt_3x",
                 "ft_reference", "ft_no_lmt")
# Every cell starts from the reference's LMT settings and the config's other values, so a
# cell means the same whatever the config's own LMT defaults are.
REFERENCE_LMT = {"lmt.all_unknown_fraction": 0.0, "loss.labels": "unknown",
                 "loss.reduction": "mean", "model.train_unknown_state": False}
FRACTIONS = ("0", "25", "50", "75")


def load_config(path: str):
  """The config file's ``get_config()`` (``path:arg`` passes an argument)."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("ablation_config", os.path.join(REPO, path)
                                                if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def run_command(args, cell: str, seed: int, base_steps: int) -> tuple[list[str], str]:
  """(the main command for one run, its workdir)."""
  overrides = {**REFERENCE_LMT, **CELLS[cell][1]}
  budget = overrides.pop("_budget", 1)
  start_from = overrides.pop("_init_from", None)
  if start_from:
    overrides["model.init_from"] = os.path.join(args.workroot, start_from, f"seed{seed}",
                                                "exported")
  workdir = os.path.join(args.workroot, cell, f"seed{seed}")
  command = [sys.executable, "-m", "ctran_jax.main", f"--config={args.config}",
             f"--workdir={workdir}", f"--config.seed={seed}",
             f"--config.num_train_steps={base_steps * budget}"]
  command += [f"--config.{k}={v}" for k, v in overrides.items()]
  command += [f"--config.{s}" for s in args.set]
  return command, workdir


def finished(workdir: str, steps: int) -> dict | None:
  """The run's final report, if it completed ``steps`` steps."""
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    doc = json.load(f)
  return doc if doc.get("step") == steps else None


def test_map(doc: dict, split: str) -> dict[str, float]:
  known = doc["splits"][split]["known"]
  return {k: 100 * known[k]["mAP"] for k in FRACTIONS if k in known}


def cell_steps(cell: str, base_steps: int) -> int:
  return base_steps * CELLS[cell][1].get("_budget", 1)


def mean_std(values: list[float]) -> str:
  if not values:
    return "–"
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(args, cells, seeds, base_steps, split) -> str:
  rows, per_cell = [], {}
  for cell in cells:
    results = [finished(run_command(args, cell, s, base_steps)[1], cell_steps(cell, base_steps))
               for s in seeds]
    per_cell[cell] = [test_map(r, split) for r in results if r]
  lines = [f"test split '{split}' mAP (%), over the unknown labels; mean ± std over seeds",
           "", "| cell | what | steps | seeds | " + " | ".join(f"{f} % known" for f in FRACTIONS)
           + " | 0 % vs no-LMT |", "|---|---|---|---|" + "---|" * (len(FRACTIONS) + 1)]
  for cell in cells:
    maps = per_cell[cell]
    budget = CELLS[cell][1].get("_budget", 1)
    baseline = "no_lmt" if budget == 1 else f"no_lmt_{budget}x"
    delta = "–"
    if cell != baseline and per_cell.get(baseline) and maps:
      gap = (statistics.mean(m["0"] for m in maps)
             - statistics.mean(m["0"] for m in per_cell[baseline]))
      delta = f"{gap:+.1f}"
    columns = [mean_std([m[f] for m in maps if f in m]) for f in FRACTIONS]
    rows.append(f"| {cell} | {CELLS[cell][0]} | {cell_steps(cell, base_steps)} | "
                f"{len(maps)} | " + " | ".join(columns) + f" | {delta} |")
  with open(os.path.join(args.workroot, "summary.json"), "w") as f:
    json.dump({"split": split, "cells": per_cell}, f, indent=1)
  return "\n".join(lines + rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workroot", required=True, help="one workdir per cell and seed below it")
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                      help=f"comma-separated, from: {', '.join(CELLS)}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--set", action="append", default=[],
                      help="an extra override for every run, KEY=VALUE (config key)")
  parser.add_argument("--report", action="store_true", help="print the table, run nothing")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv)
  cells = [c for c in args.cells.split(",") if c]
  unknown = [c for c in cells if c not in CELLS]
  if unknown:
    parser.error(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  config = load_config(args.config)
  base_steps = config.num_train_steps
  if base_steps <= 0:
    parser.error(f"{args.config} trains by epochs; add --set num_train_steps=N")
  split = config.data.test_split or config.data.eval_split
  os.makedirs(args.workroot, exist_ok=True)
  if not args.set or not any(s.startswith("data.data_dir=") for s in args.set):
    args.set.append(f"data.data_dir={os.path.join(args.workroot, 'tfds')}")

  if not args.report:
    for seed in seeds:  # seed-major: a partial matrix already has one seed of every cell
      for cell in cells:
        command, workdir = run_command(args, cell, seed, base_steps)
        if finished(workdir, cell_steps(cell, base_steps)):
          continue
        print(("would run: " if args.dry_run else "running: ") + " ".join(command), flush=True)
        if args.dry_run:
          continue
        os.makedirs(workdir, exist_ok=True)
        start_from = CELLS[cell][1].get("_init_from")
        if start_from:  # export the cell it starts from (which must have run)
          exported = os.path.join(args.workroot, start_from, f"seed{seed}", "exported")
          if not os.path.exists(os.path.join(exported, "model.json")):
            subprocess.run([sys.executable, "-m", "ctran_jax.export_model",
                            f"--workdir={os.path.dirname(exported)}", f"--out={exported}"],
                           cwd=REPO, check=True)
        start = time.perf_counter()
        with open(os.path.join(workdir, "console.txt"), "a") as log:  # log.txt is the trainer's
          status = subprocess.run(command, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        print(f"  {cell} seed {seed}: exit {status}, {time.perf_counter() - start:.0f} s",
              flush=True)
  print(report(args, cells, seeds, base_steps, split))


if __name__ == "__main__":
  main()
