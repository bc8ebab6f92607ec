"""benchmarks/step_breakdown.py: the attribution of profiler events to model parts, and the
script end to end on a tiny model (timings are never asserted, only their bookkeeping)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "step_breakdown.py")
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user


@pytest.fixture(scope="module")
def breakdown():
  spec = importlib.util.spec_from_file_location("step_breakdown", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# As XLA prints it: a frame's parent_frame_id is its caller's id + 1 (0: no caller).
HLO = """HloModule jit_train_step, is_scheduled=true

FileNames
1 "/x/ctran_jax/train.py"
2 "/x/ctran_jax/models/resnet.py"
3 "/x/site-packages/flax/nnx/nn/linear.py"
4 "/x/site-packages/optax/_src/transform.py"
5 "/x/ctran_jax/models/transformer.py"

FunctionNames
1 "f"

FileLocations
1 {file_name_id=1 function_name_id=1 line=1 end_line=1 column=1 end_column=2}
2 {file_name_id=2 function_name_id=1 line=2 end_line=2 column=1 end_column=2}
3 {file_name_id=3 function_name_id=1 line=3 end_line=3 column=1 end_column=2}
4 {file_name_id=4 function_name_id=1 line=4 end_line=4 column=1 end_column=2}
5 {file_name_id=5 function_name_id=1 line=5 end_line=5 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=2}
5 {file_location_id=5 parent_frame_id=2}
6 {file_location_id=3 parent_frame_id=6}

%fused_computation.1 (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %a = f32[4]{0} add(%p0, %p0), metadata={op_name="jit(s)/transpose(jvp())/add" stack_frame_id=3}
  ROOT %b = f32[4]{0} multiply(%a, %a), metadata={op_name="transpose(jvp())/mul" stack_frame_id=3}
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %conv.1 = f32[4]{0} convolution(%x, %x), metadata={op_name="jit(s)/jvp()/conv" stack_frame_id=3}
  %dot.2 = f32[4]{0} dot(%conv.1, %x), metadata={op_name="jvp()/dot" stack_frame_id=6}
  %fusion.3 = f32[4]{0} fusion(%dot.2), kind=kLoop, calls=%fused_computation.1
  ROOT %adam.4 = f32[4]{0} multiply(%fusion.3, %x), metadata={op_name="jit(s)/mul" stack_frame_id=4}
}
"""


def test_instructions_get_the_part_of_their_innermost_known_frame(breakdown):
  parts = breakdown.instruction_parts(HLO)
  # flax's Linear called from resnet.py is ResNet; called from transformer.py, encoder.
  assert parts["conv.1"] == ("ResNet", "forward")
  assert parts["dot.2"] == ("encoder", "forward")
  # A fusion takes its members' label: reverse-mode ops are backward.
  assert parts["fusion.3"] == ("ResNet", "backward")
  assert parts["adam.4"] == ("optimizer update", "update")


def write_trace(directory, events):
  os.makedirs(directory / "plugins" / "profile" / "run")
  with gzip.open(directory / "plugins" / "profile" / "run" / "perfetto_trace.json.gz",
                 "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_nested_thunks_are_not_counted_twice(breakdown, tmp_path):
  x = {"ph": "X", "pid": 1}
  write_trace(tmp_path, [
      {**x, "tid": 1, "name": "cond.1", "ts": 0, "dur": 100},       # runs the next two
      {**x, "tid": 1, "name": "fusion.2", "ts": 10, "dur": 30},
      {**x, "tid": 1, "name": "fusion.2", "ts": 50, "dur": 20},
      {**x, "tid": 2, "name": "conv.3", "ts": 20, "dur": 50},       # another thread
      {**x, "tid": 1, "name": "ThunkExecutor", "ts": 0, "dur": 500},  # not a thunk
      {**x, "tid": 1, "name": "conv.3", "ts": 200, "dur": 5},
  ])
  totals = breakdown.thunk_times(str(tmp_path), {"cond.1", "fusion.2", "conv.3"})
  assert totals == {"cond.1": 50.0, "fusion.2": 50.0, "conv.3": 55.0}


def test_end_to_end_on_a_tiny_model(tmp_path):
  out = tmp_path / "b.json"
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--model", "tiny", "--size", "32", "--batch", "2",
       "--num-labels", "6", "--warmup", "1", "--steps", "2", "--json", str(out)],
      cwd=REPO, env={**ENV, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  train = result["train"]["parts"]
  for key in ("ResNet|forward", "ResNet|backward", "encoder|forward", "encoder|backward",
              "optimizer update|update"):
    assert train.get(key, 0) > 0, (key, train)
  assert sum(train.values()) == pytest.approx(result["train"]["traced_s"])
  assert not any(k.endswith("|backward") for k in result["eval"]["parts"])
  assert "| ResNet |" in proc.stdout and "step wall time" in proc.stdout
  assert result["train_memory"]["alias"] > 0  # the trainer's donated step


@pytest.mark.parametrize("script,args,message", [
    ("step_breakdown.py", ["--size", "33"], "positive multiple of 32"),
    ("step_breakdown.py", ["--steps", "0"], "--steps must be at least 1"),
    ("vs_torch.py", ["--shapes", "224y2"], "is not SIZExBATCH"),
    ("vs_torch.py", ["--shapes", "64x0"], "the batch at least 1"),
    ("torch_breakdown.py", ["--torch-script", "/no/such/file.py"], "no such file"),
])
def test_bad_arguments_are_one_usage_line(script, args, message):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                        cwd=REPO, env={**ENV, "PYTHONPATH": REPO}, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert message in proc.stderr and "Traceback" not in proc.stderr
