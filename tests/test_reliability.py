"""Reruns reproduce, interruptions lose nothing and leave nothing behind, divergence and a GPU out of
memory stop the run, summary.json is strict JSON."""

import json
import os
import re
import shlex
import signal
import sys
import threading

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import (ROOT, TINY, WIDE, interrupt_after_first_epoch, run_train, start_train, summary, train_in_process,
                      wait_for)

# An epoch of about a second on 2 cores, so a signal lands in the middle of one.
MEDIUM = ["--features", "2048", "--train-samples", "16000", "--val-samples", "500", "--hidden", "512",
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


def strict_json(path):
    """json.loads that refuses NaN and Infinity, which Python's json module writes by default."""
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("data", [["--fixed-data"], []], ids=["fixed", "fresh"])
def test_reruns_are_bit_identical_and_seed_matters(workdir, data):
    flags = [*TINY, *data, "--max-epochs", "6"]
    for _ in range(2):  # each in a fresh process, as a user reruns
        run_train(*flags, cwd=workdir)
    train_in_process(*flags, "--seed", "43")
    runs = [workdir / "lightning_logs" / f"version_{i}" for i in range(3)]
    a, b, c = (summary(r) for r in runs)
    assert metrics(runs[0]) == metrics(runs[1])
    assert_same_weights(weights(a["checkpoint"]), weights(b["checkpoint"]))
    assert_same_weights(weights(a["last_checkpoint"]), weights(b["last_checkpoint"]))
    seeded = [weights(s["last_checkpoint"])["hidden.weight"] for s in (a, c)]
    assert not torch.equal(*seeded)


@pytest.mark.parametrize("sig,data", [(signal.SIGINT, ["--fixed-data"]), (signal.SIGTERM, [])],
                         ids=["SIGINT-fixed", "SIGTERM-fresh"])
def test_interrupt_then_resume_matches_the_uninterrupted_run(workdir, sig, data):
    flags = [*MEDIUM, *data]
    train_in_process(*flags)
    full = workdir / "lightning_logs" / "version_0"
    last = workdir / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    rc, out, err, seconds = interrupt_after_first_epoch(start_train(*flags, cwd=workdir), last, sig)
    assert rc == 128 + sig, err[-2000:]
    assert seconds < 10 and "Traceback" not in err
    # the command that was run, with --resume added: run as printed, it continues the run
    hint = re.search(rf"^interrupted by {sig.name} during training; resume with: (.+)$", out, re.M).group(1)
    assert shlex.split(hint) == ["python", os.path.relpath(ROOT / "train.py", workdir), *flags,
                                 "--resume", str(last.resolve())]
    saved = torch.load(last, map_location="cpu", weights_only=False)  # complete, loadable
    assert "EarlyStopping" in "".join(saved["callbacks"])
    assert summary(last.parent.parent)["ended_by"] == f"interrupted ({sig.name})"
    completed = EventAccumulator(str(last.parent.parent)).Reload().Scalars("val_loss")
    assert saved["epoch"] == len(completed) - 1 < 3  # the last completed epoch, not a partial one

    proc = run_train(*shlex.split(hint)[2:], cwd=workdir)
    assert "batch size:" not in proc.stdout and "learning rate:" not in proc.stdout  # no tuning
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    resumed = workdir / "lightning_logs" / "version_1"
    assert metrics(resumed) == metrics(full)
    assert_same_weights(weights(summary(resumed)["last_checkpoint"]), weights(summary(full)["last_checkpoint"]))
    assert_same_weights(weights(summary(resumed)["checkpoint"]), weights(summary(full)["checkpoint"]))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_lr_finder_stops_cleanly(workdir, sig):
    # At the default width the LR finder validates when it stops early; 3000 steps give time to land in it.
    proc = start_train(*WIDE, "--lr-find-steps", "3000", cwd=workdir)
    wait_for(".tuning-*/.lr_find_*.ckpt", proc, workdir / "lightning_logs")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1] == (f"interrupted by {sig.name} during the LR finder; no epoch had completed, so there is "
                         "nothing to resume: run the same command to start over")
    assert [p.name for p in (workdir / "lightning_logs").glob(".*")] == []  # no temporary checkpoint left


def test_divergence_stops_the_run_with_status_1(workdir):
    flags = [*TINY, "--no-lr-find", "--lr", "1e30", "--max-epochs", "30"]
    run = workdir / "lightning_logs" / "version_0"
    # run, then resumed as the line for an interrupted run would be: it ends as it did, no epoch more, same report
    reports = []
    for resume in ([], ["--resume", str(run / "checkpoints" / "last.ckpt")]):
        proc = run_train(*flags, *resume, cwd=workdir, check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert len(re.findall(r"^training diverged at epoch 0: .*lr 1e\+30", proc.stdout, re.M)) == 1
        s = strict_json(run / "summary.json")
        assert s["ended_by"] == "diverged" and s["epochs"] == 1
        # the only "best" checkpoint held the non-finite weights of epoch 0: removed, and no metrics claimed
        assert s["checkpoint"] is None and s["best_val_loss"] is None and s["best_val_acc"] is None
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
        reports.append(metrics(run))
    assert reports[1] == reports[0]


def test_running_out_of_gpu_memory_ends_the_run_in_one_line(workdir, capsys, monkeypatch):
    step = train.SumSignModel.training_step

    def out_of_memory_in_epoch_1(self, batch, batch_idx):  # as a batch too big for what the GPU has left
        if self.current_epoch == 1:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "3.12 GiB is free. Including non-PyTorch memory, this process has 76.06 GiB memory in use. Of the "
                "allocated memory 75.20 GiB is allocated by PyTorch.\nSee documentation for Memory Management")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(train.SumSignModel, "training_step", out_of_memory_in_epoch_1)
    assert train.main([*TINY, "--max-epochs", "3"]) == 1
    err = capsys.readouterr().err  # the LR finder's progress bar, then the one line
    assert "Traceback" not in err and err.endswith("\n"), err
    assert err.splitlines()[-1] == (
        f"{os.path.basename(sys.argv[0])}: error: CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total "
        "capacity of 79.19 GiB of which 3.12 GiB is free; lower --hidden, --features or --batch-size "
        "(with --no-scale-batch-size)")


def test_summary_is_strict_json_when_no_step_could_be_timed(workdir):
    # one batch an epoch: no step runs from one batch's end to the next, so no throughput to report
    run_train(*TINY, "--train-samples", "64", "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3",
              "--max-epochs", "2", cwd=workdir)
    s = strict_json(workdir / "lightning_logs" / "version_0" / "summary.json")
    assert s["train_samples_per_second"] is None and s["epochs"] == 2 and s["best_val_acc"] is not None


def test_a_one_process_run_sets_nothing_for_other_runs(workdir):
    before = dict(os.environ)
    assert train.main([*TINY, "--max-epochs", "1"]) == 0
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    assert set(added) <= {"PL_GLOBAL_SEED", "PL_SEED_WORKERS"}, added  # Lightning's seed_everything, none of ours


def test_runs_started_together_in_one_logdir_each_get_their_own_folder(tmp_path, monkeypatch):
    # Each counts the folders before any other has made one: Lightning's count says version_0 to all.
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: 0)
    assert [train.RunLogger(str(tmp_path), name="").version for _ in range(3)] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1", "version_2"]
    monkeypatch.setattr(train.rank_zero_only, "rank", 1)  # another rank takes rank 0's folder: it makes none
    assert train.RunLogger(str(tmp_path), name="").version == 0 and len(list(tmp_path.iterdir())) == 3


def test_three_runs_started_at_once_keep_apart(workdir):
    procs = [start_train(*TINY, "--max-epochs", "1", "--seed", str(seed), cwd=workdir) for seed in (1, 2, 3)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    runs = sorted((workdir / "lightning_logs").iterdir())
    assert [run.name for run in runs] == ["version_0", "version_1", "version_2"]
    for run in runs:  # each folder: one run's events, and a summary of its own checkpoints
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        assert summary(run)["checkpoint"].startswith(str(run / "checkpoints"))
    assert len({summary(run)["best_val_loss"] for run in runs}) == 3


@pytest.fixture
def held_writes(monkeypatch) -> threading.Event:
    """CheckpointWriter's thread writes only once the test sets the event returned."""
    release, write = threading.Event(), train.CheckpointWriter._write

    def held_write(*args):
        release.wait(30)
        write(*args)

    monkeypatch.setattr(train.CheckpointWriter, "_write", staticmethod(held_write))
    return release


def test_a_checkpoint_written_in_the_background_is_the_state_when_saved_and_survives_a_ctrl_c(tmp_path, held_writes):
    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    writer, weights_now, path = train.CheckpointWriter(), torch.ones(3), tmp_path / "last.ckpt"
    writer.save_checkpoint({"w": weights_now}, str(path))
    weights_now.add_(1)  # training goes on while the file is written
    previous = signal.signal(signal.SIGALRM, ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while teardown waits for the write
            writer.teardown()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not path.exists()
    held_writes.set()
    writer.teardown()  # Lightning tears down again: it still waits for that write
    assert torch.equal(torch.load(path)["w"], torch.ones(3))


def test_an_epoch_s_checkpoints_queue_without_waiting_and_the_next_epoch_s_wait(tmp_path, held_writes):
    def in_thread(work) -> threading.Thread:
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(timeout=2)
        return thread

    writer, state = train.CheckpointWriter(), {"w": torch.ones(3)}
    (tmp_path / "best-epoch=0.ckpt").write_bytes(b"old best")

    def improving_epoch():  # as Lightning does it: the new best, the old best's removal, last.ckpt
        writer.save_checkpoint(state, str(tmp_path / "best-epoch=1.ckpt"))
        writer.remove_checkpoint(str(tmp_path / "best-epoch=0.ckpt"))
        writer.save_checkpoint(state, str(tmp_path / "last.ckpt"))

    assert not in_thread(improving_epoch).is_alive()  # training did not wait for the best file's write
    next_epoch = in_thread(lambda: writer.save_checkpoint(state, str(tmp_path / "best-epoch=2.ckpt")))
    assert next_epoch.is_alive()  # the next epoch's first write waits: one epoch's copies at most
    held_writes.set()
    next_epoch.join(timeout=30)
    writer.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch=1.ckpt", "best-epoch=2.ckpt", "last.ckpt"]
