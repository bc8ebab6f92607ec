r"""The PyTorch stand-in's step, part by part: the other half of `step_breakdown.py`'s table.

    /path/to/torch-venv/bin/python benchmarks/torch_breakdown.py --threads 1
    ... --torch-script ../shared/bench/torch_ctran_step.py --size 64 --batch 8 --json out.json

Runs in an environment with torch and torchvision (never this project's). Loads the
stand-in's model class from ``--torch-script`` (default ``../shared/bench/
torch_ctran_step.py``) and runs its train step (forward, BCE summed over unknown labels,
backward, `torch.optim.Adam`) and its eval forward. Eager CPU execution is synchronous, so
hooks give exact part boundaries: a forward hook on the ResNet trunk and on the head end
the trunk's and the encoder's forward; a gradient hook on the trunk's output marks where
backward leaves the encoder and enters the trunk. Prints medians over ``--steps`` steps
after ``--warmup``, and the process's RSS after each phase of the first step (what the
parameters, activations, gradients and Adam's moments add).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_SCRIPT = os.path.join(os.path.dirname(ROOT), "shared", "bench",
                                    "torch_ctran_step.py")
PARTS = ("ResNet|forward", "encoder, head + loss|forward", "encoder, head + loss|backward",
         "ResNet|backward", "optimizer update|update")


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return 0.0


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch-script", default=DEFAULT_TORCH_SCRIPT)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--num-labels", type=int, default=80)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's)")
  parser.add_argument("--json")
  a = parser.parse_args(argv)
  if a.size < 32 or a.size % 32 or a.batch < 1 or a.steps < 1 or a.warmup < 0:
    parser.error("--size must be a positive multiple of 32, --batch and --steps at least 1")
  if not os.path.isfile(a.torch_script):
    parser.error(f"--torch-script {a.torch_script}: no such file (the stand-in lives in "
                 "../shared/bench/torch_ctran_step.py beside the checkout)")
  try:
    import torch
    import torch.nn as nn
  except ImportError as error:
    raise SystemExit(f"{error}: run this with the python of an environment that has torch "
                     "and torchvision (e.g. /work/torchvenv/bin/python), never this "
                     "project's") from None
  spec = importlib.util.spec_from_file_location("torch_ctran_step", a.torch_script)
  standin = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(standin)
  if a.threads:
    torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  phases = {"imported": rss_mb()}
  model = standin.CTranLike(a.num_labels)
  opt = torch.optim.Adam(model.parameters(), lr=1e-5)
  g = torch.Generator().manual_seed(1)
  images = torch.randn(a.batch, 3, a.size, a.size, generator=g)
  labels = (torch.rand(a.batch, a.num_labels, generator=g) < 0.04).float()
  known = torch.rand(a.batch, a.num_labels, generator=g) < 0.375
  states = torch.where(known, labels, torch.full_like(labels, -1.0))
  phases["model built"] = rss_mb()
  marks: dict[str, float] = {}

  def trunk_done(_module, _inputs, output):
    marks["trunk"] = time.perf_counter()
    if output.requires_grad:
      output.register_hook(lambda grad: marks.__setitem__("trunk grad", time.perf_counter()))

  model.trunk.register_forward_hook(trunk_done)
  model.head.register_forward_hook(lambda *_: marks.__setitem__("head", time.perf_counter()))

  def train_step(record_rss: bool) -> dict:
    model.train()
    start = time.perf_counter()
    logits = model(images, states)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    loss = (loss * (states == -1)).sum()
    forward_end = time.perf_counter()
    if record_rss:
      phases["forward (activations held)"] = rss_mb()
    loss.backward()
    backward_end = time.perf_counter()
    if record_rss:
      phases["backward (gradients)"] = rss_mb()
    opt.step()
    opt.zero_grad()
    end = time.perf_counter()
    if record_rss:
      phases["optimizer step (Adam moments)"] = rss_mb()
    return {"ResNet|forward": marks["trunk"] - start,
            "encoder, head + loss|forward": forward_end - marks["trunk"],
            "encoder, head + loss|backward": marks["trunk grad"] - forward_end,
            "ResNet|backward": backward_end - marks["trunk grad"],
            "optimizer update|update": end - backward_end, "step": end - start}

  def eval_step() -> dict:
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
      model(images, torch.full_like(states, -1.0))
    end = time.perf_counter()
    return {"ResNet": marks["trunk"] - start, "encoder, head + loss": end - marks["trunk"],
            "step": end - start}

  runs = [train_step(record_rss=i == 0) for i in range(a.warmup + a.steps)][a.warmup:]
  evals = [eval_step() for _ in range(a.warmup + a.steps)][a.warmup:]
  train = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
  ev = {k: statistics.median(r[k] for r in evals) for k in evals[0]}
  print(f"stand-in {a.size}^2 batch {a.batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}: medians of {a.steps} steps (s)")
  print("| part | train: forward s | train: backward s | train: update s | eval s |")
  print("|---|---|---|---|---|")
  for part in ("ResNet", "encoder, head + loss", "optimizer update"):
    cells = [train.get(f"{part}|{d}") for d in ("forward", "backward", "update")]
    cells.append(ev.get(part))
    print(f"| {part} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
  print(f"| **step wall time** | {train['step']:.3f} (fwd+bwd+update) | | | {ev['step']:.3f} |")
  print("RSS MB after each phase of the first step: " +
        ", ".join(f"{k} {v:,.0f}" for k, v in phases.items()))
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"train": train, "eval": ev, "rss_phases_mb": phases, "size": a.size,
                 "batch": a.batch, "threads": torch.get_num_threads(),
                 "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
  main()
