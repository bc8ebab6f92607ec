"""EMA of the weights: the update rule, resume exactness, evaluation and export use it."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_run_config

from ctran_jax import checkpoint, ema, export_model, train


def test_decay_warm_up_and_update_rule():
  assert float(ema.decay_at(0, 0.9997, True)) == pytest.approx(0.1)
  assert float(ema.decay_at(90, 0.9997, True)) == pytest.approx(91 / 100)
  assert float(ema.decay_at(10**7, 0.9997, True)) == pytest.approx(0.9997)
  assert float(ema.decay_at(0, 0.9997, False)) == pytest.approx(0.9997)
  average = {"params": {"w": jnp.array([1.0, 2.0])}, "batch_stats": {"m": jnp.array([0.0])}}
  new = ema.update(average, {"w": jnp.array([3.0, 6.0])}, {"m": jnp.array([1.0])}, 10**7,
                   decay=0.5, warmup=False)
  np.testing.assert_allclose(new["params"]["w"], [2.0, 4.0])
  np.testing.assert_allclose(new["batch_stats"]["m"], [0.5])
  with pytest.raises(ValueError, match=r"config.ema.decay=1.0"):
    ema.check_config(tiny_run_config(None, **{"ema.decay": 1.0}).ema)


@pytest.fixture(scope="module")
def ema_run(demo_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ema") / "run")
  config = tiny_run_config(demo_data_dir, **{"ema.decay": 0.9, "ema.evaluate_raw": True})
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_the_average_follows_the_weights_and_evaluation_uses_it(ema_run):
  _, _, result = ema_run
  state = result["state"]
  raw, avg = jax.device_get(state["params"]), jax.device_get(state["ema"]["params"])
  diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(raw),
                                                       jax.tree.leaves(avg), strict=True)]
  assert max(diffs) > 1e-6  # not a copy of the weights
  test = result["reports"]["test"]
  assert "raw_weights" in test and test["raw_weights"]["known"]["0"]["mAP"] != \
      test["known"]["0"]["mAP"]


def test_resume_continues_the_average_exactly(ema_run, tmp_path):
  """Resumed from its step-4 checkpoint, the run ends with the uninterrupted average."""
  config, source, uninterrupted = ema_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  shutil.rmtree(f"{workdir}/checkpoints/8")
  resumed = train.train_and_evaluate(config, workdir)
  assert [r["step"] for r in resumed["train_log"]] == [5, 6, 7, 8]
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"]["ema"])),
                  jax.tree.leaves(jax.device_get(uninterrupted["state"]["ema"])), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_export_writes_the_average(ema_run, tmp_path):
  _, workdir, result = ema_run
  weights, _ = checkpoint.restore_weights(f"{workdir}/checkpoints", 8)
  average = jax.device_get(result["state"]["ema"]["params"])
  flat = jax.tree.leaves(weights["params"])
  np.testing.assert_allclose(sorted(float(np.sum(x)) for x in flat),
                             sorted(float(np.sum(x)) for x in jax.tree.leaves(average)),
                             rtol=1e-5)
  model, _, _ = export_model.checkpoint_model(workdir, "latest")
  assert model is not None
