"""What a user sees: the console of a short run, --help, the config listing, log files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, TINY_RUN, write_config_file

from ctran_jax import console, main


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "ctran_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_console_of_a_three_evaluation_run(tmp_path):
  """A fresh data_dir (the demo is generated), 12 steps, evaluations at 4, 8 and 12."""
  config = write_config_file(tmp_path / "tiny.py", **{
      **TINY_RUN, "data.data_dir": str(tmp_path / "tfds"), "num_train_steps": 12,
      "log_every_steps": 4, "checkpoint_every_steps": 12})
  out = run_main(f"--config={config}", f"--workdir={tmp_path / 'run'}",
                 "--config.seed=3")
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout + out.stderr
  lines = [line for line in text.splitlines() if line.strip()]
  assert len(lines) < 60, "\n".join(lines)
  assert "Downloading" not in text and "Traceback" not in text
  assert not re.search(r"^[IWE]\d{4} ", text, re.M), "absl/TF C++ formatted lines"
  assert "All log messages before absl::InitializeLog" not in text
  assert "oneDNN" not in text and "CounterV2" not in text and "work unit notes" not in text
  # The header, then progress, evaluations, checkpoints and the tables.
  for expected in (f"ctran_jax train  {config}  overrides: --config.seed=3",
                   f"workdir  {tmp_path / 'run'}",
                   "generating ctran_demo/tiny (240/60/100 images): done in",
                   "dataset  ctran_demo/tiny: 16 labels; train 240, validation 60, test 100",
                   "devices  ", "mesh data=", "model    C-Tran, ResNet 8-wide", " parameters",
                   "(first step, compilation included:", "ETA",
                   "eval     validation @ 12: mAP", "saved    checkpoint 12",
                   "ctran_demo/tiny / test @ step 12", "results: "):
    assert expected in text, expected
  assert len(re.findall(r"eval     validation @ \d+", text)) == 3
  assert len(re.findall(r"^\d\d:\d\d:\d\d step +\d+/12 ", text, re.M)) == 3
  # Everything else went to the workdir.
  run = tmp_path / "run"
  assert json.loads((run / "config.json").read_text())["seed"] == 3
  log = (run / "log.txt").read_text()
  assert "config:\n" in log and "step 12/12" in log and len(log.splitlines()) > len(lines)


@pytest.mark.slow  # CI time; run with -m slow
def test_verbose_brings_back_the_full_log(tmp_path, demo_data_dir):
  config = write_config_file(tmp_path / "tiny.py", **{
      **TINY_RUN, "data.data_dir": demo_data_dir, "num_train_steps": 1, "eval_every_steps": 1,
      "checkpoint_every_steps": 1})
  out = run_main(f"--config={config}", f"--workdir={tmp_path / 'run'}", "--verbose")
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^I\d{4} .*main\.py:\d+\] config:", out.stderr, re.M)


def test_help_exits_zero_and_names_show_config():
  out = run_main("--help", timeout=120)
  assert out.returncode == 0
  assert "--mode=show_config" in out.stdout and "--config.<key>=<value>" in out.stdout


def test_show_config_lists_every_key_with_value_and_comment():
  out = run_main("--config=configs/coco.py", "--mode=show_config", timeout=120)
  assert out.returncode == 0, out.stderr
  rows = {line.split()[0]: line for line in out.stdout.splitlines()}
  assert "model.backbone_depth" in rows and "101" in rows["model.backbone_depth"]
  assert "# 0: the tiny stage_sizes/block below; else 18..152" in rows["model.backbone_depth"]
  assert "'sum'" in rows["loss.reduction"] and "lmt.all_unknown_fraction" in rows
  # coco.py's own comment wins over default.py's for the keys it sets.
  assert "# val2014 is the reference's validation and test set" in rows["data.test_split"]


def test_comments_are_read_from_the_config_files(tmp_path):
  (tmp_path / "default.py").write_text("c.a = 1  # from default\nc.b.c = 2  # inner\n")
  (tmp_path / "mine.py").write_text("c.a = 3  # mine\nc.a = 4  # a variant\n")
  comments = main.config_comments(str(tmp_path / "mine.py") + ":variant")
  assert comments == {"a": "mine", "b.c": "inner"}


def test_native_noise_is_dropped_and_everything_else_kept(capfd):
  with console.quiet_native_stderr():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                b"written to STDERR\n")
    os.write(2, b"I0000 00:00:1796191839.682575   28510 port.cc:153] oneDNN custom "
                b"operations are on. You may see slightly different numerical results\n")
    os.write(2, b"E0000 something real went wrong\n")
  err = capfd.readouterr().err
  assert err.strip() == "E0000 something real went wrong"


def test_progress_bar_in_a_log_file(capsys):
  bar = console.ProgressBar(8, "generating x", stream=sys.stdout)
  for _ in range(8):
    bar.update()
  bar.close()
  lines = capsys.readouterr().out.splitlines()
  assert lines[:4] == [f"generating x: {p}%" for p in (0, 25, 50, 75)]
  assert len(lines) == 5 and lines[-1].startswith("generating x: done in")
