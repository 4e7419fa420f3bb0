"""bench/device_check.py --smoke: every step of the GPU check runs, on the CPU at tiny sizes."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

CHECK = [sys.executable, str(ROOT / "bench" / "device_check.py")]


def test_smoke_mode_runs_every_step_and_reports_it(tmp_path):
    proc = subprocess.run([*CHECK, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {n: r["status"] for n, r in results.items()} == {str(n): "ok" for n in range(1, 7)}, results
    report = (tmp_path / "report.md").read_text()
    assert all(f"\n## {n}. " in report for n in range(1, 7))
    default = results["1"]
    assert default["summary"]["data"] == "fresh every epoch" and default["summary"]["best_val_acc"] > 0.9
    assert len(default["curve"]) == default["summary"]["epochs"] and "ended by" in report.split("\n## 2.")[0]
    assert len(default["last_ckpt_copy_and_write_seconds"]) == 3 and default["last_ckpt_bytes"] > 0
    assert "| epoch | seconds into training | epoch seconds | of them training steps |" in report
    assert any(line.startswith("default (auto: ") for line in results["2"]["table"])  # the compare bench's rows
    assert any(line.startswith("32-true ") for line in results["2"]["tiny_table"])  # and at tiny shapes
    assert results["3"]["deterministic_identical"] is True
    assert results["4"]["exit_status"] == 143 and results["4"]["resume_identical"] is True
    assert results["5"]["summary"]["data"] == "fixed" and results["5"]["summary"]["best_val_acc"] > 0.8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_a_gpu_it_asks_for_smoke_mode(tmp_path):
    proc = subprocess.run([*CHECK, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr
