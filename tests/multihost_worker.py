"""One process of the multi-process tests: `ctran_jax.main`, plus a record of what it computed.

    PYTHONPATH=. python tests/multihost_worker.py --results=PREFIX [--then_eval=WORKDIR] \\
        <ctran_jax.main flags: --config, --workdir, --coordinator_address, ...>

Runs ``ctran_jax.main`` exactly as the command line does (its flags, distributed start,
logging), then, with ``--then_eval``, evaluates that workdir's latest checkpoint in the same
processes. Writes ``PREFIX.<process index>.json`` with the training log and reports that
`train.train_and_evaluate` / `train.evaluate_checkpoint` returned in this process, and the
mesh and partition specs of the final train state.

With ``--save_both=N`` it instead joins the other processes as main does and saves a small
FSDP-sharded state to the latest and the best checkpoints (asynchronously) at each of N
steps: the two managers' saves overlap, which once made their barriers collide.

Faults for tests/test_peer_death.py, in process ``--fault_process`` only: ``--die_at_batch=N``
SIGKILLs it when its N-th batch (training or evaluation, counted from 1) is about to go to
the devices, ``--hang_at_batch=N`` makes it sleep there instead (its heartbeats go on).
"""

from __future__ import annotations

import json

from absl import app, flags

from ctran_jax import main

_RESULTS = flags.DEFINE_string("results", None, "Path prefix of the JSON record.")
_THEN_EVAL = flags.DEFINE_string("then_eval", None, "A workdir whose latest checkpoint to "
                                 "evaluate after the main run.")
_SAVE_BOTH = flags.DEFINE_integer("save_both", 0, "Only save latest + best checkpoints at "
                                  "this many steps into --workdir.")
_FAULT_PROCESS = flags.DEFINE_integer("fault_process", 1, "The process that --die_at_batch "
                                     "or --hang_at_batch applies to.")
_DIE_AT = flags.DEFINE_integer("die_at_batch", 0, "SIGKILL the fault process at its N-th batch.")
_HANG_AT = flags.DEFINE_integer("hang_at_batch", 0, "Sleep (10 minutes) in the fault process "
                                "at its N-th batch.")
flags.mark_flag_as_required("results")


def inject_fault(die_at: int, hang_at: int) -> None:
  """Wrap `sharding.global_batch` (every batch passes there) to die or hang at a batch."""
  import os
  import signal
  import time

  from ctran_jax import sharding

  original, calls = sharding.global_batch, [0]

  def global_batch(*args, **kwargs):
    calls[0] += 1
    if calls[0] == die_at:
      print(f"FAULT: process {_FAULT_PROCESS.value} dies at batch {die_at}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    if calls[0] == hang_at:
      print(f"FAULT: process {_FAULT_PROCESS.value} hangs at batch {hang_at}", flush=True)
      time.sleep(600)
    return original(*args, **kwargs)

  sharding.global_batch = global_batch


def save_both(num_steps: int) -> dict:
  import jax
  import numpy as np

  from ctran_jax import checkpoint, sharding

  main.initialize_distributed(
      coordinator_address=main._COORDINATOR.value, num_processes=main._NUM_PROCESSES.value,
      process_id=main._PROCESS_ID.value, local_device_ids=None, timeout=main._INIT_TIMEOUT.value)
  mesh = sharding.make_mesh(-1, fsdp=2)
  values = {"w": np.arange(64.0, dtype=np.float32).reshape(8, 8), "b": np.ones(3, np.float32)}
  state = jax.jit(lambda: jax.tree.map(jax.numpy.asarray, values),
                  out_shardings=sharding.state_shardings(values, mesh, min_size=16))()
  ckpts = checkpoint.Checkpoints(main._WORKDIR.value, keep=2)
  for step in range(1, num_steps + 1):
    ckpts.save(step, state, {"step_note": step}, best=True)
  ckpts.wait()
  ckpts.close()
  return {"specs": sorted(str(x.sharding.spec) for x in jax.tree.leaves(state))}


def run(argv):
  import jax

  if (_DIE_AT.value or _HANG_AT.value) and main._PROCESS_ID.value == _FAULT_PROCESS.value:
    inject_fault(_DIE_AT.value, _HANG_AT.value)
  if _SAVE_BOTH.value:
    record = save_both(_SAVE_BOTH.value)
  else:
    from ctran_jax import train

    record, originals = {}, {}
    for name in ("train_and_evaluate", "evaluate_checkpoint"):
      originals[name] = getattr(train, name)

      def recorded(*args, _name=name, **kwargs):
        out = originals[_name](*args, **kwargs)
        if "state" in out:  # train_and_evaluate: keep the JSON parts and the state's layout
          leaves = jax.tree.leaves(out["state"])
          record["specs"] = sorted({str(x.sharding.spec) for x in leaves})
          record["mesh"] = dict(leaves[0].sharding.mesh.shape)
          out = {k: v for k, v in out.items() if k != "state"}
        record[_name] = out
        return out

      setattr(train, name, recorded)
    main.main(argv)
    if _THEN_EVAL.value:
      record["then_eval"] = originals["evaluate_checkpoint"](main._CONFIG.value,
                                                             _THEN_EVAL.value)
  record["process"] = [jax.process_index(), jax.process_count(), jax.device_count()]
  with open(f"{_RESULTS.value}.{jax.process_index()}.json", "w") as f:
    json.dump(record, f)


if __name__ == "__main__":
  app.run(run, flags_parser=main.parse_flags)
