"""Bad input is refused where it enters: one line on stderr, exit status 2, nothing written."""

import os
import pathlib
import re
import shlex

import lightning_fabric.accelerators.mps
import pytest
import torch

import train
from conftest import ROOT, TINY, assert_one_line_error, main_in_process, run_train, slurm_env


def fake_gpus(monkeypatch, count: int) -> None:
    """This machine as one with `count` CUDA GPUs that multiply bf16 natively (no GPU is needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(train, "auto_precision", lambda accelerator: ("bf16-mixed", "test"))


BAD = [
    (["--features", "0"], "--features"),
    (["--train-samples", "-5"], "--train-samples"),
    (["--val-samples", "0"], "--val-samples"),
    (["--hidden", "abc"], "--hidden"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "2.5"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--patience", "-1"], "--patience"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),  # Lightning's seed_everything takes 32 bits
    (["--num-nodes", "0"], "--num-nodes"),
    (["--devices", "0"], "--devices"),
    (["--gpus", "-2"], "--gpus"),
    (["--precision", "64"], "--precision"),
    (["--precision", "bf16"], "--precision"),
    (["--accelerator", "tpu"], "--accelerator"),
    (["--gpus", "0", "--devices", "1"], "--gpus"),
    (["--gpus", "0", "--accelerator", "cpu"], "--gpus"),
    (["--lr-find-steps", "1"], "--lr-find-steps"),
    (["--min-steps-per-epoch", "0"], "--min-steps-per-epoch"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--devices", "-1"], "--devices"),  # all GPUs: none on the CPU
    (["--precision", "16-mixed"], "--precision"),  # float16 autocast is for GPUs; Lightning would run bf16
    (["--max-time", "10"], "--max-time"),  # no unit
    (["--max-time", "0m"], "--max-time"),
    (["--max-time", "1.5h"], "--max-time"),
    (["--max-time", "m10"], "--max-time"),
    (["--max-time", "9999999999d"], "--max-time"),  # beyond timedelta
    (["--lr-decay-epochs", "0"], "--lr-decay-epochs"),
    (["--fresh-data"], "--fresh-data"),  # fresh rows are the default; --fixed-data is the other mode
    (["--logdir", ""], "--logdir"),
]


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172800),
                                          ("1h0m5s", 3605)])
def test_max_time_reads_as_a_person_types_it(text, seconds):
    assert train.parse_args(["--max-time", text]).max_time.total_seconds() == seconds


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_exit_2_with_one_line_and_write_nothing(workdir, capsys, argv, flag):
    assert_one_line_error(main_in_process(capsys, *TINY, *argv), flag)
    assert list(workdir.iterdir()) == []


# What a TINY run keeps in memory on the CPU, per process: its stored rows, a byte a feature (500 validation
# rows of 32 features, and with --fixed-data 4000 more), and 40 bytes a parameter of a (32 + 2) x hidden + 1 model;
# each process after the first also as much as this one holds already (RSS, here 1 MB).
MEMORY = [(["--val-samples", "5000"], "--val-samples", 5000 * 32 + 40 * (34 * 64 + 1)),
          (["--fixed-data"], "--train-samples", 4500 * 32 + 40 * (34 * 64 + 1)),
          (["--hidden", "1024"], "--hidden", 500 * 32 + 40 * (34 * 1024 + 1)),
          (["--hidden", "1024", "--devices", "3"], "--hidden", 3 * (500 * 32 + 40 * (34 * 1024 + 1)) + 2 * 10**6),
          # a batch the search does not bound: 5 bytes a feature and row (int8 codes, an int32 or float32 copy),
          # and no more rows than a rank's share of the larger split
          (["--no-scale-batch-size", "--batch-size", "3000"], "--batch-size",
           500 * 32 + 40 * (34 * 64 + 1) + 3000 * 5 * 32),
          (["--no-scale-batch-size", "--batch-size", "100000"], "--batch-size",
           500 * 32 + 40 * (34 * 64 + 1) + 4000 * 5 * 32),
          (["--no-scale-batch-size", "--batch-size", "100000", "--devices", "2"], "--batch-size",
           2 * (500 * 32 + 40 * (34 * 64 + 1) + 2000 * 5 * 32) + 10**6),
          (["--fast-dev-run", "--batch-size", "3000"], "--batch-size", 500 * 32 + 40 * (34 * 64 + 1) + 3000 * 5 * 32)]


@pytest.mark.parametrize("argv,flag,needed", MEMORY, ids=[" ".join(a) for a, _, _ in MEMORY])
def test_a_run_that_cannot_fit_in_memory_exits_2(workdir, capsys, monkeypatch, argv, flag, needed):
    monkeypatch.setattr(train, "peak_rss_bytes", lambda: 10**6)
    monkeypatch.setattr(train, "available_memory_bytes", lambda: needed - 1)
    assert_one_line_error(main_in_process(capsys, *TINY, *argv), flag, "GB of memory available")
    assert list(workdir.iterdir()) == []
    monkeypatch.setattr(train, "available_memory_bytes", lambda: needed)
    assert train.parse_args([*TINY, *argv]).features == 32  # exactly fits


def test_on_gpus_the_host_counts_the_stored_rows_and_one_copy_of_the_weights_per_gpu(workdir, capsys, monkeypatch):
    fake_gpus(monkeypatch, 4)
    monkeypatch.setattr(train, "peak_rss_bytes", lambda: 10**6)
    needed = 4 * (500 * 32 + 4 * (34 * 64 + 1)) + 3 * 10**6  # --gpus -1: all 4
    monkeypatch.setattr(train, "available_memory_bytes", lambda: needed - 1)
    assert_one_line_error(main_in_process(capsys, *TINY, "--gpus", "-1"), "--val-samples", "in 4 process(es)")
    monkeypatch.setattr(train, "available_memory_bytes", lambda: needed)
    assert train.parse_args([*TINY, "--gpus", "-1"]).devices == -1
    # On the CPU "auto" is one process, GPUs or not: TINY's rows and its model at 40 bytes a parameter.
    monkeypatch.setattr(train, "available_memory_bytes", lambda: 500 * 32 + 40 * (34 * 64 + 1))
    assert train.parse_args([*TINY, "--accelerator", "cpu", "--devices", "auto"]).devices == "auto"


def test_a_process_lightning_started_does_not_check_the_memory_but_srun_s_do(workdir, capsys, monkeypatch):
    # Lightning starts --devices N's other processes after the first has tuned and filled memory: they must
    # not refuse then (the first would wait for them for ever); srun's and torchrun's start together.
    monkeypatch.setattr(train, "available_memory_bytes", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.parse_args([*TINY, "--devices", "2"]).devices == 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert_one_line_error(main_in_process(capsys, *TINY, "--devices", "2"), "--hidden", "in 2 process(es)")
    for key, value in {**slurm_env(1, 15001), "LOCAL_RANK": "1"}.items():  # srun's task 1 on the node
        monkeypatch.setenv(key, value)
    assert_one_line_error(main_in_process(capsys, *TINY, "--devices", "2"), "--hidden", "in 2 process(es)")


def test_a_cgroup_memory_limit_is_the_memory_available(workdir, capsys, monkeypatch, tmp_path):
    # A container's or a SLURM job's --mem, in a fake tree at this process's own cgroup paths (v1 and v2):
    # a limit of 1 GB, 300 MB used of which 100 MB is page cache, and no limit above it.
    kinds = {kind: (str(tmp_path / (kind or "v2")), *files[1:]) for kind, files in train.CGROUP_MEMORY_FILES.items()}
    monkeypatch.setattr(train, "CGROUP_MEMORY_FILES", kinds)
    with open("/proc/self/cgroup") as cgroups:
        memberships = [line.rstrip("\n").split(":", 2) for line in cgroups]
    for _, controllers, path in memberships:
        kind = "memory" if "memory" in controllers.split(",") else controllers
        if kind not in kinds:
            continue
        mount, limit_file, usage_file, prefix = kinds[kind]
        own = pathlib.Path(os.path.normpath(mount + path))
        own.mkdir(parents=True, exist_ok=True)
        (own / limit_file).write_text("1000000000\n")
        (own / usage_file).write_text("300000000\n")
        (own / "memory.stat").write_text(f"{prefix}anon 150000000\n{prefix}active_file 60000000\n"
                                         f"{prefix}inactive_file 40000000\n")
        if own != pathlib.Path(mount):  # the mount's root: no limit ("max" in v2, the largest number in v1)
            (pathlib.Path(mount) / limit_file).write_text("max\n" if kind == "" else f"{2**63 - 4096}\n")
            (pathlib.Path(mount) / usage_file).write_text("5000000000\n")
            (pathlib.Path(mount) / "memory.stat").write_text(f"{prefix}active_file 0\n{prefix}inactive_file 0\n")
    assert train.available_memory_bytes() == 800_000_000
    assert_one_line_error(main_in_process(capsys, *TINY, "--hidden", "1000000"), "--hidden",
                          "more than the 0.80 GB of memory available")
    assert train.parse_args([*TINY, "--hidden", "100000"]).hidden == 100000  # 136 MB


def test_a_bad_value_from_the_shell(workdir):
    proc = run_train("--train-samples", "0", cwd=workdir, check=False)
    assert_one_line_error(proc, "--train-samples", ">= 1")
    assert proc.stdout == "" and list(workdir.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("argv", [["--gpus", "1"], ["--gpus", "2"], ["--gpus", "-1"], ["--accelerator", "gpu"]],
                         ids=" ".join)
def test_gpus_without_cuda_exits_2(workdir, capsys, argv):
    proc = run_train(*argv, cwd=workdir, check=False) if argv[1] == "1" else main_in_process(capsys, *argv)
    assert_one_line_error(proc, argv[0], "CUDA")
    assert list(workdir.iterdir()) == []


def test_more_gpus_than_cuda_sees_exits_2(workdir, capsys, monkeypatch):
    # Lightning raised "You requested gpu: [0, 1] But your machine only has: [0]" in a traceback.
    fake_gpus(monkeypatch, 1)
    assert_one_line_error(main_in_process(capsys, *TINY, "--gpus", "2"), "--gpus: 2 GPUs asked for, but CUDA sees 1")
    assert_one_line_error(main_in_process(capsys, *TINY, "--accelerator", "gpu", "--devices", "3"),
                          "--devices: 3 GPUs asked for, but CUDA sees 1")
    assert list(workdir.iterdir()) == []
    for argv in (["--gpus", "1"], ["--gpus", "-1"], ["--accelerator", "auto", "--devices", "auto"]):
        assert train.parse_args([*TINY, *argv]).accelerator in ("gpu", "auto")


def test_more_than_apple_silicon_s_one_gpu_exits_2(workdir, capsys, monkeypatch):
    # Lightning raised "You requested gpu: [0, 1] But your machine only has: [0]" in a traceback.
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # this machine as a Mac
    monkeypatch.setattr(lightning_fabric.accelerators.mps.MPSAccelerator, "is_available", lambda: True)
    assert_one_line_error(main_in_process(capsys, *TINY, "--accelerator", "mps", "--devices", "2"),
                          "--devices: 2 GPUs asked for, but MPS sees 1")
    assert list(workdir.iterdir()) == []
    for devices in ("1", "-1", "auto"):
        assert train.parse_args([*TINY, "--accelerator", "mps", "--devices", devices]).accelerator == "mps"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the machine without MPS")
def test_mps_where_there_is_none_exits_2(workdir, capsys):
    assert_one_line_error(main_in_process(capsys, "--accelerator", "mps"), "--accelerator", "mps")
    assert list(workdir.iterdir()) == []


def test_logdir_that_is_a_file(workdir, capsys):
    (workdir / "taken").write_text("x")
    assert_one_line_error(main_in_process(capsys, "--logdir", "taken"), "--logdir")


def test_logdir_inside_a_file(workdir, capsys):
    (workdir / "taken").write_text("x")
    assert_one_line_error(main_in_process(capsys, "--logdir", "taken/runs"), "--logdir", "cannot create folders")
    assert [p.name for p in workdir.iterdir()] == ["taken"]


def test_logdir_where_no_folder_can_be_made(workdir, capsys):
    assert_one_line_error(main_in_process(capsys, "--logdir", "/proc/runs"), "--logdir", "cannot create folders")


def test_resume_from_missing_or_foreign_files(workdir, capsys):
    assert_one_line_error(main_in_process(capsys, "--resume", "nope.ckpt"), "--resume", "no such file")
    (workdir / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert_one_line_error(main_in_process(capsys, "--resume", "junk.ckpt"), "--resume", "not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, workdir / "plain.ckpt")
    assert_one_line_error(main_in_process(capsys, "--resume", "plain.ckpt"), "--resume", "not a checkpoint")
    (workdir / "version_0" / "checkpoints").mkdir(parents=True)  # a run's folder, not its last.ckpt
    for folder in ("version_0", "version_0/checkpoints"):
        assert_one_line_error(main_in_process(capsys, "--resume", folder), "--resume",
                              f"'{folder}' is a folder; give the run's checkpoints/last.ckpt")
    assert sorted(p.name for p in workdir.iterdir()) == ["junk.ckpt", "plain.ckpt", "version_0"]


def test_every_train_py_command_in_the_readme_parses(monkeypatch, tmp_path):
    """The README's commands name flags that exist, with values train.py accepts (8 GPUs assumed)."""
    monkeypatch.chdir(tmp_path)
    fake_gpus(monkeypatch, 8)
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line.split("#")[0] for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if "train.py" in line and not line.lstrip().startswith("#")]
    assert len(commands) >= 6, commands
    for command in commands:
        argv = shlex.split(re.split(r"\$[({]", command.split("train.py", 1)[1])[0])  # less the shell's part
        args = train.parse_args(argv)
        assert args.accelerator in ("cpu", "gpu"), command
