"""Two CPU processes (gloo) train one model, whether this script or torchrun starts them."""

import re
import subprocess
import sys

import torch

from conftest import ROOT, TINY, free_port, run_train, summary
from train import SumSignDataset, SumSignModel

DDP = [*TINY, "--accelerator", "cpu", "--devices", "2", "--max-epochs", "15"]


def check_one_run(workdir, stdout, stderr):
    assert len(re.findall(r"^batch size: \d+ per device", stdout, re.M)) == 1  # tuned once
    assert len(re.findall(r"Finding best initial lr:\s+0%", stdout + stderr)) == 1  # one LR finder in the job
    assert len(re.findall(r"^learning rate: ", stdout, re.M)) == 1
    assert len(re.findall(r"^best checkpoint: ", stdout, re.M)) == 1
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]
    run = workdir / "lightning_logs" / "version_0"
    assert len(list(run.glob("summary.json"))) == 1 and (run / "lr_finder.png").is_file()
    s = summary(run)
    # 4000 samples over 2 ranks: at least 64 steps an epoch on each
    assert s["batch_size"] <= 2000 // 64 and s["best_val_acc"] >= 0.95
    model = SumSignModel.load_from_checkpoint(s["checkpoint"], map_location="cpu").eval()
    x, y = SumSignDataset(2000, 32, seed=1234, split="val").__getitems__(list(range(2000)))
    with torch.no_grad():
        accuracy = ((model(x) > 0.5).float() == y).float().mean().item()
    assert accuracy >= 0.95
    return s


def test_script_starts_its_own_ranks(workdir):
    proc = run_train(*DDP, cwd=workdir)
    check_one_run(workdir, proc.stdout, proc.stderr)


def test_torchrun_starts_the_ranks(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "train.py"), *DDP],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_one_run(workdir, proc.stdout, proc.stderr)
