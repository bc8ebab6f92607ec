"""The sections of benchmarks/gpu_check.sh (parity, train rows, torch stand-in) and its report.

    python benchmarks/gpu_check.py --section parity --out OUT/parity.json [--tiny]
    python benchmarks/gpu_check.py --collect OUT            # OUT/gpu_check.json + .md

Each section is its own process (a crash or a timeout loses only that section) and writes
one JSON file. Only the standard library is imported at the top, so the ``torch`` section
runs under a python that has torch but not jax, and the others never touch torch. Every
section first blocks TensorFlow, TFDS, ml_collections and clu (``sys.modules[name] =
None``): a GPU machine with only jax/flax/optax/torch must be enough, and an accidental
import of them is an ImportError here rather than a surprise there.

Sections:
- ``env``: platform, devices, versions.
- ``parity``: the converted reference C-Tran-R101 on the synthetic weights of
  tests/data/parity against its golden arrays (backbone features, logits with the golden
  mask and all unknown, attention), at ``jax.default_matmul_precision("highest")``, with
  test_parity.py's tolerances (64^2 and 224^2; ``--tiny``: 64^2 only).
- ``train``: benchmarks/model_step.py's train step, C-Tran-R101 at 576^2 batch 16, float32
  and bfloat16 x remat none / encoder (``--tiny``: its tiny config at 64^2 batch 2, 2 steps,
  float32/none and bfloat16/encoder).
- ``torch``: the PyTorch stand-in (../shared/bench/torch_ctran_step.py) on the same device,
  float32 and bfloat16 autocast, train step and eval.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback

BLOCKED = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")
for _name in BLOCKED:
  sys.modules[_name] = None  # type: ignore[assignment]  # any import of it now fails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_DIR = os.path.join(ROOT, "tests", "data", "parity")
DEFAULT_TORCH_SCRIPT = os.path.join(os.path.dirname(ROOT), "shared", "bench",
                                    "torch_ctran_step.py")
SECTIONS = ("env", "parity", "train", "torch")
# test_parity.py's tolerances: relative max for features, absolute for the rest.
TOLERANCES = {"features": 1e-4, "logits": 1e-4, "logits_allunk": 1e-4, "attention": 1e-5}
TRAIN_ROWS = (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "encoder"),
              ("float32", "encoder"))
TINY_TRAIN_ROWS = (("float32", "none"), ("bfloat16", "encoder"))  # each code path once


def load_path(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def imported_forbidden() -> list[str]:
  """Blocked modules that something managed to import anyway (should stay empty)."""
  return [m for m in BLOCKED if sys.modules.get(m) is not None]


def write(path: str, result: dict) -> None:
  result["forbidden_imported"] = imported_forbidden()
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


# ----------------------------------------------------------------------------- sections

def section_env(tiny: bool) -> dict:
  import flax
  import jax
  import optax

  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": platform.python_version()}


def section_parity(tiny: bool) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from ctran_jax import convert

  sw = load_path("synthetic_weights", os.path.join(ROOT, "tests", "synthetic_weights.py"))
  with np.load(os.path.join(PARITY_DIR, "ctran_coco_r101.npz")) as f:
    golden = {k: f[k] for k in f.files}
  weights = sw.synthetic_state_dict(os.path.join(PARITY_DIR, "spec_ctran_coco.json"),
                                    int(golden["weights_seed"]))
  fingerprint_ok = sw.sha256_fingerprint(weights) == str(golden["param_sha256"])
  rows = []
  with jax.default_matmul_precision("highest"):
    model = convert.from_reference(weights, heads=4)
    backbone = nnx.jit(lambda m, x: m.backbone(x))
    classify = nnx.jit(lambda m, f, s: m.classify_features(f, s))
    for size in (64,) if tiny else (64, 224):
      images = np.transpose(golden[f"images_{size}"], (0, 2, 3, 1))
      features = np.asarray(backbone(model, images))
      want = np.transpose(golden[f"feat_{size}"], (0, 2, 3, 1))
      out = classify(model, features, golden["mask"])
      allunk = classify(model, features, golden["mask_all_unknown"])
      errors = {
          "features": float(np.abs(features - want).max() / np.abs(want).max()),
          "logits": float(np.abs(np.asarray(out["logits"]) - golden[f"logits_{size}"]).max()),
          "logits_allunk": float(np.abs(np.asarray(allunk["logits"])
                                        - golden[f"logits_{size}_allunk"]).max()),
          "attention": float(np.abs(np.asarray(out["attention"])
                                    - golden[f"attn_{size}"]).max()),
      }
      for what, err in errors.items():
        rows.append({"size": size, "what": what, "max_error": err,
                     "tolerance": TOLERANCES[what], "ok": err < TOLERANCES[what]})
  return {"matmul_precision": "highest", "weights_fingerprint_ok": fingerprint_ok,
          "rows": rows, "ok": fingerprint_ok and all(r["ok"] for r in rows)}


def section_train(tiny: bool, out_path: str) -> dict:
  import jax.numpy as jnp

  ms = load_path("model_step", os.path.join(ROOT, "benchmarks", "model_step.py"))
  name, steps, batch = ("tiny-64-b8", 2, 2) if tiny else ("r101-576-b16", 3, None)
  result = {"config": name, "spec": ms.CONFIGS[name], "steps": steps, "rows": []}
  for dtype, remat in TINY_TRAIN_ROWS if tiny else TRAIN_ROWS:
    row = {"dtype": dtype, "remat": remat}
    try:
      r = ms.measure(name, ms.CONFIGS[name], jnp.dtype(dtype), steps, remat=remat,
                     forward=False, batch=batch)
      compile_s, step_s, temp = r["train"]
      row.update(compile_s=compile_s, step_s=step_s, images_per_s=r["batch"] / step_s,
                 temp_mb=temp / 2**20, batch=r["batch"], image_size=r["image_size"],
                 params=r["params"])
    except Exception as e:  # noqa: BLE001  (an OOM or a failed compile: keep the others)
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    result["rows"].append(row)
    write(out_path, dict(result, partial=True))  # a timeout keeps the rows done so far
  return result


def section_torch(tiny: bool, torch_script: str) -> dict:
  import torch

  ref = load_path("torch_ctran_step", torch_script)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  size, batch, warmup, steps = (64, 1, 1, 1) if tiny else (576, 16, 2, 5)
  num_labels = 80
  torch.manual_seed(0)
  # The stand-in builds torch.eye(...) inside forward: the default device puts it beside
  # the activations.
  torch.set_default_device(device)
  model = ref.CTranLike(num_labels)
  opt = torch.optim.Adam(model.parameters(), lr=1e-5)
  g = torch.Generator(device="cpu").manual_seed(1)
  images = torch.randn(batch, 3, size, size, generator=g, device="cpu").to(device)
  labels = (torch.rand(batch, num_labels, generator=g, device="cpu") < 0.04).float().to(device)
  known = (torch.rand(batch, num_labels, generator=g, device="cpu") < 0.375).to(device)
  states = torch.where(known, labels, torch.full_like(labels, -1.0))

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def timed(fn):
    for _ in range(warmup):
      fn()
    sync()
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  rows = []
  for dtype in ("float32", "bfloat16"):
    autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def train_step(autocast=autocast):
      model.train()
      with torch.autocast(**autocast):
        logits = model(images, states)
      loss = torch.nn.functional.binary_cross_entropy_with_logits(
          logits.float(), labels, reduction="none")
      (loss * (states == -1)).sum().backward()
      opt.step()
      opt.zero_grad()

    def eval_step(autocast=autocast):
      model.eval()
      with torch.no_grad(), torch.autocast(**autocast):
        model(images, torch.full_like(states, -1.0))

    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    step_s = timed(train_step)
    eval_s = timed(eval_step)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    rows.append({"dtype": dtype if dtype == "float32" else "bfloat16 autocast",
                 "step_s": step_s, "images_per_s": batch / step_s, "eval_s": eval_s,
                 "peak_mb": peak, "batch": batch, "image_size": size})
  return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
          "script": torch_script, "rows": rows}


# ----------------------------------------------------------------------------- report

def _f(value, spec):
  return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
  s = report["sections"]
  env = s.get("env", {})
  lines = [f"device: {env.get('platform', '?')} {env.get('device_kind', '?')} "
           f"x{env.get('device_count', '?')}, jax {env.get('jax', '?')}, "
           f"flax {env.get('flax', '?')}", ""]
  for name in SECTIONS:
    sec = s.get(name, {})
    if sec.get("status") != "ok":
      lines.append(f"{name}: {sec.get('status', 'missing')} {sec.get('error', '')}".rstrip())
  parity = s.get("parity", {})
  if parity.get("rows"):
    lines += ["", f"parity (matmul precision {parity['matmul_precision']}, weights "
              f"fingerprint {'ok' if parity['weights_fingerprint_ok'] else 'WRONG'}): "
              f"{'PASS' if parity['ok'] else 'FAIL'}",
              "| size | output | max error | tolerance | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['what']} | {r['max_error']:.2e} | {r['tolerance']:.0e} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in parity["rows"]]
  lines += ["", "| side | config | dtype | remat | train step ms | img/s | eval ms | compile s "
            "| memory MB |", "|---|---|---|---|---|---|---|---|---|"]
  train = s.get("train", {})
  for r in train.get("rows", []):
    if "error" in r:
      lines.append(f"| ours | {train['config']} | {r['dtype']} | {r['remat']} | "
                   f"{r['error']} | | | | |")
      continue
    lines.append(f"| ours | {train['config']} b{r['batch']} | {r['dtype']} | {r['remat']} | "
                 f"{r['step_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | - | "
                 f"{r['compile_s']:.1f} | {r['temp_mb']:,.0f} (XLA temp) |")
  torch_sec = s.get("torch", {})
  for r in torch_sec.get("rows", []):
    config = f"R101 {r['image_size']}^2 b{r['batch']}"
    lines.append(f"| torch ({torch_sec['device']}) | {config} | {r['dtype']} | none | "
                 f"{r['step_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                 f"{r['eval_s'] * 1e3:.1f} | eager | {_f(r['peak_mb'], ',.0f')} (peak) |")
  return "\n".join(lines)


def collect(out_dir: str) -> dict:
  report = {"sections": {}, "tiny": os.environ.get("GPU_CHECK_TINY") == "1"}
  for name in SECTIONS:
    path = os.path.join(out_dir, f"{name}.json")
    rc_path = os.path.join(out_dir, f"{name}.rc")
    rc = open(rc_path).read().strip() if os.path.exists(rc_path) else None
    if os.path.exists(path):
      with open(path) as f:
        sec = json.load(f)
    else:
      sec = {"status": "missing"}
    if rc not in (None, "0") and sec.get("status") in (None, "ok", "missing"):
      sec["status"] = "timed out" if rc in ("124", "137") else f"exit {rc}"
      sec.setdefault("error", f"see {name}.log")
    report["sections"][name] = sec
  report["forbidden_imported"] = sorted({m for sec in report["sections"].values()
                                         for m in sec.get("forbidden_imported", [])})
  with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
  text = table(report)
  with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  return report


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--section", choices=SECTIONS)
  ap.add_argument("--out", help="the section's JSON file")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
  ap.add_argument("--torch-script", default=DEFAULT_TORCH_SCRIPT)
  ap.add_argument("--collect", metavar="DIR", help="merge DIR's sections and print the table")
  a = ap.parse_args(argv)
  if a.collect:
    collect(a.collect)
    return 0
  t0 = time.perf_counter()
  try:
    if a.section == "train":
      result = section_train(a.tiny, a.out)
    elif a.section == "torch":
      result = section_torch(a.tiny, a.torch_script)
    else:
      result = {"env": section_env, "parity": section_parity}[a.section](a.tiny)
    result["status"] = "ok"
  except Exception as e:  # noqa: BLE001  (reported in the JSON, the other sections go on)
    traceback.print_exc()
    result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
  result["wall_s"] = time.perf_counter() - t0
  write(a.out, result)
  return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
  sys.exit(main())
