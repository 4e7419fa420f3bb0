"""Step time of train.py against a bare PyTorch loop and a minimal LightningModule with the same math.

    python bench/compare.py                              # CPU; D=21000, batch 512
    python bench/compare.py --steps 8 --rounds 3         # steadier medians
    python bench/compare.py --tiny                       # 64 features, hidden 64, batch 64: Python's cost
    python bench/compare.py --accelerator gpu            # on a GPU

In this one process, alternating so that drift in a shared machine's speed hits all alike:
- the bare loop (the same two Linear layers, BCE on logits, fused Adam, batches sliced from one
  tensor already in memory, no framework) in 32-true, bf16-mixed (autocast) and bf16-true;
- a minimal LightningModule with the same math: one self.log("train_loss", prog_bar=True) a step,
  a default Trainer (progress bar, TensorBoard logger, checkpointing), no callbacks but the timing
  probe, whole batches from memory (batch_size=None, no collation): Lightning's own floor;
- train.py itself: main() with tuning off, so its DataModule, LightningModule, Trainer, callbacks
  and logger, in each of those precisions, and at its default, --precision auto, with new rows
  every epoch (the default) and with --fixed-data; its figure is the one summary.json reports (TrainThroughput).
Each figure is samples/s in the steady state: on the CPU the median over steps, on a GPU the mean
over the window, which is timed between two synchronisations (a GPU step is queued, not run, when
the CPU reaches it). Ratios are to the bare loop in the same precision
and to the bare float32 loop, the speed a hand-written script gets by default. Last, the data
loader alone: the time to produce one batch, as a share of train.py's step.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402

DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step_ends: list[float], batch_size: int, device: torch.device) -> float:
    """Samples/s from the times at which steady-state steps ended (the first one starts the window)."""
    if device.type == "cuda":
        return batch_size * (len(step_ends) - 1) / (step_ends[-1] - step_ends[0])
    return batch_size / statistics.median(b - a for a, b in zip(step_ends, step_ends[1:]))


def bare_loop(args, precision: str, device: torch.device) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.features, args.hidden), nn.Linear(args.hidden, 1))
    model = model.to(device=device, dtype=DTYPES[precision])
    x = (torch.rand(args.batches * args.batch_size, args.features, device=device) * 2 - 1).to(DTYPES[precision])
    y = (x.float().sum(1) > 0).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    ends = []
    for step in range(args.warmup + args.steps + 1):
        rows = slice((step % args.batches) * args.batch_size, (step % args.batches + 1) * args.batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(x[rows]).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            if device.type == "cpu" or step in (args.warmup, args.warmup + args.steps):
                sync(device)
            ends.append(time.perf_counter())
    return rate(ends, args.batch_size, device)


class StepEnds(Callback):
    """When each steady-state training step ended; synchronised only at the window's two ends on a GPU."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.ends = warmup, steps, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            if pl_module.device.type == "cpu" or batch_idx in (self.warmup, self.warmup + self.steps):
                sync(pl_module.device)
            self.ends.append(time.perf_counter())


class MinimalModule(pl.LightningModule):
    """The bare loop's math in the smallest LightningModule: one self.log a step."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self.net(x).squeeze(1).float(), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4, fused=True)


def minimal_lightning(args, precision: str, device: torch.device) -> float:
    """Samples/s of MinimalModule under a default Trainer, batches already in memory."""
    torch.manual_seed(0)
    x = (torch.rand(args.batches * args.batch_size, args.features, device=device) * 2 - 1).to(DTYPES[precision])
    y = (x.float().sum(1) > 0).float()
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    probe = StepEnds(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(accelerator=args.accelerator, devices=1, precision=precision, default_root_dir=root,
                             max_steps=args.warmup + args.steps + 1, enable_model_summary=False, callbacks=[probe])
        trainer.fit(MinimalModule(args.features, args.hidden), DataLoader(batches * (args.warmup + args.steps + 1),
                                                                          batch_size=None))
    return rate(probe.ends, args.batch_size, device)


def train_py(args, precision: str, fixed: bool) -> float:
    """Samples/s of train.py itself: main() with tuning off, its callbacks and logger, one epoch.

    The figure is TrainThroughput's, the median step as summary.json reports it.
    """
    with tempfile.TemporaryDirectory() as logdir:
        argv = ["--accelerator", args.accelerator, "--precision", precision, "--features", str(args.features),
                "--hidden", str(args.hidden), "--batch-size", str(args.batch_size), "--train-samples",
                str((args.warmup + args.steps + 1) * args.batch_size), "--val-samples", str(args.batch_size),
                "--no-scale-batch-size", "--no-lr-find", "--lr", "1e-4", "--max-epochs", "1", "--logdir", logdir,
                *(["--fixed-data"] if fixed else [])]
        with contextlib.redirect_stdout(io.StringIO()):  # its milestones and progress bar: the table alone
            assert train.main(argv) == 0
        with open(os.path.join(logdir, "version_0", "summary.json")) as f:
            return json.load(f)["train_samples_per_second"]


def loader_seconds(args, datamodule, device: torch.device, precision: str) -> float:
    """Median time for train.py's train loader alone to produce one batch."""
    # what the DataModule reads of its Trainer, which fit() detaches when it ends
    datamodule.trainer = SimpleNamespace(current_epoch=0, world_size=1, global_rank=0, precision=precision,
                                         strategy=SimpleNamespace(root_device=device))
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    seconds = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        next(batches)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[args.warmup :])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name} (bf16: {train.cpu_bf16()}), {torch.get_num_threads()} threads"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--features", type=int, default=21000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-samples", type=int, default=43210)
    p.add_argument("--batches", type=int, default=4, help="distinct batches the bare loop cycles through")
    p.add_argument("--steps", type=int, default=5, help="measured steps per run (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring (default: 2)")
    p.add_argument("--rounds", type=int, default=1, help="bare/minimal/train.py runs per row; medians (default: 1)")
    p.add_argument("--precisions", nargs="+", choices=[*DTYPES, "auto"], default=[*DTYPES, "auto"],
                   help="rows to run; auto = train.py's default, with new rows and --fixed-data (default: all)")
    p.add_argument("--tiny", action="store_true",
                   help="64 features, hidden 64, batch 64, 32-true, 200 steps after 50: Python's cost per step")
    args = p.parse_args()
    if args.tiny:
        args.features, args.hidden, args.batch_size, args.precisions = 64, 64, 64, ["32-true"]
        args.steps, args.warmup = max(args.steps, 200), max(args.warmup, 50)
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 on tensor cores
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # as train.py: results only
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    auto, why = train.auto_precision(args.accelerator)
    fresh = train.SumSignDataModule(args.train_samples, 1, args.features, seed=42, batch_size=args.batch_size)
    fixed = train.SumSignDataModule(args.train_samples, 1, args.features, seed=42, batch_size=args.batch_size,
                                    fixed_data=True)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}; torch "
          f"{torch.__version__}, Lightning {pl.__version__}; D={args.features}, hidden={args.hidden}, "
          f"batch={args.batch_size}; {args.steps} steps after {args.warmup}, {args.rounds} round(s)", flush=True)
    rows = [(precision, precision, False) for precision in DTYPES if precision in args.precisions]
    if "auto" in args.precisions:
        rows += [(f"default (auto: {auto})", auto, False), ("default, --fixed-data", auto, True)]
    table = [f"{'precision':<28} {'ms per step: bare':>17} {'minimal Lightning':>17} {'train.py':>9} "
             f"{'train.py/minimal':>16} {'train.py/bare':>13} {'vs bare 32-true':>15}"]
    bare32 = None
    for label, precision, fixed_data in rows:
        bares, minimals, ours = [], [], []
        for _ in range(args.rounds):
            bares.append(bare_loop(args, precision, device))
            minimals.append(minimal_lightning(args, precision, device))
            ours.append(train_py(args, precision, fixed_data))
        bare, minimal, mine = (statistics.median(rates) for rates in (bares, minimals, ours))
        bare32 = bare32 or (bare if precision == "32-true" else None)
        ms = [args.batch_size / rate_ * 1e3 for rate_ in (bare, minimal, mine)]
        table.append(f"{label:<28} {ms[0]:>17.3f} {ms[1]:>17.3f} {ms[2]:>9.3f} {minimal / mine:>16.3f} "
                     f"{bare / mine:>13.3f} {mine / bare32 if bare32 else float('nan'):>15.3f}")
    table.append("(step-time ratios: train.py/minimal 1.10 means train.py's step takes 10% longer)")
    precision = auto if "auto" in args.precisions else rows[0][1]
    step = args.batch_size / train_py(args, precision, False)
    for name, datamodule in (("new rows", fresh), ("--fixed-data", fixed)):
        load = loader_seconds(args, datamodule, device, precision)
        table.append(f"loader alone, {name}: {load * 1e3:.3f} ms per batch = {load / step:.1%} of train.py's "
                     f"{precision} step ({step * 1e3:.3f} ms)")
    table.append(f"auto precision here: {auto} ({why})")
    print("\n" + "\n".join(table))  # after the runs' progress bars


if __name__ == "__main__":
    main()
