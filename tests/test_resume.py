"""Resume is exact on the paths users take: the default relative --logdir or an absolute one, the
command the interrupt line prints, an interruption before the best epoch or after it while val_acc
stalls and the learning rate keeps falling, a kill -9 at any moment; flags that define the run are
checked."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import (ROOT, TINY, assert_one_line_error, main_in_process, pids_running, run_train, start_train,
                      summary, train_in_process, wait_for)
from test_reliability import assert_same_weights, metrics, weights

# About 0.1 s an epoch, at an almost constant lr: the best val_acc comes after a few epochs, then it
# stalls (on the fixed set it overfits; fresh rows at a large lr hit the noise floor).
STALLS = ["--features", "64", "--hidden", "128", "--train-samples", "120", "--val-samples", "400",
          "--batch-size", "10", "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-2", "--patience", "20",
          "--lr-decay-epochs", "1000", "--fixed-data"]
FRESH_STALLS = STALLS[:-1]
EPOCHS = 14


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def best_files(run):
    return sorted(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))


def assert_same_run(resumed, full):
    """Same best file (and only it), same summary metrics, bit-identical last.ckpt and best weights."""
    assert best_files(resumed) == best_files(full) and len(best_files(full)) == 1
    assert metrics(resumed) == metrics(full)
    assert_same_weights(weights(resumed / "checkpoints" / "last.ckpt"), weights(full / "checkpoints" / "last.ckpt"))
    assert_same_weights(weights(summary(resumed)["checkpoint"]), weights(summary(full)["checkpoint"]))
    a, b = (checkpoint(run / "checkpoints" / "last.ckpt") for run in (resumed, full))
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["callbacks"].keys() == b["callbacks"].keys()


def stop_points(run) -> dict:
    """Epoch counts to stop after: before the best epoch, and in a stall after it."""
    events = EventAccumulator(str(run)).Reload()
    val_acc = [e.value for e in events.Scalars("val_acc")]
    lr = [e.value for e in events.Scalars("lr-Adam")]  # at the start of each epoch
    best = val_acc.index(max(val_acc))
    # after n epochs: the last one did not improve val_acc, and the lr has fallen since the start
    stalled = [n for n in range(best + 2, len(lr)) if lr[n] < lr[0] and val_acc[n - 1] < val_acc[best]]
    assert best >= 2 and stalled, (val_acc, lr)  # the cases this test is for
    return {"before-best": best - 1, "stalled-after-best": stalled[0]}


@pytest.mark.parametrize("data", [STALLS, FRESH_STALLS], ids=["fixed", "fresh"])
@pytest.mark.parametrize("logdir", ["default", "absolute"])
def test_a_run_stopped_and_resumed_ends_as_the_run_never_stopped(workdir, data, logdir):
    flags = [*data, *([] if logdir == "default" else ["--logdir", str(workdir / "runs")])]
    root = workdir / ("lightning_logs" if logdir == "default" else "runs")
    train_in_process(*flags, "--max-epochs", str(EPOCHS))
    full = root / "version_0"
    for version, epochs in enumerate(stop_points(full).values(), start=1):  # before the best, in a stall
        train_in_process(*flags, "--max-epochs", str(epochs))
        stopped = root / f"version_{version}"
        # as the interrupt line prints it: the same flags, --resume with the checkpoint's absolute path
        last = (stopped / "checkpoints" / "last.ckpt").resolve()
        run_train(*flags, "--max-epochs", str(EPOCHS), "--resume", str(last), cwd=workdir)
        assert_same_run(stopped, full)


def test_resume_from_a_relative_path_in_another_folder(workdir):
    train_in_process(*STALLS, "--max-epochs", str(EPOCHS))
    train_in_process(*STALLS, "--max-epochs", "6")
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    proc = run_train(*STALLS, "--max-epochs", str(EPOCHS), "--resume",
                     "../lightning_logs/version_1/checkpoints/last.ckpt", cwd=elsewhere)
    assert list(elsewhere.iterdir()) == []
    assert proc.stderr == ""  # no warning a user cannot act on: the folder holds files, the epochs are short
    shown = re.search(r"tensorboard --logdir=(\S+)$", proc.stdout, re.M).group(1)  # the folder of the run
    assert (elsewhere / shown).resolve() == (workdir / "lightning_logs").resolve()
    assert_same_run(workdir / "lightning_logs" / "version_1", workdir / "lightning_logs" / "version_0")


def test_a_finished_run_resumed_trains_no_further(workdir):
    # Early stopping ended it; resumed, it writes the same report and trains no extra epoch.
    flags = [*STALLS, "--patience", "2", "--max-epochs", str(EPOCHS)]
    train_in_process(*flags)
    run = workdir / "lightning_logs" / "version_0"
    before, last = metrics(run), checkpoint(run / "checkpoints" / "last.ckpt")
    assert before["ended_by"] == "patience" and before["epochs"] < EPOCHS
    run_train(*flags, "--resume", str(run / "checkpoints" / "last.ckpt"), cwd=workdir)
    assert metrics(run) == before
    assert_same_weights(weights(run / "checkpoints" / "last.ckpt"), last["state_dict"])


# --- interrupted where it is hard to be: the last validation, the report, a kill -9 ---------------------
class Output:
    """Collects a process's stdout as it comes, so a test can wait for its progress bar to show a stage."""

    def __init__(self, proc):
        self.proc, self.text = proc, ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):  # os.read returns what has come; a text file's read(n) waits for n characters
        for chunk in iter(lambda: os.read(self.proc.stdout.fileno(), 4096), b""):
            self.text += chunk.decode(errors="replace")

    def end(self, timeout=120) -> tuple[str, str]:
        """Wait for the process to end; its stdout and stderr."""
        self.proc.wait(timeout)
        self.thread.join(10)
        return self.text, self.proc.stderr.read()

    def wait_for(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text, re.S):
            assert self.proc.poll() is None, self.text[-3000:]
            assert time.monotonic() < deadline, f"no {pattern!r} in time"
            time.sleep(0.01)


# Two epochs of one training batch (64 rows), each validated in one batch of 30000 rows that takes
# a second or more: a signal lands inside a validation batch.
LONG_VALIDATION = ["--features", "2048", "--hidden", "2048", "--train-samples", "64", "--val-samples", "30000",
                   "--batch-size", "30000", "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3",
                   "--max-epochs", "2", "--precision", "32-true"]


def test_a_signal_in_the_last_validation_stops_and_resumes(workdir):
    sig = signal.SIGINT
    train_in_process(*LONG_VALIDATION)
    proc = start_train(*LONG_VALIDATION, cwd=workdir)
    output = Output(proc)
    output.wait_for(r"Epoch 1:.*Validation DataLoader 0:")  # the last epoch's one validation batch runs
    proc.send_signal(sig)
    out, err = output.end()
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    found = re.search(rf"^interrupted by {sig.name} during training; resume with: (.+)$", out, re.M)
    assert found, out[-1500:]
    hint = found.group(1)
    last = workdir / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["epoch"] == 0 and summary(last.parent.parent)["ended_by"] == "interrupted (SIGINT)"
    run_train(*shlex.split(hint)[2:], cwd=workdir, timeout=600)
    assert_same_run(last.parent.parent, workdir / "lightning_logs" / "version_0")


def signal_self_during_report(monkeypatch, sig):
    report = train.report

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return report(*args, **kwargs)

    monkeypatch.setattr(train, "report", signalled)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_report_gives_the_line_and_128_plus_signal(workdir, capsys, monkeypatch, sig):
    signal_self_during_report(monkeypatch, sig)
    assert train.main([*STALLS, "--max-epochs", "2"]) == 128 + sig
    out = capsys.readouterr().out
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert out.rstrip().splitlines()[-1] == (f"interrupted by {sig.name} during the report; resume with: python "
                                             f"{shlex.quote(os.path.relpath(ROOT / 'train.py'))} "
                                             f"{shlex.join([*STALLS, '--max-epochs', '2'])} --resume {last}")
    assert not (last.parent.parent / "summary.json").exists()
    # resumed as printed, the finished run writes its report
    monkeypatch.undo()
    assert train.main([*STALLS, "--max-epochs", "2", "--resume", str(last)]) == 0
    assert summary(last.parent.parent)["epochs"] == 2


def test_a_signal_after_the_last_step_is_not_swallowed(workdir, capsys, monkeypatch):
    # It lands in on_train_end, after every step and validation: fit() returns as if nothing happened.
    on_train_end = train.BestEpoch.on_train_end

    def signalled(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)
        on_train_end(self, trainer, pl_module)

    monkeypatch.setattr(train.BestEpoch, "on_train_end", signalled)
    assert train.main([*STALLS, "--max-epochs", "2"]) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in capsys.readouterr().out


def test_a_second_signal_ends_at_once(monkeypatch, capsys):
    stop = train.StopOnSignal(["--max-epochs", "3"])
    try:
        exits = []
        monkeypatch.setattr(train.os, "_exit", exits.append)
        stop.training = True  # in a step: the first signal is noted, to stop at the step's end
        stop.handle(signal.SIGINT, None)
        assert exits == [] and stop.signum == signal.SIGINT
        stop.handle(signal.SIGINT, None)  # the second ends the process now
        assert exits == [128 + signal.SIGINT]
        assert "interrupted by SIGINT" in capsys.readouterr().out
    finally:
        stop.restore()


def catches(pid, sig) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (Linux: SigCgt in /proc/PID/status)."""
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)
    return bool(int(caught, 16) >> (sig - 1) & 1)


def test_a_ctrl_c_while_python_imports_ends_the_process_without_a_traceback(workdir):
    proc = start_train(*TINY, cwd=workdir)
    time.sleep(0.3)  # Python is up (its own handler raises KeyboardInterrupt) and importing torch, which takes seconds
    deadline = time.monotonic() + 30
    while catches(proc.pid, signal.SIGINT):  # until train.py's first lines hand Ctrl-C back to the default action
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err[-2000:]  # a shell reports 130
    assert out == "" and list(workdir.iterdir()) == []


# One training step of 40000 rows: a forward and a backward matmul of about a second each.
LONG_STEP = ["--features", "2048", "--hidden", "2048", "--train-samples", "40000", "--val-samples", "64",
             "--batch-size", "40000", "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3", "--max-epochs", "2",
             "--precision", "32-true"]


def test_a_second_ctrl_c_ends_a_real_run_at_once(workdir):
    proc = start_train(*LONG_STEP, cwd=workdir)
    output = Output(proc)
    output.wait_for(r"Epoch 0:")
    assert catches(proc.pid, signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # noted when the running kernel returns; the step goes on to its end
    deadline = time.monotonic() + 60
    while catches(proc.pid, signal.SIGINT):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)  # inside the rest of the step: ends the process there and then
    output.end(timeout=60)
    assert proc.returncode == -signal.SIGINT  # killed by it: a shell reports 130


def kill_while_writing(proc, last, timeout=300):
    """SIGKILL the run the moment it writes last.ckpt again (its .partial file appears)."""
    partial = last.with_name(last.name + ".partial")
    deadline = time.monotonic() + timeout
    while not (last.exists() and partial.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "no second write of last.ckpt seen"
        time.sleep(0.001)
    proc.kill()
    proc.communicate(timeout=60)


# A last.ckpt of about 100 MB: its write takes long enough to be caught in the middle.
BIG = ["--features", "4096", "--hidden", "2048", "--train-samples", "512", "--val-samples", "256",
       "--batch-size", "64", "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-4", "--max-epochs", "4",
       "--precision", "32-true"]


@pytest.mark.parametrize("when", ["writing-last-ckpt", "mid-epoch"])
def test_a_kill_9_loses_at_most_one_epoch(workdir, when):
    train_in_process(*BIG)
    proc = start_train(*BIG, cwd=workdir)
    run = workdir / "lightning_logs" / "version_1"
    last = run / "checkpoints" / "last.ckpt"
    if when == "writing-last-ckpt":
        kill_while_writing(proc, last)
    else:
        while not last.exists():
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(0.5)
        proc.kill()
        proc.communicate(timeout=60)
    assert checkpoint(last)["epoch"] >= 0  # whole and loadable
    run_train(*BIG, "--resume", str(last), cwd=workdir, timeout=600)
    assert_same_run(run, workdir / "lightning_logs" / "version_0")
    assert not list(run.glob("checkpoints/*.partial"))


def test_a_full_disk_ends_the_run_in_one_line_and_it_resumes_as_never_stopped(workdir, capsys, monkeypatch):
    flags = [*STALLS, "--max-epochs", "6"]
    assert train.main(flags) == 0
    full = workdir / "lightning_logs" / "version_0"
    save, writes = torch.save, []

    def third_last_ckpt_finds_the_disk_full(checkpoint, path):
        writes.append(path)
        if writes.count(path) == 3 and path.endswith("last.ckpt.partial"):
            Path(path).write_bytes(b"PK")  # what torch leaves, with this message and no errno
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return save(checkpoint, path)

    monkeypatch.setattr(torch, "save", third_last_ckpt_finds_the_disk_full)
    capsys.readouterr()
    assert train.main(flags) == 1
    err = capsys.readouterr().err
    run = workdir / "lightning_logs" / "version_1"
    last = run / "checkpoints" / "last.ckpt"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: cannot write {last} (" in err and "MB free there): [enforce fail" in err
    assert not list(run.glob("checkpoints/*.partial")) and checkpoint(last)["epoch"] == 1  # the two before stand
    monkeypatch.setattr(torch, "save", save)  # space made
    command = shlex.split(err.split("; resume with: ")[1])
    assert command[:2] == ["python", os.path.relpath(ROOT / "train.py")] and command[2:-2] == flags
    assert train.main(command[2:]) == 0
    assert_same_run(run, full)


def test_a_signal_before_a_resumed_run_restores_its_checkpoint_names_that_checkpoint(workdir, capsys, monkeypatch):
    assert train.main([*STALLS, "--max-epochs", "2"]) == 0
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    setup = train.TunedValues.setup

    def signalled(self, *args, **kwargs):  # in fit(), before the checkpoint's state is loaded
        os.kill(os.getpid(), signal.SIGINT)
        return setup(self, *args, **kwargs)

    monkeypatch.setattr(train.TunedValues, "setup", signalled)
    flags = [*STALLS, "--max-epochs", "4"]
    capsys.readouterr()
    assert train.main([*flags, "--resume", "lightning_logs/version_0/checkpoints/last.ckpt"]) == 130
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == (
        f"interrupted by SIGINT during training; resume with: python {shlex.quote(os.path.relpath(ROOT / 'train.py'))} "
        f"{shlex.join(flags)} --resume {last}")  # not "nothing to resume": the checkpoint is whole
    monkeypatch.setattr(train.TunedValues, "setup", setup)
    assert train.main([*flags, "--resume", str(last)]) == 0
    assert summary(last.parent.parent)["epochs"] == 4


def readme_requeue_job(workdir, command: str) -> Path:
    """The README's SLURM script as workdir/job.sh, with `command` in place of its train.py command; srun runs
    the command here, and scontrol notes the requeue in workdir/requeued."""
    script = re.search(r"```bash\n(#SBATCH.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "python train.py --gpus 8 --num-nodes 2 " in script
    job = workdir / "job.sh"
    job.write_text('srun() { "$@"; }\nscontrol() { echo "$@" >> requeued; }\n'
                   + script.replace("python train.py --gpus 8 --num-nodes 2", command))
    return job


@pytest.mark.parametrize("end,requeued", [("exit 143", True), ("kill -KILL $$", False), ("kill -ABRT $$", False),
                                          ("exit 1", False), ("exit 0", False)])
def test_the_readme_s_slurm_requeue_script_requeues_only_a_run_stopped_by_sigterm(workdir, end, requeued):
    # 143 is train.py's exit after SIGTERM; a kill (the kernel's OOM killer: 137) or an abort (134) would
    # end every requeued job the same way, for ever.
    job = readme_requeue_job(workdir, f"sh -c {shlex.quote(end)}")
    subprocess.run(["bash", str(job)], cwd=workdir, env={**os.environ, "SLURM_JOB_ID": "42"}, timeout=60)
    assert (workdir / "requeued").exists() == requeued


def test_the_readme_s_slurm_requeue_script_resumes_after_a_stop_before_the_first_epoch(workdir):
    flags = [*TINY, "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3", "--max-epochs", "4"]
    job = readme_requeue_job(workdir, f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'train.py'))} "
                                      f"{shlex.join(flags)}")
    runs = workdir / "runs" / "42"
    (runs / "version_0").mkdir(parents=True)  # what a job stopped before its first epoch ended leaves

    def start():
        return subprocess.Popen(["bash", str(job)], cwd=workdir, env={**os.environ, "SLURM_JOB_ID": "42"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()  # a new run, in version_1; SIGTERM (SLURM's, before the time limit) after its first epoch
    wait_for("version_1/checkpoints/last.ckpt", first, runs)
    (python,) = pids_running(str(runs.relative_to(workdir)))
    os.kill(python, signal.SIGTERM)
    first.communicate(timeout=60)
    assert (workdir / "requeued").read_text() == "requeue 42\n"
    second = start()  # the requeued job: resumes version_1 and ends it
    out, err = second.communicate(timeout=300)
    assert "Traceback" not in err and sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"], out
    assert summary(runs / "version_1")["epochs"] == 4 and summary(runs / "version_1")["ended_by"] == "max_epochs"
    assert (workdir / "requeued").read_text() == "requeue 42\n"  # ended: not requeued again


# --- flags on resume --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("stopped")
    run_train(*STALLS, "--precision", "32-true", "--max-epochs", "3", cwd=cwd)
    return cwd, cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


CHANGED = [("--seed", "43"), ("--train-samples", "121"), ("--val-samples", "401"), ("--precision", "bf16-mixed"),
           ("--fixed-data", None), ("--features", "65"), ("--hidden", "127"), ("--patience", "7"),
           ("--lr-decay-epochs", "3")]


@pytest.mark.parametrize("flag,value", CHANGED, ids=[flag for flag, _ in CHANGED])
def test_resume_refuses_a_flag_that_defines_the_run(stopped_run, capsys, monkeypatch, flag, value):
    cwd, last = stopped_run
    monkeypatch.chdir(cwd)
    argv = [*STALLS, "--precision", "32-true", "--resume", str(last)]
    if value is None:  # a switch: the other way round
        argv = [a for a in argv if a != flag] if flag in argv else [*argv, flag]
    elif flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert_one_line_error(main_in_process(capsys, *argv), f"--resume: the checkpoint was made with {flag}")
    assert sorted(p.name for p in (cwd / "lightning_logs").iterdir()) == ["version_0"]


@pytest.mark.parametrize("elsewhere", ["bf16-mixed", "32-true"])
def test_resume_with_precision_auto_goes_on_in_the_runs_precision_on_any_machine(stopped_run, elsewhere, monkeypatch):
    # A requeued job can land on a CPU where auto picks otherwise: the 32-true run goes on in 32-true.
    cwd, last = stopped_run
    monkeypatch.setattr(train, "auto_precision", lambda accelerator: (elsewhere, "auto: test"))
    args = train.parse_args([*STALLS, "--resume", str(last)])
    assert (args.precision, args.precision_reason) == ("32-true", "auto: the resumed run's")
    with pytest.raises(SystemExit):  # given by hand, it must match
        train.parse_args([*STALLS, "--precision", "bf16-mixed", "--resume", str(last)])


def test_resume_refuses_a_last_ckpt_taken_out_of_its_run_folder(stopped_run, workdir, capsys):
    # The run logs on in the folder above checkpoints/: from a copy, that would be wherever the copy is.
    cwd, last = stopped_run
    (workdir / "copies").mkdir()
    shutil.copy(last, workdir / "copies" / "last.ckpt")
    assert_one_line_error(main_in_process(capsys, *STALLS, "--precision", "32-true", "--resume", "copies/last.ckpt"),
                          "--resume: 'copies/last.ckpt' is not in a run's checkpoints folder")
    assert sorted(p.name for p in workdir.rglob("*")) == ["copies", "last.ckpt"]


def test_resume_needs_to_write_in_the_run_s_folder_not_in_logdir(stopped_run, capsys, monkeypatch):
    cwd, last = stopped_run
    argv = [*STALLS, "--precision", "32-true", "--resume", str(last)]
    assert train.parse_args([*argv, "--logdir", "/proc/runs"]).resume == str(last)  # --logdir is not used
    make_folder = tempfile.TemporaryDirectory

    def read_only_run(dir=None, **kwargs):  # as a read-only mount of the run's folder (root may write anywhere else)
        if dir == str(last.parent.parent):
            raise OSError(30, "Read-only file system")
        return make_folder(dir=dir, **kwargs)

    monkeypatch.setattr(train.tempfile, "TemporaryDirectory", read_only_run)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines() == [
        f"{os.path.basename(sys.argv[0])}: error: argument --resume: cannot create folders in {str(last.parent.parent)!r}"]


def test_max_epochs_may_change_and_the_reports_keep_the_run_s_patience(stopped_run):
    cwd, last = stopped_run
    run_train(*STALLS, "--precision", "32-true", "--max-epochs", "5", "--resume", str(last), cwd=cwd)
    run = last.parent.parent
    s = summary(run)
    assert s["epochs"] == 5 and s["patience"] == 20 and s["lr_decay_epochs"] == 1000
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["patience"] == 20 and hparams["lr_decay_epochs"] == 1000


@pytest.mark.parametrize("flag", ["--max-epochs", "--fast-dev-run"])
def test_resume_refuses_fewer_epochs_than_the_run_has_trained_in_one_line(stopped_run, capsys, monkeypatch, flag):
    # Lightning raised a MisconfigurationException traceback for both (fast_dev_run sets max_epochs=1).
    cwd, last = stopped_run
    monkeypatch.chdir(cwd)
    trained = summary(last.parent.parent)["epochs"]  # 3, or 5 after the test above
    extra, message = {
        "--max-epochs": (["--max-epochs", str(trained - 1)],
                         f"argument --max-epochs: the run has trained {trained} epochs; give --max-epochs {trained} "
                         "to end it there"),
        "--fast-dev-run": (["--fast-dev-run"], "argument --fast-dev-run: not allowed with argument --resume")}[flag]
    before = sorted(p.name for p in last.parent.parent.rglob("*"))
    assert_one_line_error(main_in_process(capsys, *STALLS, "--precision", "32-true", "--resume", str(last), *extra),
                          message)
    assert sorted(p.name for p in last.parent.parent.rglob("*")) == before


def test_help_says_which_flags_may_change_on_resume():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout
    resume_help = " ".join(text[text.index("--resume CKPT"):].split())
    for flag in ("--features", "--hidden", "--seed", "--train-samples", "--val-samples", "--fixed-data",
                 "--precision", "--patience", "--lr-decay-epochs"):
        assert flag in resume_help.split("must match")[0]
    assert "--max-epochs, --max-time and the hardware flags may change" in resume_help


def test_a_run_ended_by_max_time_resumes_as_the_run_never_stopped(workdir):
    # The time budget ends a run at an epoch's end: its last.ckpt holds whole epochs, so a resume with
    # more time, or none, trains on exactly as the run that never stopped.
    flags = [*FRESH_STALLS, "--max-epochs", "40"]
    train_in_process(*flags)
    run_train(*flags, "--max-time", "1s", cwd=workdir)
    full, stopped = (workdir / "lightning_logs" / f"version_{v}" for v in (0, 1))
    before, last = metrics(stopped), checkpoint(stopped / "checkpoints" / "last.ckpt")
    assert before["ended_by"] == "max_time" and 1 <= before["epochs"] < 40
    assert last["global_step"] == before["epochs"] * 12  # 120 rows in batches of 10: whole epochs only
    # Resumed with the budget it has spent, it trains nothing and reports the same.
    run_train(*flags, "--max-time", "1s", "--resume", str(stopped / "checkpoints" / "last.ckpt"), cwd=workdir)
    assert metrics(stopped) == before
    assert checkpoint(stopped / "checkpoints" / "last.ckpt")["global_step"] == last["global_step"]
    resumed = run_train(*flags, "--resume", str(stopped / "checkpoints" / "last.ckpt"), cwd=workdir)
    assert "Please add the following callbacks" not in resumed.stderr  # every run keeps the Timer's state
    assert_same_run(stopped, full)
