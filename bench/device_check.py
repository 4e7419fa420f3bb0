"""Check train.py's GPU path in one call and write one markdown report.

    python3 bench/device_check.py --out DIR            # a CUDA GPU: about 6 minutes on one H100 or H200
    python3 bench/device_check.py --smoke --out DIR    # the same steps on the CPU at tiny sizes: about a minute
    python3 bench/device_check.py --only 3 4 --out DIR # some of the steps

It needs only what train.py needs (torch, pytorch-lightning, torchmetrics, tensorboard,
matplotlib), no network. Each step runs train.py or a bench in processes of its own, is timed,
and may fail without stopping the others; DIR/report.md is rewritten after every step, so a
call cut short still leaves what it measured.

1. `train.py --gpus 1` at the defaults: wall time, seconds of training until val_acc >= 0.99 on
   never-seen rows, what ended the run, summary.json, peak GPU memory; each epoch's seconds against
   its training steps' (the rest is validation and checkpoints), and the time to write last.ckpt.
2. bench/compare.py: train.py against the bare loop and a minimal LightningModule in 32-true (TF32),
   bf16-mixed, bf16-true, and the same at tiny shapes (Python's cost per step).
3. `--deterministic` reruns at a small size: identical weights?
4. SIGTERM during training, then `--resume` as printed: the same weights as a run never stopped?
5. `--fixed-data`, the article's one fixed set: wall time and best val_acc.
6. Host synchronisations per training step (torch.cuda.set_sync_debug_mode): the GPU never waits.
"""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
TARGET_ACC = 0.99


def sizes(smoke: bool, small: list[str], tiny: list[str]) -> list[str]:
    return tiny if smoke else small


def flags_value(flags: list[str], flag: str) -> str | None:
    return flags[flags.index(flag) + 1] if flag in flags else None


def time_to_target(run: str, rows: int) -> tuple[list[str], list, tuple | None]:
    """Report lines on when val_acc first reached TARGET_ACC, in seconds of training, and where each epoch's
    time went; the curve; that point."""
    events = event_scalars(run)
    fit_start = events["lr-Adam"][0][0]  # logged as epoch 0 starts
    curve = [(wall - fit_start, acc) for wall, acc in events["val_acc"]]
    reached = next(((t, e, acc) for e, (t, acc) in enumerate(curve) if acc >= TARGET_ACC), None)
    # From one val_acc to the next: the last epoch's checkpoints, this epoch's steps and its validation.
    ends = [0.0] + [t for t, _ in curve]
    epoch_seconds = [b - a for a, b in zip(ends, ends[1:])]
    step_seconds = [rows / rate for _, rate in events["train_samples_per_second"]]
    lines = [(f"- val_acc >= {TARGET_ACC} after **{reached[0]:.1f} s of training** (epoch {reached[1]}, "
              f"{(reached[1] + 1) * rows:,} new rows seen), val_acc {reached[2]:.4f}" if reached else
              f"- val_acc never reached {TARGET_ACC}: best {max(a for _, a in curve):.4f}"),
             f"- of {sum(epoch_seconds):.1f} s of epochs, {sum(step_seconds):.1f} s were training steps (rows / "
             f"train_samples_per_second, the median step); the rest, {sum(epoch_seconds) - sum(step_seconds):.1f} s, "
             "went to validation, checkpoint writes and each epoch's first step", "",
             "| epoch | seconds into training | epoch seconds | of them training steps | val_acc | lr |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |",
             *[f"| {e} | {t:.1f} | {epoch:.2f} | {steps:.2f} | {acc:.4f} | {lr:.3g} |"
               for e, ((t, acc), epoch, steps, (_, lr))
               in enumerate(zip(curve, epoch_seconds, step_seconds, events["lr-Adam"]))]]
    return lines, curve, reached


def checkpoint_write_seconds(run: str, device: str) -> tuple[list[str], dict]:
    """Time train.py's own writer saving the run's last.ckpt, its tensors on `device`, as each epoch does."""
    checkpoint = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), map_location=device, weights_only=False)
    path = os.path.join(run, "checkpoints", "timed.ckpt")
    seconds, writer = [], train.CheckpointWriter()
    for _ in range(3):
        start = time.perf_counter()
        writer.save_checkpoint(checkpoint, path)
        copied = time.perf_counter()
        writer.teardown()
        seconds.append((copied - start, time.perf_counter() - start))
    size = os.path.getsize(path)
    os.remove(path)
    return ([f"- last.ckpt ({size / 1e9:.2f} GB, tensors on {device}), written by train.py's CheckpointWriter three "
             f"times: training waits {', '.join(f'{c:.2f}' for c, _ in seconds)} s for the copy; the file is whole "
             f"after {', '.join(f'{w:.2f}' for _, w in seconds)} s. Every epoch writes it, and the best weights in "
             "an epoch that improves"], {"last_ckpt_bytes": size, "last_ckpt_copy_and_write_seconds": seconds})


class Check:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.hw = ["--accelerator", "cpu"] if args.smoke else ["--gpus", "1"]
        self.work = tempfile.mkdtemp(prefix="device_check_")
        self.sections, self.results = [], {}
        os.makedirs(args.out, exist_ok=True)

    def train(self, name: str, *flags: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float, str]:
        """train.py with `flags` in a folder of its own; (process, wall seconds, run folder)."""
        cwd = os.path.join(self.work, name)
        os.makedirs(cwd, exist_ok=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, TRAIN, *flags], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"train.py {shlex.join(flags)} exited {proc.returncode}:\n{proc.stderr[-2500:]}")
        return proc, time.perf_counter() - start, newest_run(cwd)

    def write(self) -> None:
        head = [f"# device check: {device_name(self.smoke)}", "",
                f"torch {torch.__version__}, pytorch-lightning {__import__('pytorch_lightning').__version__}, "
                f"python {sys.version.split()[0]}; {'smoke mode (CPU, tiny sizes)' if self.smoke else 'GPU'}; "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
        with open(os.path.join(self.args.out, "report.md"), "w") as f:
            f.write("\n".join(head + [line for section in self.sections for line in section]) + "\n")
        with open(os.path.join(self.args.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=2, default=str)

    def run(self, number: int, title: str, step) -> None:
        start = time.perf_counter()
        try:
            lines, result = step()
            status = "ok"
        except Exception:
            lines, result, status = ["```", traceback.format_exc()[-3000:], "```"], {}, "FAILED"
        seconds = time.perf_counter() - start
        self.sections.append([f"## {number}. {title}: {status} ({seconds:.0f} s)", "", *lines, ""])
        self.results[str(number)] = {"title": title, "status": status, "seconds": seconds, **result}
        self.write()
        print(f"step {number} ({title}): {status} in {seconds:.0f} s", flush=True)

    # --- 1 ------------------------------------------------------------------------------------
    def defaults(self):
        flags = [*self.hw, *sizes(self.smoke, [], ["--features", "32", "--train-samples", "4000", "--val-samples",
                                                    "500", "--hidden", "64", "--max-epochs", "8"])]
        with GpuMemoryPoll(self.smoke) as memory:
            proc, seconds, run = self.train("defaults", *flags)
        s = json.load(open(os.path.join(run, "summary.json")))
        milestones = [line for line in proc.stdout.splitlines() if re.match(r"(precision|batch size|learning rate|"
                                                                             r"best checkpoint|done in):", line)]
        curve_lines, curve, reached = time_to_target(run, int(flags_value(flags, "--train-samples") or 43210))
        write_lines, writes = checkpoint_write_seconds(run, "cpu" if self.smoke else "cuda")
        lines = [f"`python train.py {shlex.join(flags)}`: {seconds:.1f} s wall, exit 0, ended by "
                 f"**{s['ended_by']}**", "", "```", *milestones, "```", "", *write_lines, *curve_lines, "",
                 "| summary.json | value |", "| --- | --- |",
                 *[f"| {k} | {v} |" for k, v in s.items() if k not in ("checkpoint", "last_checkpoint")],
                 f"| peak GPU memory, nvidia-smi (whole process) | {memory.peak_text()} |"]
        return lines, {"wall_seconds": seconds, "summary": s, "nvidia_smi_peak_mib": memory.peak_mib,
                       "seconds_to_target": reached and reached[0], "curve": curve, **writes}

    # --- 2 ------------------------------------------------------------------------------------
    def compare(self):
        hw = ["--accelerator", "cpu" if self.smoke else "gpu"]
        real = (["--features", "256", "--hidden", "64", "--train-samples", "4096", "--steps", "5", "--warmup", "2"]
                if self.smoke else ["--steps", "60", "--warmup", "15", "--rounds", "3"])
        lines, tables = [], []
        for flags in ([*hw, *real], [*hw, "--tiny", *([] if self.smoke else ["--rounds", "3"])]):
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare.py"), *flags],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2500:])
            out = proc.stdout.replace("\r", "\n").splitlines()  # the runs' progress bars, then the table
            start = next(i for i, line in enumerate(out) if line.startswith("precision "))
            tables.append([out[0], *out[start:]])
            lines += [f"`python bench/compare.py {shlex.join(flags)}`", "", "```", *tables[-1], "```", ""]
        return lines, {"table": tables[0], "tiny_table": tables[1]}

    # --- 3 ------------------------------------------------------------------------------------
    def deterministic(self):
        small = sizes(self.smoke, ["--features", "2048", "--train-samples", "16384", "--val-samples", "1024",
                                   "--hidden", "512", "--max-epochs", "3"],
                      ["--features", "32", "--train-samples", "2000", "--val-samples", "300", "--hidden", "32",
                       "--max-epochs", "2"])
        runs = {name: self.train(name, *self.hw, *small, *flags)[2] for name, flags in
                (("det_a", ["--deterministic"]), ("det_b", ["--deterministic"]), ("nondet", []))}
        weights = {name: last_weights(run) for name, run in runs.items()}
        same = same_weights(weights["det_a"], weights["det_b"])
        free = same_weights(weights["det_a"], weights["nondet"])
        lines = [f"`python train.py {shlex.join([*self.hw, *small])} --deterministic`, twice, then once without:",
                 "", f"- the two --deterministic runs end with bit-identical weights: **{same}**",
                 f"- a run without --deterministic ends with the same weights too: {free}"]
        return lines, {"deterministic_identical": same, "without_flag_identical": free}

    # --- 4 ------------------------------------------------------------------------------------
    def sigterm_resume(self):
        small = sizes(self.smoke, ["--features", "4096", "--train-samples", "65536", "--val-samples", "1024",
                                   "--hidden", "512", "--max-epochs", "4", "--no-scale-batch-size",
                                   "--batch-size", "64", "--deterministic"],
                      ["--features", "256", "--train-samples", "32000", "--val-samples", "300", "--hidden", "128",
                       "--max-epochs", "4", "--no-scale-batch-size", "--batch-size", "64"])
        flags = [*self.hw, *small, "--patience", "10"]
        _, _, full = self.train("uninterrupted", *flags)
        cwd = os.path.join(self.work, "interrupted")
        os.makedirs(cwd)
        # its output goes to files: a pipe nobody reads while it trains would fill up and stop it
        output = open(os.path.join(cwd, "stdout.txt"), "w"), open(os.path.join(cwd, "stderr.txt"), "w")
        proc = subprocess.Popen([sys.executable, TRAIN, *flags], cwd=cwd, stdout=output[0], stderr=output[1],
                                text=True)
        last = os.path.join(cwd, "lightning_logs", "version_0", "checkpoints", "last.ckpt")
        deadline = time.monotonic() + 300
        while not os.path.exists(last):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"no epoch completed: {open(output[1].name).read()[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.5)  # into the next epoch
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stop_seconds = time.monotonic() - sent
        for f in output:
            f.close()
        out, err = (open(f.name).read() for f in output)
        hint = re.search(r"resume with: python \S+ (.+)$", out, re.M)
        if proc.returncode != 128 + signal.SIGTERM or not hint:
            raise RuntimeError(f"exit {proc.returncode}, no resume hint:\n{out[-1500:]}\n{err[-1500:]}")
        resumed_proc, _, resumed = self.train("interrupted", *shlex.split(hint.group(1)))
        same = same_weights(last_weights(full), last_weights(resumed))
        lines = [f"`python train.py {shlex.join(flags)}`, SIGTERM half a second into epoch 2:", "",
                 f"- exit status {proc.returncode} (128 + 15) after {stop_seconds:.1f} s; it printed:",
                 f"  `{re.search(r'^interrupted by .+$', out, re.M).group(0)}`",
                 f"- resumed with the printed command: exit {resumed_proc.returncode}; final weights bit-identical "
                 f"to a run never stopped: **{same}**"]
        return lines, {"exit_status": proc.returncode, "stop_seconds": stop_seconds, "resume_identical": same}

    # --- 5 ------------------------------------------------------------------------------------
    def fixed_data(self):
        flags = [*self.hw, "--fixed-data", *sizes(self.smoke, [], ["--features", "64", "--train-samples", "4000",
                                                                  "--val-samples", "500", "--hidden", "64"])]
        proc, seconds, run = self.train("fixed", *flags)
        s = json.load(open(os.path.join(run, "summary.json")))
        lines = [f"`python train.py {shlex.join(flags)}`: {seconds:.0f} s wall; batch {s['batch_size']}, lr "
                 f"{s['lr']:.3g}, {s['precision']}, {s['epochs']} epochs, ended by {s['ended_by']}, best val_acc "
                 f"{s['best_val_acc']:.4f} on never-seen rows"]
        return lines, {"summary": s}

    # --- 6 ------------------------------------------------------------------------------------
    def host_syncs(self):
        if self.smoke:
            return ["CPU: there is no host-device synchronisation to count."], {}
        # Two runs that differ only in steps per epoch: the difference in syncs, over the difference
        # in steps, is what one training step costs. Validation, checkpoints and logging cancel out.
        counts, stacks = {}, {}
        small = ["--gpus", "1", "--features", "1024", "--hidden", "256", "--batch-size", "64", "--val-samples", "256",
                 "--max-epochs", "2", "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-3"]
        for batches in (40, 240):
            counts[batches], stacks[batches] = count_syncs(
                [*small, "--train-samples", str(64 * batches), "--logdir", os.path.join(self.work, "syncs")])
        per_step = (sum(counts[240].values()) - sum(counts[40].values())) / (2 * 200)
        growing = (counts[240] - counts[40]).most_common(5)
        lines = [f"- host synchronisations per training step: **{per_step:.2f}** (two runs of 2 epochs, 40 and "
                 f"240 steps each, compared; {sum(counts[40].values())} syncs in the shorter run, from setup, "
                 "validation, checkpoints and logging)"]
        for site, n in growing:
            lines += [f"- per-step sync at {site}: {n / 400:.2f} a step; one call's frames:", "```",
                      stacks[240][site], "```"]
        return lines, {"syncs_per_step": per_step, "sites": growing, "short_run_sites": counts[40].most_common(8)}


class GpuMemoryPoll:
    """Largest GPU memory in use (nvidia-smi, every 0.2 s) while the block runs, above what was in use before."""

    def __init__(self, off: bool):
        self.off, self.peak_mib, self.stop = off, None, threading.Event()

    def used(self):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return int(out.split()[0])

    def __enter__(self):
        if not self.off:
            self.base, self.peak_mib = self.used(), 0
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.2):
            self.peak_mib = max(self.peak_mib, self.used() - self.base)

    def __exit__(self, *exc):
        self.stop.set()

    def peak_text(self):
        return "n/a (CPU)" if self.peak_mib is None else f"{self.peak_mib} MiB"


def count_syncs(argv: list[str]) -> tuple[Counter, dict]:
    """Synchronising CUDA calls during train.main(argv) in this process, by the line that made them;
    and for each such line, the innermost frames of one call that reached it."""
    sites, stacks = Counter(), {}
    torch.cuda.set_sync_debug_mode("warn")
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            site = f"{os.path.basename(filename)}:{lineno}"
            sites[site] += 1
            stacks.setdefault(site, "".join(traceback.format_stack(limit=9)[:-1]))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            assert train.main(argv) == 0
    finally:
        warnings.showwarning = shown
        torch.cuda.set_sync_debug_mode(0)
    return sites, stacks


def newest_run(cwd: str) -> str:
    logdir = os.path.join(cwd, "lightning_logs")
    return max((os.path.join(logdir, d) for d in os.listdir(logdir)), key=os.path.getmtime)


def last_weights(run: str) -> dict:
    path = os.path.join(run, "checkpoints", "last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def event_scalars(run: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run).Reload()
    tags = ("val_acc", "lr-Adam", "train_samples_per_second")
    return {tag: [(e.wall_time, e.value) for e in events.Scalars(tag)] for tag in tags}


def device_name(smoke: bool) -> str:
    if smoke or not torch.cuda.is_available():
        from compare import cpu_name

        return cpu_name()
    return f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for report.md and results.json")
    p.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--only", type=int, nargs="+", choices=range(1, 7), help="run only these steps")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here; use --smoke to run the steps on the CPU")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    check = Check(args)
    steps = [(1, "train.py --gpus 1 at the defaults", check.defaults),
             (2, "compare bench: bare loop, minimal LightningModule, train.py", check.compare),
             (3, "--deterministic reruns", check.deterministic),
             (4, "SIGTERM, then --resume", check.sigterm_resume),
             (5, "--fixed-data: the article's fixed set", check.fixed_data),
             (6, "host synchronisations per training step", check.host_syncs)]
    for number, title, step in steps:
        if not args.only or number in args.only:
            check.run(number, title, step)
    print(f"report: {os.path.join(args.out, 'report.md')}")


if __name__ == "__main__":
    main()
