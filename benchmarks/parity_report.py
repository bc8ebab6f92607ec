"""Print the measured distance to every golden array of the reference C-Tran (CPU, ~1 min).

    python benchmarks/parity_report.py

tests/test_parity.py asserts the tolerances; this script prints the actual numbers quoted
in the README (max abs error unless the row says otherwise).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from synthetic_weights import PARITY_DIR, synthetic_state_dict  # noqa: E402

from ctran_jax import convert  # noqa: E402
from ctran_jax.losses import masked_bce  # noqa: E402


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def rel_to_max(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def max_abs(got, want):
  return float(np.abs(np.asarray(got) - want).max())


def gradient_errors(model, golden):
  def loss(m, x, s, y):
    return masked_bce(m(x, s), y, s)

  grads = dict(nnx.to_flat_state(nnx.jit(nnx.grad(loss))(
      model, nhwc(golden["images_64"]), golden["mask"], golden["labels"])))
  layout = convert.torch_layout(model)
  out = {}
  for key in golden:
    if key.startswith("grad_64__"):
      path, _, to_flax, _ = layout[key[len("grad_64__"):]]
      out[key[len("grad_64__"):]] = rel_to_max(grads[path][...], to_flax(golden[key]))
  return out


def main():
  with np.load(PARITY_DIR / "ctran_coco_r101.npz") as f:
    golden = {k: f[k] for k in f.files}
  weights = synthetic_state_dict(str(PARITY_DIR / "spec_ctran_coco.json"), 0)
  model = convert.from_reference(weights)
  backbone = nnx.jit(lambda m, x: m.backbone(x))
  classify = nnx.jit(lambda m, f, s: m.classify_features(f, s))
  rows = []
  for size in (64, 224):
    features = backbone(model, nhwc(golden[f"images_{size}"]))
    rows.append((f"feature map {size}² (/ max)", rel_to_max(features,
                                                            nhwc(golden[f"feat_{size}"]))))
    out = classify(model, features, golden["mask"])
    variants = {"mask": out, "all unknown": classify(model, features, golden["mask_all_unknown"]),
                "use_lmt off": classify(nnx.view(model, use_lmt=False), features, golden["mask"])}
    for name, suffix in (("mask", ""), ("all unknown", "_allunk"), ("use_lmt off", "_nolmt")):
      rows.append((f"logits {size}², {name}",
                   max_abs(variants[name]["logits"], golden[f"logits_{size}{suffix}"])))
    rows.append((f"attention {size}²", max_abs(out["attention"], golden[f"attn_{size}"])))
    for which, states in (("unk", golden["mask"]), ("all", None)):
      loss = float(masked_bce(out["logits"], golden["labels"], states))
      want = float(golden[f"loss_{which}_sum_{size}"])
      rows.append((f"loss_{which}_sum {size}² (relative)", abs(loss - want) / want))
    if size == 64:
      rows.append(("input LayerNorm output 64²", max_abs(out["tokens"],
                                                         golden["embeddings_ln_64"])))
      rows.append(("last hidden state 64²", max_abs(out["hidden"], golden["hidden_out_64"])))
  for name, err in gradient_errors(model, golden).items():
    rows.append((f"grad {name} float32 (/ max)", err))
  with jax.enable_x64(True):
    model64 = convert.from_reference(weights, dtype=jnp.float64)
    for name, err in gradient_errors(model64, golden).items():
      rows.append((f"grad {name} float64 (/ max)", err))
  train = convert.from_reference(weights, dropout=0.0)
  train.train()
  logits = nnx.jit(lambda m, x, s: m(x, s))(train, nhwc(golden["images_64"]), golden["mask"])
  rows.append(("train-mode BN logits 64²", max_abs(logits, golden["logits_64_trainbn_nodropout"])))
  for bn, module in (("bn1", train.backbone.bn1), ("layer4.2.bn3", train.backbone.layer4[2].bn3)):
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      rows.append((f"{bn}.{theirs} after train fwd (/ max)",
                   rel_to_max(getattr(module, ours)[...],
                              golden[f"after_train_fwd__{bn}.{theirs}"])))
  width = max(len(r[0]) for r in rows)
  print(f"{'golden array':<{width}}  error")
  for name, err in rows:
    print(f"{name:<{width}}  {err:.2e}")


if __name__ == "__main__":
  main()
