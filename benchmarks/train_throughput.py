r"""Training throughput of the real train step: images/s, step time, FLOPs, MFU, compile, memory.

    python benchmarks/train_throughput.py --config=configs/coco.py:tiny --steps=20
    python benchmarks/train_throughput.py --config=configs/coco.py --batch_size=64 \
        --dtypes=float32,bfloat16 --steps=20 --json=/tmp/r101_576.json
    python benchmarks/train_throughput.py --config=configs/coco.py --compile_only  # CPU

For each (dtype, remat) combination this builds the train state and the jitted step exactly
as `ctran_jax.train.train_and_evaluate` does (`train.model_from_config`,
`train.make_optimizer`, `train.train_state`, `train.jit_train_step`), feeds it one
synthetic batch that stays on the devices (the config's image size, ``--num_labels``
labels, LMT states from `label_mask.training_states`; no dataset), times lowering and
compilation separately, runs ``--warmup`` steps, then times ``--steps`` steps one by one
(each waits for its results). ``--batch_size`` is global.

FLOPs come from XLA's cost analysis. In jax 0.10.2 `Compiled.cost_analysis()` is one dict
(older releases: a list of one dict) describing the SPMD-partitioned program of ONE device,
so a step's FLOPs are that times the device count; this also counts work every device
repeats (the parameter update of replicated leaves: tens of FLOPs per parameter per
device, ~0.01 % of a C-Tran-R101 step). `Lowered.cost_analysis()` describes the whole
unpartitioned step and is the cross-check: XLA:GPU has under-counted cuBLAS/cuDNN custom
calls in some releases (jax-ml/jax#22249), so when the compiled count is under half the
lowered one the lowered one is used and the table says "(lowered)". Both count every
floating-point op (elementwise included), and with remat they include the recomputed
forward: the MFU column then uses the FLOPs of the same dtype's remat=none row (model
FLOPs); the JSON also has HFU (the row's own FLOPs). MFU = achieved / (dense per-device
peak of `PEAKS` or ``--peak_tflops``, times the device count).

Memory: `Compiled.memory_analysis()` (per device) and the allocator's ``peak_bytes_in_use``
(GPU/TPU only), which is this process's peak so far: exact for the first row only; run one
combination per process for exact numbers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import statistics
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = _DTYPES = _REMAT = _STEPS = _WARMUP = _BATCH = _LABELS = _PEAK = _JSON = None
_COMPILE_ONLY = None


def define_flags() -> None:
  """Command-line flags, defined only when run as a script (importing this module for its
  helpers, as the tests do, must not clash with ctran_jax.main's ``--config``)."""
  global _CONFIG, _DTYPES, _REMAT, _STEPS, _WARMUP, _BATCH, _LABELS, _PEAK, _JSON
  global _COMPILE_ONLY
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file with get_config(), e.g. configs/coco.py.", lock_config=True)
  _DTYPES = flags.DEFINE_string("dtypes", "", "Comma list of compute dtypes (float32,bfloat16); "
                                "default: the config's model.dtype.")
  _REMAT = flags.DEFINE_string("remat", "", "Comma list of remat modes (none, backbone, encoder, "
                               "all) when the config has model.remat; default: the config's.")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per combination.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  _BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch size (0: config.batch_size).")
  _LABELS = flags.DEFINE_integer("num_labels", 80, "Number of labels (COCO: 80).")
  _PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Dense peak TFLOP/s of ONE device for the MFU, "
                             "used for every dtype (0: look the device up in PEAKS).")
  _JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
  _COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Stop after compilation: FLOPs and "
                                    "XLA memory of a step too slow to run here (e.g. R101 on CPU).")
  flags.mark_flag_as_required("config")

REMAT_MODES = ("none", "backbone", "encoder", "all")

# Dense peak TFLOP/s per JAX device, from the vendors' spec sheets. NVIDIA lists tensor-core
# rates "with sparsity" (2:4 structured); the dense rate is half of that and is what is used
# here. "f32" is the unit XLA uses for float32 dots and convolutions at JAX's default matmul
# precision: TF32 tensor cores on A100/H100/H200/L4, one bfloat16 pass on TPUs; "f32_full"
# is the non-tensor FP32 rate, used under --jax_default_matmul_precision=highest/float32.
#   H100 SXM5 (H100 datasheet): BF16 1,979*, TF32 989*, FP32 67 TFLOPS (* with sparsity).
#   H100 PCIe: BF16 1,513*, TF32 756*, FP32 51.   H100 NVL: BF16 1,671*, TF32 835*, FP32 60.
#   H200 SXM (H200 datasheet): BF16 1,979*, TF32 989*, FP32 67; H200 NVL: 1,671*, 835*, 60.
#   A100 SXM4/PCIe, 40/80 GB (A100 datasheet): BF16 312 (624*), TF32 156 (312*), FP32 19.5.
#   L4 (L4 datasheet): BF16 242*, TF32 120*, FP32 30.3.
#   Google Cloud TPU docs, per chip (= one JAX device for these generations), bf16:
#   v4 275, v5e 197, v5p 459, v6e (Trillium) 918; their int8 rates are not used.
# Match order matters: the first pattern found in the lower-cased device_kind wins.
PEAKS = (
    # (regex on device_kind.lower(), name, bf16, f32 (default precision), f32_full)
    (r"h100.*pcie", "H100 PCIe", 756.5, 378.0, 51.0),
    (r"h100.*nvl", "H100 NVL", 835.5, 417.5, 60.0),
    (r"h100", "H100 SXM", 989.5, 494.5, 67.0),
    (r"h200.*nvl", "H200 NVL", 835.5, 417.5, 60.0),
    (r"h200", "H200 SXM", 989.5, 494.5, 67.0),
    (r"a100", "A100", 312.0, 156.0, 19.5),
    (r"\bl4\b", "L4", 121.0, 60.0, 30.3),
    (r"^tpu v4$", "TPU v4", 275.0, 275.0, None),
    (r"^tpu v5 ?(lite|e)$", "TPU v5e", 197.0, 197.0, None),
    (r"^tpu v5p?$", "TPU v5p", 459.0, 459.0, None),
    (r"^tpu v6 ?(lite|e)$", "TPU v6e", 918.0, 918.0, None),
)


def peak_tflops(device_kind: str, dtype: str, matmul_precision: str | None = None):
  """(name, dense peak TFLOP/s of one device) for the compute dtype; (None, None) if unknown."""
  kind = device_kind.lower().strip()
  for pattern, name, bf16, f32, f32_full in PEAKS:
    if re.search(pattern, kind):
      if dtype == "bfloat16":
        return name, bf16
      full = (matmul_precision or "default").lower() in ("highest", "float32")
      return name, (f32_full if full else f32)
  return None, None


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def heartbeat(label: str, every: float = 30.0):
  """Print a line every `every` seconds while the block runs (R101 at 576^2 compiles for
  minutes; silence looks like a hang)."""
  done = threading.Event()
  start = time.perf_counter()

  def beat():
    while not done.wait(every):
      print(f"    ... still {label} ({time.perf_counter() - start:.0f} s)", flush=True)

  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def flops_of(cost) -> float | None:
  """The "flops" entry of a cost analysis: a dict (jax 0.10) or a list of dicts (older)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  value = float(cost["flops"])
  return value if value > 0 else None


def memory_of(compiled) -> dict:
  """Per-device byte counts of XLA's memory analysis, plus a peak estimate."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  names = ("argument", "output", "alias", "temp", "generated_code")
  out = {n: int(getattr(stats, f"{n}_size_in_bytes", 0) or 0) for n in names}
  # Donated state is both an argument and an output (alias): count it once.
  out["peak_estimate"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                          + out["generated_code"])
  return out


def device_peak_bytes(devices) -> int | None:
  """Largest allocator ``peak_bytes_in_use`` over the local devices (None on CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def combinations(config, dtypes: str = "", remats: str = "") -> list[tuple[str, str]]:
  """The (dtype, remat) pairs of the comma lists (empty: the config's)."""
  from ctran_jax import model_store

  dtypes = [d.strip() for d in (dtypes or config.model.dtype).split(",") if d.strip()]
  for d in dtypes:
    if d not in model_store.DTYPES:
      raise ValueError(f"--dtypes has {d!r}; expected a comma list of "
                       f"{', '.join(model_store.DTYPES)}")
  remats = [r.strip() for r in (remats or config.model.remat).split(",") if r.strip()]
  for r in remats:
    if r not in REMAT_MODES:
      raise ValueError(f"--remat has {r!r}; expected a comma list of {', '.join(REMAT_MODES)}")
  return [(d, r) for d in dtypes for r in remats]


def synthetic_batch(config, mesh, batch_size: int, num_labels: int) -> dict:
  """One device-resident batch shaped like the training pipeline's (image, labels, states,
  + window/flip with ``data.resize_on_device``)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ctran_jax import label_mask, sharding

  size = config.data.image_size
  images = jax.jit(
      lambda key: jax.random.normal(key, (batch_size, size, size, 3), jnp.float32),
      out_shardings=sharding.batch_sharding(mesh))(jax.random.key(config.seed))
  rng = np.random.default_rng(config.seed)
  local = sharding.local_batch_size(batch_size, mesh)
  labels = (rng.random((local, num_labels)) < 0.04).astype(np.int32)  # COCO: ~2.9 of 80
  ids = np.arange(local) + jax.process_index() * local
  states = label_mask.training_states(config)(labels, ids, 0)  # as the trainer makes them
  extra = {}
  if config.data.get("resize_on_device", False):
    # The pipeline then ships uint8 canvases holding the decoded crop (COCO-sized here),
    # and the step resizes them: time that too.
    from ctran_jax.data import pipeline
    side = pipeline.canvas_size(config.data)
    images = jax.jit(lambda key: jax.random.randint(key, (batch_size, side, side, 3), 0, 256,
                                                    jnp.int32).astype(jnp.uint8),
                     out_shardings=sharding.batch_sharding(mesh))(jax.random.key(config.seed))
    window = np.tile([[min(480, side), side]], (local, 1)).astype(np.int32)
    extra = {"window": window, "flip": np.arange(local) % 2 == 0}
  rest = sharding.global_batch({"labels": labels, "states": states, **extra}, mesh)
  return {"image": images, **rest}


# ----------------------------------------------------------------------------- one combination

def _out_of_memory(error: Exception) -> str | None:
  """The first line of an allocator failure, None for any other runtime error."""
  text = str(error)
  return text.strip().splitlines()[0][:300] if "RESOURCE_EXHAUSTED" in text else None


def measure(config, *, dtype: str, remat: str, batch_size: int,
            num_labels: int, steps: int, warmup: int, tag: str,
            compile_only: bool = False) -> dict:
  """Build, lower, compile and time one (dtype, remat) train step; returns the raw numbers.

  Running out of device memory ends the row, not the run: its "error" says where, and
  what was measured before (compile time, XLA's memory analysis) is kept.
  """
  import jax
  import jax.numpy as jnp

  from ctran_jax import sharding, train

  c = config.copy_and_resolve_references()
  c.model.dtype = dtype
  c.model.remat = remat
  c.batch_size = batch_size
  train.check_config(c)
  mesh = sharding.make_mesh(c.mesh.num_devices, c.mesh.fsdp)
  devices = mesh.devices.size
  if (batch_size // c.grad_accum_steps) % devices:
    raise ValueError(f"micro-batch {batch_size // c.grad_accum_steps} (batch size / "
                     f"config.grad_accum_steps) must be divisible by the {devices} devices")
  r = dict.fromkeys(RESULT_KEYS)
  r.update(dtype=dtype, remat=remat, batch_size=batch_size, devices=devices,
           mesh={str(k): int(v) for k, v in mesh.shape.items()}, image_size=c.data.image_size,
           num_labels=num_labels, grad_accum_steps=c.grad_accum_steps, step_times_s=[])
  stage = "building the train state"
  try:
    print(f"{tag} {stage} (mesh {r['mesh']}, global batch {batch_size}, "
          f"{c.data.image_size}^2, {num_labels} labels)", flush=True)
    t0 = time.perf_counter()
    num_steps = c.num_train_steps if c.num_train_steps > 0 else warmup + steps + 1
    model_def = train.model_from_config(c, num_labels)
    tx, schedule = train.make_optimizer(c, num_steps)
    abstract, init = train.train_state(c, mesh, model_def, tx)
    state = init()
    r["params"] = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    batch = synthetic_batch(c, mesh, batch_size, num_labels)
    lr_scale = jnp.float32(1.0)
    jax.block_until_ready((state, batch))
    r["build_s"] = time.perf_counter() - t0
    step_fn = train.jit_train_step(c, model_def, tx, schedule, mesh, abstract)  # as in training

    stage = "lowering"
    print(f"{tag} {stage} ({r['params']:,} parameters; built in {r['build_s']:.1f} s)",
          flush=True)
    t0 = time.perf_counter()
    with heartbeat(stage):
      lowered = step_fn.lower(state, batch, lr_scale)
    r["lower_s"] = time.perf_counter() - t0
    r["flops_global_lowered"] = flops_of(lowered.cost_analysis())

    stage = "compiling"
    print(f"{tag} {stage} (lowered in {r['lower_s']:.1f} s; large models take minutes)",
          flush=True)
    t0 = time.perf_counter()
    with heartbeat(stage):
      compiled = lowered.compile()
    r["compile_s"] = time.perf_counter() - t0
    per_device = r["flops_per_device_compiled"] = flops_of(compiled.cost_analysis())
    hlo = r["flops_global_lowered"]
    if per_device and (not hlo or per_device * devices >= 0.5 * hlo):
      r["flops_per_step"], r["flops_source"] = per_device * devices, "compiled"
    else:
      r["flops_per_step"], r["flops_source"] = hlo, "lowered" if hlo else None
    r["memory_analysis_bytes"] = memory_of(compiled)

    stage = "running"
    if compile_only:
      print(f"{tag} compiled in {r['compile_s']:.1f} s (--compile_only: not run)", flush=True)
      steps = warmup = 0
    else:
      print(f"{tag} compiled in {r['compile_s']:.1f} s; {warmup} warm-up + {steps} timed "
            "steps", flush=True)
    for _ in range(warmup):
      state, metrics = compiled(state, batch, lr_scale)
    jax.block_until_ready(state)
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch, lr_scale)
      jax.block_until_ready((state, metrics))
      r["step_times_s"].append(time.perf_counter() - t0)
    if steps or warmup:
      r["final_loss"] = float(metrics["loss"])
    r["step_median_s"] = statistics.median(r["step_times_s"]) if steps else None
  except jax.errors.JaxRuntimeError as e:
    if not (message := _out_of_memory(e)):
      raise
    r["error"] = f"out of memory while {stage}: {message}"
    print(f"{tag} {r['error']}", flush=True)
  r["device_peak_bytes"] = device_peak_bytes(jax.local_devices())
  return r


RESULT_KEYS = (
    "dtype", "remat", "batch_size", "devices", "mesh", "image_size", "num_labels", "params",
    "grad_accum_steps", "build_s", "lower_s", "compile_s", "step_times_s", "step_median_s",
    "flops_per_device_compiled", "flops_global_lowered", "flops_per_step", "flops_source",
    "memory_analysis_bytes", "device_peak_bytes", "final_loss", "error")


def add_rates(results: list[dict], peak_per_device: dict) -> None:
  """images/s, TFLOP/s, HFU (own FLOPs) and MFU (remat=none FLOPs of the same dtype)."""
  model_flops = {r["dtype"]: r["flops_per_step"] for r in results if r["remat"] == "none"}
  for r in results:
    t = r["step_median_s"]
    peak = peak_per_device.get(r["dtype"])
    peak_total = peak * r["devices"] * 1e12 if peak else None
    r["images_per_s"] = r["batch_size"] / t if t else None
    r["peak_tflops_per_device"] = peak
    r["achieved_tflops"] = r["flops_per_step"] / t / 1e12 if t and r["flops_per_step"] else None
    r["hfu"] = (r["flops_per_step"] / t / peak_total
                if t and r["flops_per_step"] and peak_total else None)
    model = model_flops.get(r["dtype"])
    r["model_flops_per_step"] = model
    r["mfu"] = model / t / peak_total if t and model and peak_total else None


# ----------------------------------------------------------------------------- output

COLUMNS = ("dtype", "remat", "batch", "img/s", "step ms", "GFLOP/step", "TFLOP/s", "MFU",
           "lower s", "compile s", "args MB", "out MB", "temp MB", "code MB", "XLA peak MB",
           "dev peak MB")


def _num(value, fmt: str) -> str:
  return "n/a" if value is None else format(value, fmt)


def table_rows(results: list[dict]) -> list[list[str]]:
  mb = 2.0 ** 20
  rows = []
  for r in results:
    m = r["memory_analysis_bytes"] or {}
    gflop = _num(r["flops_per_step"] and r["flops_per_step"] / 1e9, ",.1f")
    if r["flops_source"] == "lowered":
      gflop += " (lowered)"
    rate = "OOM" if r.get("error") else _num(r["images_per_s"], ",.1f")
    rows.append([
        r["dtype"], r["remat"], str(r["batch_size"]), rate,
        _num(r["step_median_s"] and r["step_median_s"] * 1e3, ",.1f"), gflop,
        _num(r["achieved_tflops"], ".4g"), _num(r["mfu"] and r["mfu"] * 100, ".3g") +
        ("%" if r["mfu"] else ""), _num(r["lower_s"], ".1f"), _num(r["compile_s"], ".1f"),
        *(_num(m.get(k) and m[k] / mb, ",.0f") if m else "n/a"
          for k in ("argument", "output", "temp", "generated_code", "peak_estimate")),
        _num(r["device_peak_bytes"] and r["device_peak_bytes"] / mb, ",.0f")])
  return rows


def format_table(results: list[dict]) -> str:
  """A Markdown table: readable in a terminal and pasteable into docs/benchmarks.md."""
  rows = table_rows(results)
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(COLUMNS)]
  def line(cells):
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

  return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                    *(line(row) for row in rows)])


def write_json(path: str, header: dict, results: list[dict]) -> None:
  with open(path, "w") as f:
    json.dump({**header, "results": results}, f, indent=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax

  logging.set_verbosity(logging.WARNING)  # the progress lines say what happens
  config = _CONFIG.value
  results = []
  try:
    if _STEPS.value < 1 or _WARMUP.value < 0:
      raise ValueError("--steps must be >= 1 and --warmup >= 0")
    combos = combinations(config, _DTYPES.value, _REMAT.value)
    batch_size = _BATCH.value or config.batch_size
    device = jax.devices()[0]
    precision = jax.config.jax_default_matmul_precision
    peaks, peak_name = {}, None
    for dtype in dict.fromkeys(d for d, _ in combos):
      if _PEAK.value > 0:
        peaks[dtype], peak_name = _PEAK.value, "--peak_tflops"
      else:
        peak_name, peaks[dtype] = peak_tflops(device.device_kind, dtype, precision)
    print(f"device: {device.platform} {device.device_kind!r} x{jax.device_count()} "
          f"({jax.process_count()} process(es)), jax {jax.__version__}")
    if peak_name:
      listed = ", ".join(f"{d} {_num(p, 'g')}" for d, p in peaks.items())
      print(f"peak TFLOP/s per device: {listed} ({peak_name})")
    else:
      print("peak TFLOP/s: unknown device, MFU n/a (pass --peak_tflops)")
    header = {"device_kind": device.device_kind, "platform": device.platform,
              "device_count": jax.device_count(), "process_count": jax.process_count(),
              "jax": jax.__version__, "peak_source": peak_name, "matmul_precision": precision,
              "steps": _STEPS.value, "warmup": _WARMUP.value,
              "compile_only": _COMPILE_ONLY.value}
    for i, (dtype, remat) in enumerate(combos, 1):
      tag = f"[{i}/{len(combos)} {dtype} remat={remat}]"
      results.append(measure(config, dtype=dtype, remat=remat, batch_size=batch_size,
                             num_labels=_LABELS.value, steps=_STEPS.value,
                             warmup=_WARMUP.value, tag=tag, compile_only=_COMPILE_ONLY.value))
      gc.collect()  # the previous row's arrays, before the next row allocates
      add_rates(results, peaks)
      r = results[-1]
      if r["step_median_s"]:
        print(f"{tag} {r['images_per_s']:,.1f} images/s, median step "
              f"{r['step_median_s'] * 1e3:,.1f} ms", flush=True)
      if _JSON.value:  # after every row: a run cut short keeps what it measured
        write_json(_JSON.value, header, results)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print()
  print(format_table(results))
  print("\nimg/s = batch / median step time; GFLOP/step is global (XLA's per-device count x "
        "devices); MFU uses the remat=none FLOPs of the same dtype; memory columns are XLA's "
        "per-device analysis (XLA peak = args + out - aliased + temp + code); dev peak = "
        "allocator peak of this process so far (exact for the first row only).")
  for r in results:
    if r["error"]:
      print(f"{r['dtype']} remat={r['remat']}: {r['error']}")
  if _JSON.value:
    print(f"results: {_JSON.value}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
