"""Model cost table: compile time, forward and train-step time, XLA memory analysis.

    python benchmarks/model_step.py                 # C-Tran-R101 224^2 b2 and a tiny config
    python benchmarks/model_step.py --only tiny-64-b8 --steps 20
    python benchmarks/model_step.py --only r101-576-b16 --dtypes float32,bfloat16 \
        --remats none,encoder --no-forward                       # a GPU's train rows

Numbers are per call after compilation (median of --steps runs), on whatever device JAX
picks. A train step is forward + backward + Adam update of every parameter, BatchNorm in
train mode and dropout on, as in reference training. Never asserted in tests: timings on
shared CPUs are noisy; compare rows of one run. Imports only the model modules (no
TensorFlow, ml_collections or clu), so it runs where only jax/flax/optax are installed
(benchmarks/gpu_check.sh uses it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ctran_jax.losses import masked_bce
from ctran_jax.models import CTran
from ctran_jax.models.remat import set_remat

CONFIGS = {
    "r101-224-b2": dict(num_labels=80, image_size=224, batch=2, model=dict(backbone_depth=101)),
    "r101-576-b16": dict(num_labels=80, image_size=576, batch=16,
                         model=dict(backbone_depth=101)),
    "tiny-64-b8": dict(num_labels=16, image_size=64, batch=8, model=dict(
        backbone_depth=0, backbone_width=8, backbone_stage_sizes=(1, 1, 1, 1),
        backbone_block="bottleneck", hidden=64, heads=4, layers=2)),
}


def build(num_labels, model_kwargs, dtype, remat="none"):
  make = lambda: CTran(num_labels, **model_kwargs, dtype=dtype, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.state(make()))()  # one compiled init, not op-by-op
  return set_remat(nnx.merge(graphdef, state), remat)


def timed(fn, *args, steps):
  """(compile seconds, median seconds per call, temp bytes) of a jitted fn."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", float("nan")) if memory else float("nan")
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times), temp


def measure(name, spec, dtype, steps, remat="none", forward=True, batch=None):
  """Times the forward (when `forward`) and the train step of config `spec`; `batch`
  overrides its batch size. Returns the numbers as a dict (fwd: None when not timed)."""
  spec = dict(spec, batch=batch or spec["batch"])
  model = build(spec["num_labels"], spec["model"], dtype, remat)
  b, s, n = spec["batch"], spec["image_size"], spec["num_labels"]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((b, s, s, 3)), jnp.float32)
  labels = jnp.asarray(rng.random((b, n)) < 0.3, jnp.float32)
  states = jnp.where(jnp.asarray(rng.random((b, n)) < 0.5), labels, -1).astype(jnp.int32)

  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x, st: nnx.merge(graphdef, state)(x, st))
  fwd = timed(forward, state, images, states, steps=steps) if forward else None

  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-5)
  opt_state = tx.init(params)

  def train_step(params, rest, opt_state, x, st, y):
    model = nnx.merge(graphdef, params, rest)
    loss, grads = nnx.value_and_grad(lambda m: masked_bce(m(x, st), y, st))(model)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, nnx.state(model, nnx.Not(nnx.Param)), opt_state, loss

  step = jax.jit(train_step)
  trn = timed(step, params, rest, opt_state, images, states, labels, steps=steps)
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  return dict(name=name, dtype=jnp.dtype(dtype).name, remat=remat, params=n_params, fwd=fwd,
              train=trn, batch=b, image_size=s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", choices=sorted(CONFIGS), action="append")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16")
  parser.add_argument("--remats", default="none", help="comma list of none,backbone,encoder,all")
  parser.add_argument("--no-forward", action="store_true", help="time the train step only")
  parser.add_argument("--batch", type=int, help="override the configs' batch size")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}, "
        f"jax {jax.__version__}")
  header = (f"{'config':<13} {'dtype':<8} {'params':>11} | {'fwd compile':>11} {'fwd':>9} "
            f"{'fwd temp':>9} | {'step compile':>12} {'step':>9} {'img/s':>7} {'step temp':>9}")
  print(header)
  print("-" * len(header))
  default = [n for n in CONFIGS if n != "r101-576-b16"]  # 576^2: ask for it (GPU)
  for name in args.only or default:
    for dtype in args.dtypes.split(","):
      for remat in args.remats.split(","):
        r = measure(name, CONFIGS[name], jnp.dtype(dtype), args.steps, remat=remat,
                    forward=not args.no_forward, batch=args.batch)
        (fc, ft, fm), (tc, tt, tm) = r["fwd"] or (float("nan"),) * 3, r["train"]
        label = name if remat == "none" else f"{name}/{remat}"
        print(f"{label:<13} {r['dtype']:<8} {r['params']:>11,} | {fc:>10.1f}s "
              f"{ft * 1e3:>7.0f}ms {fm / 2**20:>7.0f}MB | {tc:>11.1f}s {tt * 1e3:>7.0f}ms "
              f"{r['batch'] / tt:>7.1f} {tm / 2**20:>7.0f}MB", flush=True)


if __name__ == "__main__":
  main()
