r"""Where the trainer's step spends its time, part by part, from a `jax.profiler` trace.

    python benchmarks/step_breakdown.py                       # C-Tran-R101, 224^2, batch 2
    python benchmarks/step_breakdown.py --size 64 --batch 8 --steps 3 --json /tmp/b.json
    XLA_FLAGS=... python benchmarks/step_breakdown.py         # the same under other flags

Builds the trainer's own step exactly as `benchmarks/vs_torch.py` does (configs/coco.py,
`train.jit_train_step`, state donated) and the evaluator's step, runs ``--warmup`` steps,
then records ``--steps`` steps of each under `jax.profiler.trace`. XLA:CPU emits one trace
event per executed thunk (a fusion, a convolution, a dot ...) named after its HLO
instruction; each instruction of the compiled module carries the metadata of the JAX
operation it came from (``op_name`` with the transformation stack, ``source_file``). A
thunk's part is read from that metadata:

* model part: ``models/resnet.py`` → ResNet; ``models/transformer.py`` → encoder;
  ``models/ctran.py`` / ``losses.py`` → tokens, head + loss (label/state embeddings, the
  input LayerNorm, the per-label head, the BCE); optax's files → optimizer update;
  ``train.py`` / ``resilience.py`` → step glue (the non-finite guard's select, counters,
  the loss's scaling); the innermost frame of the op's Python stack that names one of
  these files decides (an op in flax's ``Linear`` called from ``transformer.py`` is encoder);
* direction: ``transpose(`` in ``op_name`` (JAX's reverse-mode) → backward, else forward.

A fusion takes the part of the majority of its fused instructions. The trace's thunk time
is summed per part and divided by the number of steps; "untraced" is the step's wall time
minus the traced thunk time (runtime overhead, waits, parallel gaps). Memory: XLA's buffer
assignment of the compiled step (arguments, outputs, temporaries) and the process's RSS at
each phase. The stand-in's side of the table comes from `benchmarks/torch_breakdown.py`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (path fragment of a source file, part); the first match wins.
SOURCE_PARTS = (
    ("models/resnet.py", "ResNet"),
    ("models/transformer.py", "encoder"),
    ("models/ctran.py", "tokens, head + loss"),
    ("ctran_jax/losses.py", "tokens, head + loss"),
    ("optax/", "optimizer update"),
    ("ctran_jax/resilience.py", "step glue"),
    ("ctran_jax/ema.py", "step glue"),
    ("ctran_jax/train.py", "step glue"),
)
PART_ORDER = ("ResNet", "encoder", "tokens, head + loss", "optimizer update", "step glue",
              "other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def load_module(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def stack_files(hlo_text: str) -> dict[int, list[str]]:
  """stack_frame_id -> the source files of its Python stack, innermost first.

  The module text starts with tables (FileNames, FileLocations, StackFrames); a frame
  names its location and its caller as ``parent_frame_id`` = caller's id + 1 (0: none).
  """
  tables: dict[str, dict[int, str]] = {name: {} for name in _SECTIONS}
  section = None
  for line in hlo_text.splitlines():
    text = line.strip()
    if text in _SECTIONS:
      section = text
      continue
    if section is None:
      continue
    head, _, rest = text.partition(" ")
    if not head.isdigit():
      if text.startswith(("%", "ENTRY", "ROOT")) or "{" in head:
        break
      continue
    tables[section][int(head)] = rest
  files = {i: name.strip('"') for i, name in tables["FileNames"].items()}
  location_file = {i: int(re.search(r"file_name_id=(\d+)", loc).group(1))
                   for i, loc in tables["FileLocations"].items()}
  frames = {}
  for i, frame in tables["StackFrames"].items():
    location = int(re.search(r"file_location_id=(\d+)", frame).group(1))
    parent = int(re.search(r"parent_frame_id=(\d+)", frame).group(1)) - 1
    frames[i] = (files.get(location_file.get(location), ""), parent)
  stacks = {}
  for i in frames:
    chain, frame, seen = [], i, set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      name, frame = frames[frame]
      chain.append(name)
    stacks[i] = chain
  return stacks


def classify_metadata(op_name: str, files: list[str]) -> tuple[str, str] | None:
  """(part, direction) of one HLO instruction from its op_name and Python stack (innermost
  first); None when it has no metadata."""
  if not op_name and not files:
    return None
  part = next((p for source in files for fragment, p in SOURCE_PARTS if fragment in source),
              "other")
  direction = "backward" if "transpose(" in op_name else "forward"
  if part in ("optimizer update", "step glue"):
    direction = "update"
  return part, direction


def instruction_parts(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (part, direction) for every instruction of a compiled module.

  A fusion (or any instruction that calls a computation) gets the most common label of the
  instructions inside the computations it calls (recursively); an instruction without
  metadata the label of its computation's majority.
  """
  stacks = stack_files(hlo_text)
  own: dict[str, tuple[str, str] | None] = {}
  calls: dict[str, list[str]] = {}
  members: dict[str, list[str]] = collections.defaultdict(list)
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("{")[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name = match.group(1)
    op = _OP_NAME.search(line)
    frame = _FRAME.search(line)
    own[name] = classify_metadata(op.group(1) if op else "",
                                  stacks.get(int(frame.group(1)), []) if frame else [])
    calls[name] = _CALLS.findall(line)
    if computation:
      members[computation].append(name)

  memo: dict[str, collections.Counter] = {}

  def votes_of_computation(comp: str, depth: int = 0) -> collections.Counter:
    if comp in memo:
      return memo[comp]
    memo[comp] = collections.Counter()
    total = collections.Counter()
    for member in members.get(comp, ()):
      if own.get(member):
        total[own[member]] += 1
      if depth < 8:
        for callee in calls.get(member, ()):
          total.update(votes_of_computation(callee, depth + 1))
    memo[comp] = total
    return total

  labels = {}
  for name, label in own.items():
    votes = collections.Counter()
    for callee in calls.get(name, ()):
      votes.update(votes_of_computation(callee))
    if votes:
      labels[name] = votes.most_common(1)[0][0]
    elif label:
      labels[name] = label
  return labels


def thunk_times(trace_dir: str, thunks) -> dict[str, float]:
  """Self time (microseconds) per thunk name in the perfetto trace under `trace_dir`.

  Only events named after an instruction in `thunks` count. A thunk that runs others (a
  ``conditional``, a ``while``) is charged only for the time its nested thunks do not
  account for, so nothing is counted twice.
  """
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"no perfetto trace under {trace_dir}")
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  spans = sorted((e.get("pid"), e.get("tid"), float(e["ts"]), float(e["dur"]), e["name"])
                 for e in events if e.get("ph") == "X" and "dur" in e and e.get("name") in thunks)
  totals: dict[str, float] = collections.defaultdict(float)
  stack: list[list] = []  # [thread, end, name, self time]
  for pid, tid, ts, dur, name in spans:
    while stack and (stack[-1][0] != (pid, tid) or stack[-1][1] <= ts):
      _, _, done, own = stack.pop()
      totals[done] += own
    if stack:
      stack[-1][3] -= min(dur, stack[-1][1] - ts)
    stack.append([(pid, tid), ts + dur, name, dur])
  for _, _, done, own in stack:
    totals[done] += own
  return totals


def attribute(totals: dict[str, float], labels: dict[str, tuple[str, str]], steps: int):
  """Seconds per step for each (part, direction), the thunks' total and the top thunks."""
  per_part: dict[tuple[str, str], float] = collections.defaultdict(float)
  per_thunk = []
  for name, micros in totals.items():
    label = labels.get(name)
    if label is None:
      continue
    seconds = micros / 1e6 / steps
    per_part[label] += seconds
    per_thunk.append((seconds, name, label))
  per_thunk.sort(reverse=True)
  return dict(per_part), sum(per_part.values()), per_thunk


def by_kind(per_thunk) -> list[tuple[float, int, str]]:
  """(seconds, count, "kind part/direction") summed over thunks of one kind (the HLO name
  without its number: ``transpose_copy_fusion``, ``convolution``, ``ynn_fusion`` ...)."""
  kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for seconds, name, (part, direction) in per_thunk:
    key = f"{re.sub(r'[.-]?[0-9]+$', '', name)} {part}/{direction}"
    kinds[key][0] += seconds
    kinds[key][1] += 1
  return sorted(((s, n, k) for k, (s, n) in kinds.items()), reverse=True)


def profile(compiled, call, steps: int, trace_dir: str) -> dict:
  import jax

  text = compiled.as_text()
  if os.environ.get("STEP_BREAKDOWN_HLO_DIR"):  # for reading the slowest thunks' HLO
    with open(os.path.join(os.environ["STEP_BREAKDOWN_HLO_DIR"],
                           os.path.basename(trace_dir) + ".hlo.txt"), "w") as f:
      f.write(text)
  labels = instruction_parts(text)
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(call())
  wall = (time.perf_counter() - start) / steps
  per_part, traced, top = attribute(thunk_times(trace_dir, labels), labels, steps)
  return {"wall_s": wall, "traced_s": traced, "parts": {f"{p}|{d}": s for (p, d), s in
                                                         per_part.items()},
          "top": [{"thunk": n, "part": p, "direction": d, "s": s} for s, n, (p, d) in top[:15]],
          "kinds": [{"kind": k, "count": n, "s": s} for s, n, k in by_kind(top)[:25]]}


def run(size: int, batch: int, num_labels: int, warmup: int, steps: int, model: str) -> dict:
  """The trainer's step and the evaluator's, built as `benchmarks/vs_torch.py` builds them
  (`vs_torch.trainer_step`, `vs_torch.evaluator_step`), each profiled."""
  import jax

  vs_torch = load_module("vs_torch")
  built = vs_torch.trainer_step(size, batch, num_labels, warmup + 2 * steps + 1, model)
  phases = built["phases"]
  for _ in range(warmup):
    jax.block_until_ready(built["call"]())
  out = {"size": size, "batch": batch, "model": model, "jax": jax.__version__,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "train_memory": built["memory"]}
  with tempfile.TemporaryDirectory() as tmp:
    out["train"] = profile(built["compiled"], built["call"], steps,
                           os.path.join(tmp, "train"))
    phases["trained"] = vs_torch.rss_mb()
    ev = vs_torch.evaluator_step(built)
    for _ in range(warmup):
      jax.block_until_ready(ev["call"]())
    out["eval"] = profile(ev["compiled"], ev["call"], steps, os.path.join(tmp, "eval"))
    out["eval_memory"] = load_module("train_throughput").memory_of(ev["compiled"])
  phases["evaluated"] = vs_torch.rss_mb()
  out["rss_phases_mb"] = phases
  return out


def table(result: dict) -> str:
  """One Markdown table: seconds per step by part and direction, train and eval."""
  train, ev = result["train"]["parts"], result["eval"]["parts"]
  rows = ["| part | train: forward s | train: backward s | train: update s | eval s |",
          "|---|---|---|---|---|"]
  for part in PART_ORDER:
    cells = [train.get(f"{part}|{d}") for d in ("forward", "backward", "update")]
    cells.append(sum(v for k, v in ev.items() if k.startswith(part + "|")) or None)
    if any(cells):
      rows.append(f"| {part} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells)
                  + " |")
  for key, name in (("traced_s", "all traced thunks"), ("wall_s", "step wall time")):
    rows.append(f"| **{name}** | {result['train'][key]:.3f} (fwd+bwd+update) | | | "
                f"{result['eval'][key]:.3f} |")
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--num-labels", type=int, default=80)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--model", choices=("full", "tiny"), default="full")
  parser.add_argument("--top", type=int, default=10, help="list the N slowest thunks")
  parser.add_argument("--json", help="write the numbers here")
  a = parser.parse_args(argv)
  load_module("vs_torch").check_shape(parser, a.size, a.batch)
  if a.steps < 1 or a.warmup < 0:
    parser.error("--steps must be at least 1 and --warmup at least 0")
  sys.path.insert(0, ROOT)
  result = run(a.size, a.batch, a.num_labels, a.warmup, a.steps, a.model)
  print(f"{a.size}^2 batch {a.batch}, {a.model} model, {a.steps} traced steps, "
        f"XLA_FLAGS={result['xla_flags']!r}")
  print(table(result))
  if a.top:
    print(f"\nthe train step's {a.top} costliest kinds of thunk (s per step, thunks):")
    for row in result["train"]["kinds"][:a.top]:
      print(f"  {row['s']:.3f}  {row['count']:>4}  {row['kind']}")
  phases = ", ".join(f"{k} {v.get('VmRSS', 0):,.0f}" for k, v in result["rss_phases_mb"].items())
  print(f"\nRSS MB by phase: {phases}; peak "
        f"{result['rss_phases_mb']['evaluated'].get('VmHWM', 0):,.0f}")
  print(f"XLA memory of the train step: {result['train_memory']}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
