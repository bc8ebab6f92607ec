r"""Our trainer's step vs the PyTorch stand-in of the reference, interleaved, in one table.

    python benchmarks/vs_torch.py --torch-python /work/torchvenv/bin/python \
        --torch-script ../shared/bench/torch_ctran_step.py            # 224^2 b2 and 64^2 b8
    python benchmarks/vs_torch.py ... --shapes 224x2 --rounds 5 --json /tmp/vs.json
    python benchmarks/vs_torch.py ... --variant onednn:XLA_FLAGS=--xla_cpu_use_onednn=true

Each measurement is its own subprocess, so peak RSS (``ru_maxrss`` from ``wait4``) belongs
to that side alone; the sides alternate (ours, torch, ours, torch, ...) ``--rounds`` times
per shape and the table shows medians over rounds of each run's median step. Our side is
the trainer's own step: `train.model_from_config`, `train.make_optimizer`,
`train.train_state`, `train.jit_train_step` (state donated), on configs/coco.py (C-Tran-R101,
hidden 2048, 3 layers, Adam, BCE summed over unknown labels) at the given image size with
images already resized (``data.resize_on_device`` off: the stand-in gets resized tensors
too); eval is the evaluator's step (`evaluate.make_predict_step`, one set of known labels,
all unknown). Compile is lowering + compilation of the train step plus the eval step, in a
process with an empty persistent cache (``--cache``: a cache directory shared across
rounds, so later rounds show the warm-cache time). The stand-in runs eagerly: no compile.

``--variant NAME:KEY=VALUE,KEY=VALUE`` adds another configuration of our side (environment
variables for its subprocess, e.g. XLA_FLAGS; ``ROOT=DIR`` runs the code and worker of another
checkout, e.g. ``before:ROOT=/tmp/before`` for a before/after table), interleaved with the others;
``--torch-variant`` does the same for the stand-in (``THREADS=N`` is passed as its
``--threads``). Ratios are against the fastest stand-in configuration of each column, so
that a torch setting that suffers on a loaded machine (its default OpenMP threads spin
when other processes hold the cores) cannot flatter us. Never asserted in tests: timings
on shared CPUs are noisy; compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_SCRIPT = os.path.join(os.path.dirname(ROOT), "shared", "bench",
                                    "torch_ctran_step.py")


# ----------------------------------------------------------------------------- our worker

def rss_mb() -> dict:
  """This process's current and peak resident set (MB) from /proc (Linux)."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmRSS:", "VmHWM:")):
          out[line.split(":")[0]] = int(line.split()[1]) / 1024
  except OSError:
    pass
  return out


def ours_config(image_size: int, batch: int, model: str = "full"):
  """configs/coco.py at `image_size`, batch `batch`, images resized on the host; `model`
  "tiny": its tiny variant with a 32-wide, one-layer encoder (tests of this script)."""
  from ctran_jax.config_util import load_sibling

  coco = load_sibling(os.path.join(ROOT, "configs", "coco.py"), "coco")
  c = coco.get_config(model)
  if model == "tiny":
    c.model.hidden, c.model.layers = 32, 1
  c.data.image_size = image_size
  c.data.scale_size = image_size * 8 // 7
  c.data.crop_sizes = (c.data.scale_size, image_size)
  c.data.resize_on_device = False
  c.batch_size = batch
  return c


def trainer_step(image_size: int, batch: int, num_labels: int, num_steps: int,
                 model: str = "full") -> dict:
  """The trainer's compiled train step and its inputs, built as `train.train_and_evaluate`
  builds them (including its `host_memory.release` calls), with timings and RSS phases.

  Keys: ``call()`` runs one step on the donated state (kept in ``box["state"]``),
  ``compiled``, ``config``, ``mesh``, ``model_def``, ``batch``, ``build_s``,
  ``compile_s``, ``memory`` (XLA's), ``phases`` (RSS after each phase). Also used by
  benchmarks/step_breakdown.py.
  """
  phases = {"start": rss_mb()}
  import jax
  import jax.numpy as jnp

  from ctran_jax import host_memory, sharding, train
  phases["imported"] = rss_mb()

  spec = __import__("importlib").util.spec_from_file_location(
      "train_throughput", os.path.join(ROOT, "benchmarks", "train_throughput.py"))
  tt = __import__("importlib").util.module_from_spec(spec)
  spec.loader.exec_module(tt)

  c = ours_config(image_size, batch, model)
  mesh = sharding.make_mesh(c.mesh.num_devices, c.mesh.fsdp)
  t0 = time.perf_counter()
  model_def = train.model_from_config(c, num_labels)
  tx, schedule = train.make_optimizer(c, num_steps)
  abstract, init = train.train_state(c, mesh, model_def, tx)
  state = init()
  host_memory.release(drop_compiled=True)  # as train_and_evaluate does after init
  batch_arrays = tt.synthetic_batch(c, mesh, batch, num_labels)
  lr_scale = jnp.float32(1.0)
  jax.block_until_ready((state, batch_arrays))
  build_s = time.perf_counter() - t0
  phases["state built"] = rss_mb()

  step_fn = train.jit_train_step(c, model_def, tx, schedule, mesh, abstract)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, lr_scale).compile()
  compile_s = time.perf_counter() - t0
  host_memory.release()  # as train_and_evaluate does after its first (compiling) step
  phases["train step compiled"] = rss_mb()
  box = {"state": state}

  def call():
    box["state"], metrics = compiled(box["state"], batch_arrays, lr_scale)
    return box["state"], metrics

  return {"call": call, "box": box, "compiled": compiled, "config": c, "mesh": mesh,
          "model_def": model_def, "batch": batch_arrays, "build_s": build_s,
          "compile_s": compile_s, "memory": tt.memory_of(compiled), "phases": phases}


def evaluator_step(built: dict) -> dict:
  """The evaluator's compiled step (Evaluator.predict) on `trainer_step`'s batch and
  current weights, one set of known labels (all unknown): ``call()``, ``compiled``,
  ``compile_s``."""
  import jax
  import numpy as np

  from ctran_jax import evaluate, sharding

  mesh, batch = built["mesh"], built["batch"]
  size, num_labels = batch["labels"].shape
  predict = jax.jit(evaluate.make_predict_step(built["model_def"]),
                    out_shardings=sharding.replicated(mesh))
  eval_batch = {"image": batch["image"], **sharding.global_batch(
      {"states": np.full((size, 1, num_labels), -1, np.int32),
       "labels": np.zeros((size, num_labels), np.int32),
       "valid": np.ones((size,), bool)}, mesh)}
  params, stats = built["box"]["state"]["params"], built["box"]["state"]["batch_stats"]
  t0 = time.perf_counter()
  compiled = predict.lower(params, stats, eval_batch).compile()
  compile_s = time.perf_counter() - t0
  return {"call": lambda: compiled(params, stats, eval_batch), "compiled": compiled,
          "compile_s": compile_s}


def run_ours(image_size: int, batch: int, num_labels: int, warmup: int, steps: int,
             model: str = "full") -> dict:
  """Build, compile and time the trainer's train step and the evaluator's step."""
  import jax

  built = trainer_step(image_size, batch, num_labels, warmup + steps + 1, model)
  phases = built["phases"]

  def timed(fn, n):
    times = []
    for _ in range(n):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t)
    return times

  timed(built["call"], warmup)
  train_times = timed(built["call"], steps)
  phases["trained"] = rss_mb()
  ev = evaluator_step(built)
  eval_times = timed(ev["call"], warmup + steps)[warmup:]
  phases["evaluated"] = rss_mb()
  train_compile_s, eval_compile_s = built["compile_s"], ev["compile_s"]
  build_s, memory = built["build_s"], built["memory"]
  return {"side": "ours", "train_step_s": statistics.median(train_times),
          "train_times_s": train_times, "eval_s": statistics.median(eval_times),
          "eval_times_s": eval_times, "train_compile_s": train_compile_s,
          "eval_compile_s": eval_compile_s, "compile_s": train_compile_s + eval_compile_s,
          "build_s": build_s, "xla_memory_bytes": memory, "rss_phases_mb": phases,
          "size": image_size, "batch": batch, "model": model, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ----------------------------------------------------------------------------- the driver

def run_child(cmd: list[str], env: dict, log) -> tuple[int, float, float]:
  """(return code, peak RSS MB of the child, wall seconds); its output goes to `log`."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - t0


def parse_variant(text: str) -> tuple[str, dict]:
  name, _, assignments = text.partition(":")
  env = {}
  for item in filter(None, assignments.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE,KEY=VALUE")
    env[key] = value
  return name, env


def check_shape(parser, size: int, batch: int) -> None:
  """Image sizes the ResNet takes (a multiple of its stride, 32) and a positive batch."""
  if size < 32 or size % 32 or batch < 1:
    parser.error(f"image size {size}, batch {batch}: the size must be a positive multiple "
                 "of 32 (the ResNet's stride) and the batch at least 1")


def parse_shape(parser, text: str) -> tuple[int, int]:
  """"224x2" -> (224, 2); anything else is a usage error naming it."""
  size, sep, batch = text.strip().partition("x")
  if not (sep and size.isdigit() and batch.isdigit()):
    parser.error(f"--shapes: {text!r} is not SIZExBATCH (e.g. 224x2)")
  check_shape(parser, int(size), int(batch))
  return int(size), int(batch)


def median_of(runs: list[dict], key: str):
  values = [r[key] for r in runs if r.get(key) is not None]
  return statistics.median(values) if values else None


def fmt(value, spec: str, unit: str = "") -> str:
  return "n/a" if value is None else format(value, spec) + unit


COLUMNS = ("train_step_s", "eval_s", "peak_rss_mb")


def summarise(results: dict) -> str:
  """One Markdown table: per shape and side, medians over rounds, and ratios to the best
  stand-in configuration of each column."""
  lines = ["| shape | side | train step s | eval s | compile s (first / later) | peak RSS MB "
           "| train ratio | eval ratio | RSS ratio | rounds |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for shape, sides in results.items():
    torch_sides = [runs for runs in sides.values() if runs and runs[0]["side"] == "torch"]
    best = {k: min((median_of(runs, k) for runs in torch_sides), default=None)
            for k in COLUMNS}
    for side, runs in sides.items():
      medians = [median_of(runs, k) for k in COLUMNS]
      ratios = [fmt(m / best[k] if m and best[k] else None, ".2f")
                for m, k in zip(medians, COLUMNS, strict=True)]
      if runs and runs[0]["side"] == "torch":
        compile_text = "eager"
      else:
        first = runs[0].get("compile_s") if runs else None
        later = median_of(runs[1:], "compile_s") if len(runs) > 1 else None
        compile_text = f"{fmt(first, '.1f')} / {fmt(later, '.1f')}"
      train, ev, rss = medians
      lines.append(f"| {shape} | {side} | {fmt(train, '.3f')} | {fmt(ev, '.3f')} | "
                   f"{compile_text} | {fmt(rss, ',.0f')} | {' | '.join(ratios)} | "
                   f"{len(runs)} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch-python", help="python of an environment that has torch and "
                      "torchvision (not this project's); without it only our side runs")
  parser.add_argument("--torch-script", default=DEFAULT_TORCH_SCRIPT)
  parser.add_argument("--shapes", default="224x2,64x8", help="comma list of SIZExBATCH")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--num-labels", type=int, default=80)
  parser.add_argument("--model", choices=("full", "tiny"), default="full",
                      help="our side's model: configs/coco.py's C-Tran-R101 (full) or a tiny "
                      "one (a smoke test of this script; the stand-in stays R101)")
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME:KEY=VALUE,...: another configuration of our side (environment "
                      "variables; ROOT=DIR runs another checkout of this repository, e.g. "
                      "before:ROOT=/tmp/old for a before/after table)")
  parser.add_argument("--no-default", action="store_true",
                      help="only the --variant configurations of our side")
  parser.add_argument("--torch-variant", action="append", default=[],
                      help="NAME:KEY=VALUE,...: configurations of the stand-in (THREADS=N: "
                      "its --threads; default: one, torch's own settings)")
  parser.add_argument("--cache", help="persistent compilation cache directory shared by our "
                      "runs (default: none, every compile is cold)")
  parser.add_argument("--json", help="write every run's numbers here")
  parser.add_argument("--log", help="append the subprocesses' output here")
  parser.add_argument("--worker", nargs=2, type=int, metavar=("SIZE", "BATCH"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  a = parser.parse_args(argv)

  if a.worker:
    result = run_ours(*a.worker, a.num_labels, a.warmup, a.steps, a.model)
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)
    return

  variants = [] if a.no_default else [("ours", "ours", {})]
  variants += [(name, "ours", env) for name, env in map(parse_variant, a.variant)]
  if a.torch_python:
    torch_variants = [parse_variant(v) for v in a.torch_variant] or [("torch", {})]
    variants += [(name, "torch", env) for name, env in torch_variants]
  if not any(kind == "ours" for _, kind, _ in variants):
    raise SystemExit("nothing of ours to measure: --no-default without --variant")
  shapes = [parse_shape(parser, item) for item in a.shapes.split(",")]
  log = open(a.log, "a") if a.log else open(os.devnull, "w")  # noqa: SIM115
  load = os.getloadavg()
  print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min), "
        f"{os.cpu_count()} CPUs", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for size, batch in shapes:
      shape = f"{size}^2 b{batch}"
      sides = results[shape] = {name: [] for name, _, _ in variants}
      for rnd in range(a.rounds):
        for name, kind, extra in variants:
          out = os.path.join(tmp, f"{kind}.json")
          common = ["--num-labels", str(a.num_labels), "--warmup", str(a.warmup), "--steps",
                    str(a.steps)]
          if kind == "ours":
            # ROOT=DIR: that checkout's code and its own worker (before/after comparisons).
            root = os.path.abspath(extra.get("ROOT", ROOT))
            env = {**os.environ, "PYTHONPATH": root,
                   **{k: v for k, v in extra.items() if k != "ROOT"}}
            if a.cache:
              env["JAX_COMPILATION_CACHE_DIR"] = a.cache
              env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
            cmd = [sys.executable, os.path.join(root, "benchmarks", "vs_torch.py"), "--worker",
                   str(size), str(batch), "--out", out, "--model", a.model, *common]
          else:
            env = {**os.environ, **{k: v for k, v in extra.items() if k != "THREADS"}}
            cmd = [a.torch_python, a.torch_script, "--image-size", str(size), "--batch",
                   str(batch), "--json", out, "--threads", extra.get("THREADS", "0"), *common]
          log.write(f"\n=== {shape} {name} round {rnd} {extra}\n")
          log.flush()
          rc, rss, wall = run_child(cmd, env, log)
          if rc:
            raise SystemExit(f"{name} failed (exit {rc}) at {shape}; rerun with --log FILE "
                             "to see its output")
          with open(out) as f:
            r = json.load(f)
          r.update(side=kind, peak_rss_mb=rss, wall_s=wall, load=os.getloadavg()[0])
          sides[name].append(r)
          compiled = f", compile {r['compile_s']:.1f} s" if kind == "ours" else ""
          print(f"  {shape} {name:>10} round {rnd}: train {r['train_step_s']:.3f} s, eval "
                f"{r['eval_s']:.3f} s{compiled}, RSS {rss:,.0f} MB (load {r['load']:.1f})",
                flush=True)
  print()
  print(summarise(results))
  print("\nmedians over rounds of each run's median; ratios = this row / the fastest (smallest) "
        "stand-in row of the shape (< 1: ours faster or smaller); compile = lowering + "
        "compilation of the train and eval steps, "
        f"{'later rounds from the --cache directory' if a.cache else 'no persistent cache'}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"argv": sys.argv, "load_start": load, "load_end": os.getloadavg(),
                 "results": results}, f, indent=1)
    print(f"results: {a.json}")


if __name__ == "__main__":
  main()
