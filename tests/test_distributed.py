"""Two CPU processes (gloo) train one model at the default width, whoever starts them: this
script, torchrun (standalone, with a master address, as two nodes), two hand-started nodes, or
SLURM. Every job runs under a timeout: a hang fails the test instead of stalling CI."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import (ROOT, TINY, WIDE, free_port, kill_all, pids_running, slurm_env, start_train, summary,
                      wait_for)
from test_cli import assert_one_line_error, main_in_process

DDP = [*WIDE, "--accelerator", "cpu", "--max-epochs", "5"]
JOB_TIMEOUT = 240  # seconds; a job of these sizes takes 20-40 s on 2 cores
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run_job(workdir, commands, timeout=JOB_TIMEOUT, succeed=True):
    """Start every (argv, extra env) of a job at once, wait for all; kill them all on timeout. Every process
    must exit 0, or with `succeed=False` every one must fail."""
    procs = [subprocess.Popen(argv, cwd=workdir, env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, env in commands]
    deadline, outputs = time.monotonic() + timeout, []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        kill_all(str(workdir))
        pytest.fail(f"the job hung: still running after {timeout} s")
    for proc, (out, err) in zip(procs, outputs):
        assert (proc.returncode == 0) == succeed, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return "".join(out for out, _ in outputs), "".join(err for _, err in outputs)


def train_argv(*flags, workdir):
    # --logdir spelled out: the test's own folder in every rank's command line finds stray ranks
    return [str(ROOT / "train.py"), *DDP, *flags, "--logdir", str(workdir / "lightning_logs")]


def check_one_run(workdir, stdout, stderr, world_size=2):
    assert len(re.findall(r"^batch size: \d+ per device", stdout, re.M)) == 1  # one batch-size search
    assert len(re.findall(r"Finding best initial lr:\s+0%", stdout + stderr)) == 1  # one LR finder in the job
    assert len(re.findall(r"^learning rate: ", stdout, re.M)) == 1
    assert len(re.findall(rf"^training on {world_size} processes, ", stdout, re.M)) == 1
    assert len(re.findall(r"^best checkpoint: ", stdout, re.M)) == 1
    assert not re.search(r"Initializing distributed|Warning", stdout + stderr)  # no Lightning info or warnings
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]
    run = workdir / "lightning_logs" / "version_0"
    assert (run / "lr_finder.png").is_file()
    s = summary(run)
    assert s["world_size"] == world_size
    # 4000 samples over 2 ranks: at least 64 steps an epoch on each
    assert s["batch_size"] <= 2000 // 64 and s["best_val_acc"] >= 0.88  # 5 epochs: the average lags the rule
    model = train.SumSignModel.load_from_checkpoint(s["checkpoint"], map_location="cpu").eval()
    x, y = train.SumSignRows(2000, 32, (1234, "never seen"), stored=True)[torch.arange(2000)]
    with torch.no_grad():
        accuracy = ((model(x) > 0.5).float() == y).float().mean().item()
    assert accuracy >= 0.88
    assert pids_running(str(workdir)) == []
    return s


def test_script_starts_its_own_ranks(workdir):
    out, err = run_job(workdir, [([sys.executable, *train_argv("--devices", "2", workdir=workdir)], {})])
    check_one_run(workdir, out, err)


def test_fewer_rows_than_ranks_still_ends(workdir):
    # 3 ranks, 1 validation row: every rank still gets a validation batch, so none waits in the val_loss
    # all-reduce for a rank that has nothing to validate.
    flags = ["--devices", "3", "--val-samples", "1", "--max-epochs", "2",
             "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3"]
    run_job(workdir, [([sys.executable, *train_argv(*flags, workdir=workdir)], {})])
    s = summary(workdir / "lightning_logs" / "version_0")
    assert s["world_size"] == 3 and s["epochs"] == 2 and s["best_val_acc"] is not None
    assert pids_running(str(workdir)) == []


def test_two_nodes_started_by_hand(workdir):
    port = free_port()
    # A core each, as on two machines: Lightning gives a node's one process all of them, and here both share two.
    out, err = run_job(workdir, [
        ([sys.executable, *train_argv("--devices", "1", "--num-nodes", "2", workdir=workdir)],
         {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank), "OMP_NUM_THREADS": "1"})
        for rank in (0, 1)])
    check_one_run(workdir, out, err)


@pytest.mark.parametrize("rendezvous", [["--standalone"], ["--master_addr", "127.0.0.1", "--master_port", "PORT"]],
                         ids=["standalone", "master-address"])
def test_torchrun_one_node(workdir, rendezvous):
    rendezvous = [str(free_port()) if a == "PORT" else a for a in rendezvous]
    out, err = run_job(workdir, [([*TORCHRUN, *rendezvous, "--nproc_per_node", "2",
                                   *train_argv("--devices", "2", workdir=workdir)], {})])
    check_one_run(workdir, out, err)


def test_torchrun_two_nodes(workdir):
    port = str(free_port())
    out, err = run_job(workdir, [
        ([*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr",
          "127.0.0.1", "--master_port", port, *train_argv("--devices", "1", "--num-nodes", "2", workdir=workdir)],
         {}) for rank in (0, 1)])
    check_one_run(workdir, out, err)


# Put first on a job's PYTHONPATH: in every process, torch.save fails on the second last.ckpt as on a full disk.
FULL_DISK = """import torch
save, writes = torch.save, []
def full_disk(checkpoint, path):
    writes.append(path)
    if path.endswith("last.ckpt.partial") and writes.count(path) == 2:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return save(checkpoint, path)
torch.save = full_disk
"""


@pytest.mark.parametrize("launcher", ["script", "torchrun", "two nodes by hand"])
def test_an_error_on_rank_0_ends_the_job_with_one_line_from_each_rank_left(workdir, tmp_path_factory, launcher):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(FULL_DISK)
    env = {"PYTHONPATH": str(site)}
    flags = ["--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3"]
    if launcher == "two nodes by hand":
        port = str(free_port())
        job = [([sys.executable, *train_argv("--num-nodes", "2", *flags, workdir=workdir)],
                {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    else:
        launch = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"] if launcher == "torchrun" else [sys.executable]
        job = [([*launch, *train_argv("--devices", "2", *flags, workdir=workdir)], env)]
    out, err = run_job(workdir, job, succeed=False)
    assert 'train.py", line' not in err and "[rank" not in err, err[-3000:]  # no rank's traceback
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    lines = [line for line in err.splitlines() if line.startswith("train.py")]
    assert lines[0].startswith(f"train.py: error: cannot write {last} (") and lines[0].endswith(f"--resume {last}")
    if launcher == "script":  # Lightning's launcher: rank 0 ends the rank it started before that sees it go
        assert err.strip().splitlines() == lines[:1]
    else:  # a rank started otherwise sees rank 0 go, and says so in one line
        assert len(lines) == 2 and re.fullmatch(r"train.py: error: rank 1: .*by peer.*: another process of the job "
                                                r"has ended", lines[1]), lines[1]
        assert "Traceback" not in err or launcher == "torchrun"  # torchrun's report has one of its own
    assert torch.load(last, weights_only=False)["epoch"] == 0  # the first epoch's, whole
    assert pids_running(str(workdir)) == []


def test_a_rank_killed_in_training_ends_the_job_with_one_line_and_the_resume_command(workdir):
    # As the kernel's OOM killer would: rank 0 sees rank 1 go in its next collective, a gradient all-reduce most often
    proc = start_train(*DDP[:-2], "--devices", "2", "--max-epochs", "4", "--train-samples", "16000",
                       "--logdir", str(workdir / "lightning_logs"), cwd=workdir)
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last.name, proc, last.parent, timeout=JOB_TIMEOUT)
    os.kill(next(pid for pid in pids_running(str(workdir)) if pid != proc.pid), signal.SIGKILL)
    rc, out, err = assert_job_ends(proc, workdir, None)
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("train.py")]  # stderr also holds the progress bars
    assert len(lines) == 1 and re.fullmatch(r"train.py: error: rank 0: .*by peer.*: another process of the job has "
                                            rf"ended; resume with: python .* --resume {re.escape(str(last))}", lines[0])


@pytest.mark.parametrize("message,lost", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:42630. "
     "This is typically caused by a remote worker crashing. Check the logs of the remote worker.", True),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:48345: "
     "Connection reset by peer", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:2052, remote process exited or there was a network error", True),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv "
     "operation to complete. This is typically caused by a remote worker hanging.", False),  # alive
    ("mat1 and mat2 shapes cannot be multiplied (4x32 and 64x1)", False),
], ids=["gloo-closed", "gloo-reset", "nccl-remote-error", "gloo-timeout", "not-distributed"])
def test_a_lost_process_is_told_by_the_error_s_words(message, lost, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert train.lost_a_process(RuntimeError(message)) == lost
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # no job: no other process to lose
    assert not train.lost_a_process(RuntimeError(message))


# Put first on a job's PYTHONPATH: the last thing each process does says whether its process group is still up.
PROCESS_GROUP_AT_EXIT = """import atexit, sys
def check():
    import torch.distributed
    if torch.distributed.is_initialized():
        print("process group still up at exit", file=sys.stderr)
atexit.register(check)
"""


@pytest.mark.parametrize("launcher", ["script", "torchrun"])
def test_every_rank_destroys_its_process_group_before_it_exits(workdir, tmp_path_factory, launcher):
    # Left up, gloo's threads made the exit abort now and then: status 134, "terminate called without an active
    # exception", after a run that had succeeded.
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(PROCESS_GROUP_AT_EXIT)
    argv = [*(TORCHRUN + ["--standalone", "--nproc_per_node", "2"] if launcher == "torchrun" else [sys.executable]),
            *train_argv("--devices", "2", "--fast-dev-run", workdir=workdir)]
    out, err = run_job(workdir, [(argv, {"PYTHONPATH": str(site)})])
    assert "still up" not in err and "terminate called" not in err, err[-3000:]
    assert out.count("precision: ") == 1 and pids_running(str(workdir)) == []


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_slurm(workdir):
    port = next(p for p in range(15000 + os.getpid() % 9000, 25000) if port_is_free(p))
    out, err = run_job(workdir, [([sys.executable, *train_argv("--devices", "2", workdir=workdir)],
                                  slurm_env(rank, port)) for rank in (0, 1)])
    check_one_run(workdir, out, err)


@pytest.mark.parametrize("devices,nodes", [("1", "1"), ("3", "1"), ("2", "2")], ids=["fewer", "more", "nodes"])
def test_slurm_tasks_that_do_not_match_the_flags_exit_2_before_tuning(workdir, capsys, monkeypatch, devices, nodes):
    for key, value in slurm_env(0, 15001).items():  # srun: 2 tasks on 1 node
        monkeypatch.setenv(key, value)
    assert_one_line_error(main_in_process(capsys, *TINY, "--devices", devices, "--num-nodes", nodes), "--devices")
    assert list(workdir.iterdir()) == []


def test_torchrun_processes_that_do_not_match_the_flags_exit_2_before_tuning(workdir):
    # torchrun starts 2 processes; --devices 1 would make each a whole run of its own
    out, err = run_job(workdir, [([*TORCHRUN, "--standalone", "--nproc_per_node", "2",
                                   *train_argv("--devices", "1", workdir=workdir)], {})], succeed=False)
    assert 'train.py", line' not in err  # torchrun's own report has a traceback
    errors = re.findall(r"^train\.py: error: argument --devices: .*world size \(2\)", err, re.M)
    assert len(errors) == 2, err[-3000:]  # one line from each process
    assert out == "" and list(workdir.iterdir()) == [] and pids_running(str(workdir)) == []


def test_slurm_auto_requeue_is_off(monkeypatch):
    # Lightning's SIGUSR1 requeue would resume from an hpc_ckpt of its own, past --resume's checks.
    for key, value in slurm_env(0, 15001).items():
        monkeypatch.setenv(key, value)
    trainer = train.make_trainer(SimpleNamespace(accelerator="cpu", precision="32-true", deterministic=False),
                                 devices=2, logger=False)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


# --- signals: every rank ends within 30 s, with 128 + signal, and last.ckpt resumes -----------------
SLOW_TUNING = ["--lr-find-steps", "3000"]  # a few seconds of LR finder to land a signal in


def assert_job_ends(proc, workdir, sig, seconds=30):
    out, err = proc.communicate(timeout=seconds + 30)
    deadline = time.monotonic() + seconds
    while pids_running(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    stray = pids_running(str(workdir))
    kill_all(str(workdir))
    assert stray == [], "a rank outlived the job"
    return proc.returncode, out, err


def assert_exit_status(launcher, rc, err, sig):
    if launcher == "script":  # the process the user started is rank 0
        assert rc == 128 + sig and "Traceback" not in err, err[-3000:]
    else:  # torchrun reports a signal with a traceback of its own and exit status 1; no rank adds one
        assert rc == 1 and err.count("Traceback") == 1 and "SignalException" in err, err[-3000:]


@pytest.mark.parametrize("launcher", ["script", "torchrun"])
def test_sigterm_during_fit_then_resume_under_the_same_launcher(workdir, launcher):
    launch = None if launcher == "script" else [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    flags = ["--devices", "2", "--max-epochs", "4", "--train-samples", "16000"]
    proc = start_train(*DDP[:-2], *flags, "--logdir", str(workdir / "lightning_logs"), cwd=workdir,
                       launcher=launch)
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last.name, proc, last.parent, timeout=JOB_TIMEOUT)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to every rank; Lightning's launcher too
    rc, out, err = assert_job_ends(proc, workdir, signal.SIGTERM)
    assert_exit_status(launcher, rc, err, signal.SIGTERM)
    how = "python " if launcher == "script" else "the same torchrun or srun command, with train.py "
    assert re.search(rf"^interrupted by SIGTERM during training; resume with: {how}.*--resume \S+last\.ckpt$", out,
                     re.M), out[-2000:]
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    resumed = start_train(*DDP[:-2], *flags, "--logdir", str(workdir / "lightning_logs"), "--resume", str(last),
                          cwd=workdir, launcher=launch)
    rc, out, err = assert_job_ends(resumed, workdir, None, seconds=JOB_TIMEOUT)
    assert rc == 0, err[-3000:]
    assert "batch size:" not in out and sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]
    s = summary(workdir / "lightning_logs" / "version_0")
    assert s["epochs"] == 4 > epoch and s["world_size"] == 2


def test_a_run_resumed_on_more_processes_keeps_its_lr_schedule_in_epochs(workdir):
    # --devices may change on --resume: each epoch then takes fewer steps, yet the lr is still lr / (1 + E / 2)
    flags = ["--no-scale-batch-size", "--batch-size", "50", "--no-lr-find", "--lr", "1e-3"]
    run_job(workdir, [([sys.executable, *train_argv(*flags, "--max-epochs", "2", workdir=workdir)], {})])
    run = workdir / "lightning_logs" / "version_0"
    resume = ["--devices", "2", "--max-epochs", "4", "--resume", str(run / "checkpoints" / "last.ckpt")]
    run_job(workdir, [([sys.executable, *train_argv(*flags, *resume, workdir=workdir)], {})])
    lrs = EventAccumulator(str(run)).Reload().Scalars("lr-Adam")  # logged as each epoch starts
    assert [e.step for e in lrs] == [0, 80, 160, 200]  # 4000 rows in batches of 50: 80 steps, then 40 a rank
    assert [e.value for e in lrs] == pytest.approx([1e-3 / (1 + epoch / 2) for epoch in range(4)], rel=1e-6)


@pytest.mark.parametrize("launcher,sig", [("script", signal.SIGTERM), ("torchrun", signal.SIGTERM),
                                          ("script", signal.SIGINT)], ids=["script-SIGTERM", "torchrun-SIGTERM",
                                                                           "script-Ctrl-C"])
def test_signal_during_tuning_ends_every_rank(workdir, launcher, sig):
    launch = None if launcher == "script" else [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    proc = start_train(*DDP, *SLOW_TUNING, "--devices", "2", "--logdir", str(workdir / "lightning_logs"),
                       cwd=workdir, launcher=launch)
    wait_for(".tuning-*/.lr_find_*.ckpt", proc, workdir / "lightning_logs")
    if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole foreground process group
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    rc, out, err = assert_job_ends(proc, workdir, sig)
    assert_exit_status(launcher, rc, err, sig)
    assert re.search(rf"^interrupted by {sig.name} during the LR finder; no epoch had completed", out, re.M), out
    assert not list((workdir / "lightning_logs").glob(".*")), "a tuner's temporary file was left"


@pytest.mark.parametrize("launcher", ["script", "torchrun"])
def test_ctrl_c_during_fit(workdir, launcher):
    launch = None if launcher == "script" else [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    proc = start_train(*DDP[:-2], "--devices", "2", "--max-epochs", "4", "--train-samples", "16000",
                       "--logdir", str(workdir / "lightning_logs"), cwd=workdir, launcher=launch)
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last.name, proc, last.parent, timeout=JOB_TIMEOUT)
    os.killpg(proc.pid, signal.SIGINT)  # torchrun's ranks sit in sessions of their own: it passes Ctrl-C on
    rc, out, err = assert_job_ends(proc, workdir, signal.SIGINT)
    assert_exit_status(launcher, rc, err, signal.SIGINT)
    assert re.search(r"^interrupted by SIGINT during training; resume with: ", out, re.M), out


def listening(port: int) -> bool:
    """Whether a process here listens on `port` (read from /proc: connecting would disturb the listener)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["SIGTERM", "Ctrl-C-twice"])
def test_a_signal_ends_rank_0_while_it_waits_for_a_node_that_never_comes(workdir, signals):
    # Node 1 of a two-node job started by hand never starts: rank 0 tunes, then waits in C++ (torch's
    # TCPStore) for up to 30 minutes, where Python runs no signal handler.
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"}
    proc = subprocess.Popen([sys.executable, *train_argv("--devices", "1", "--num-nodes", "2", workdir=workdir)],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not listening(port):  # rank 0 listens once it waits for the others
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1)
    sent = time.monotonic()
    for sig in signals:
        os.kill(proc.pid, sig)
        time.sleep(0.2)
    try:
        out, err = proc.communicate(timeout=train.SIGNAL_GRACE_SECONDS + 30)
    except subprocess.TimeoutExpired:
        kill_all(str(workdir))
        pytest.fail("a signal did not end rank 0 while it waited for the other node")
    seconds = time.monotonic() - sent
    assert proc.returncode == 128 + signals[0] and "Traceback" not in err, err[-3000:]
    assert re.search(rf"^interrupted by {signals[0].name} during training; no epoch had completed", out, re.M), out
    # One signal ends it once the grace has passed; a second one at once.
    assert seconds < (train.SIGNAL_GRACE_SECONDS + 5 if len(signals) == 1 else train.SIGNAL_GRACE_SECONDS)
    assert pids_running(str(workdir)) == []
