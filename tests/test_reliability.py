"""Reruns reproduce, interruptions lose nothing, divergence stops the run."""

import re
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, interrupt_after_first_epoch, run_train, start_train, summary

# An epoch of about a second on 2 cores, so a signal lands in the middle of one.
MEDIUM = ["--features", "512", "--train-samples", "16000", "--val-samples", "500", "--hidden", "256",
          "--max-epochs", "4", "--patience", "10"]
TIMINGS = ("tune_seconds", "fit_seconds", "total_seconds", "train_samples_per_second", "peak_rss_bytes",
           "checkpoint", "last_checkpoint")


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(run_dir):
    return {k: v for k, v in summary(run_dir).items() if k not in TIMINGS}


def test_reruns_are_bit_identical_and_seed_matters(workdir):
    flags = [*TINY, "--max-epochs", "6"]
    for _ in range(2):
        run_train(*flags, cwd=workdir)
    run_train(*flags, "--seed", "43", cwd=workdir)
    runs = [workdir / "lightning_logs" / f"version_{i}" for i in range(3)]
    a, b, c = (summary(r) for r in runs)
    assert metrics(runs[0]) == metrics(runs[1])
    assert_same_weights(weights(a["checkpoint"]), weights(b["checkpoint"]))
    assert_same_weights(weights(a["last_checkpoint"]), weights(b["last_checkpoint"]))
    assert not torch.equal(weights(a["last_checkpoint"])["hidden.weight"], weights(c["last_checkpoint"])["hidden.weight"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_matches_the_uninterrupted_run(workdir, sig):
    run_train(*MEDIUM, cwd=workdir)
    full = workdir / "lightning_logs" / "version_0"
    last = workdir / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    rc, out, err, seconds = interrupt_after_first_epoch(start_train(*MEDIUM, cwd=workdir), last, sig)
    assert rc == 128 + sig, err[-2000:]
    assert seconds < 10
    assert f"last complete checkpoint: {last.resolve()}" in out or f"last complete checkpoint: {last}" in out
    resume = re.search(r"^resume with: (.+)$", out, re.M).group(1)
    assert resume.endswith(f"--resume {last}") or resume.endswith(f"--resume {last.resolve()}")
    saved = torch.load(last, map_location="cpu", weights_only=False)  # complete, loadable
    assert "EarlyStopping" in "".join(saved["callbacks"])
    completed = EventAccumulator(str(last.parent.parent)).Reload().Scalars("val_loss")
    assert saved["epoch"] == len(completed) - 1 < 3  # the last completed epoch, not a partial one

    proc = run_train(*MEDIUM, "--resume", str(last), cwd=workdir)
    assert "batch size:" not in proc.stdout and "learning rate:" not in proc.stdout  # no tuning
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    resumed = workdir / "lightning_logs" / "version_1"
    assert metrics(resumed) == metrics(full)
    assert_same_weights(weights(summary(resumed)["last_checkpoint"]), weights(summary(full)["last_checkpoint"]))
    assert_same_weights(weights(summary(resumed)["checkpoint"]), weights(summary(full)["checkpoint"]))


def test_divergence_stops_the_run_with_status_1(workdir):
    proc = run_train(*TINY, "--no-lr-find", "--lr", "1e30", "--max-epochs", "30", cwd=workdir, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(re.findall(r"^training diverged .*lr 1e\+30", proc.stdout, re.M)) == 1
    s = summary(workdir / "lightning_logs" / "version_0")
    assert s["diverged"] is True and s["epochs"] < 30
    if s["checkpoint"]:
        assert all(torch.isfinite(t).all() for t in weights(s["checkpoint"]).values())
