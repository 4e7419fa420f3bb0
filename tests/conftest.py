import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# Tiny shapes: 32 features and a few thousand samples train in a second or two an epoch.
TINY = ["--features", "32", "--train-samples", "4000", "--val-samples", "500", "--hidden", "64"]
# The default width, with tiny data: at --hidden 2048 the LR finder stops early (the loss blows
# up) and Lightning validates inside it, which is where distributed runs used to deadlock.
WIDE = ["--features", "32", "--train-samples", "4000", "--val-samples", "500", "--hidden", "2048"]


def run_train(*args, cwd, timeout=300, check=True):
    """Run train.py in a fresh process, as a user would; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def train_in_process(*args):
    """train.main() in this process, for a run whose files a test reads or compares against: no seconds of
    imports. The run a test is about (a rerun, an interrupt, the printed resume command) takes run_train."""
    assert train.main(list(args)) == 0


def main_in_process(capsys, *argv) -> subprocess.CompletedProcess:
    """train.main() in this process, for input it refuses before a run starts: exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)


def assert_one_line_error(proc, *words):
    """Exit status 2, one line on stderr, no traceback, and each of `words` in that line."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def start_train(*args, cwd, launcher=None):
    """train.py (or `launcher` + train.py) in its own session, as a terminal would run a job."""
    command = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path_glob, proc, root: Path, timeout=120):
    """Wait until a file matching `path_glob` exists under `root`, while `proc` runs."""
    deadline = time.monotonic() + timeout
    while not (root.is_dir() and list(root.glob(path_glob))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {path_glob} in time"
        time.sleep(0.02)


def interrupt_after_first_epoch(proc, last_ckpt: Path, sig=signal.SIGINT, timeout=120):
    """Wait until the run has saved a completed epoch, then send `sig`; returns (rc, out, err, seconds)."""
    wait_for(last_ckpt.name, proc, last_ckpt.parent, timeout)
    time.sleep(0.3)  # into the next epoch, so the signal lands mid-epoch
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, time.monotonic() - sent


def pids_running(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (a test's own folder): every rank of its job."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def kill_all(marker: str) -> None:
    for pid in pids_running(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(rank: int, port: int) -> dict:
    """What srun sets for task `rank` of a 2-task, 1-node job; Lightning takes its port from the job id."""
    return {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_ID": str(port - 15000),
            "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "127.0.0.1"}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


MAX_EPOCHS = 40


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """Tuning on, default flags but the sizes; early stopping or 40 epochs end it."""
    cwd = tmp_path_factory.mktemp("default")
    proc = run_train(*TINY, "--max-epochs", str(MAX_EPOCHS), cwd=cwd)
    return cwd, proc
