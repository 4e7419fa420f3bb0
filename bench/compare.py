"""Training throughput of train.py against a bare PyTorch loop doing the same math.

    python bench/compare.py                              # CPU; D=21000, batch 512
    python bench/compare.py --steps 8 --rounds 3         # steadier medians
    python bench/compare.py --accelerator gpu            # on a GPU

In this one process, alternating so that drift in a shared machine's speed hits both alike:
- the bare loop (the same two Linear layers, BCE on logits, fused Adam, batches sliced from one
  tensor already in memory, no framework) in 32-true, bf16-mixed (autocast) and bf16-true;
- train.py's own DataModule, LightningModule and Trainer (train.make_trainer, progress bar and
  all, tuning off), in each of those precisions, and at its default, --precision auto, on the
  fixed set and with --fresh-data.
Each figure is samples/s in the steady state, after --warmup steps: on the CPU the median over
steps, on a GPU the mean over the window, which is timed between two synchronisations (a GPU step
is queued, not run, when the CPU reaches it). Ratios are to the bare loop in the same precision
and to the bare float32 loop, the speed a hand-written script gets by default. Last, the data
loader alone: the time to produce one batch, as a share of train.py's step.
"""

import argparse
import logging
import os
import statistics
import sys
import time
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn

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


def train_py(args, precision: str, datamodule) -> float:
    """Samples/s of train.py's pipeline: its DataModule, LightningModule and Trainer, tuning off."""
    torch.manual_seed(0)
    model = train.SumSignModel(args.features, args.hidden, lr=1e-4, batch_size=args.batch_size)
    probe = StepEnds(args.warmup, args.steps)
    options = SimpleNamespace(accelerator=args.accelerator, precision=precision, deterministic=False)
    # one validation batch after the measured steps: the lr schedule needs a val_loss
    trainer = train.make_trainer(options, devices=1, max_epochs=1, limit_train_batches=args.warmup + args.steps + 1,
                                 limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                                 enable_checkpointing=False, callbacks=[probe])
    trainer.fit(model, datamodule=datamodule)
    return rate(probe.ends, args.batch_size, model.device)


def loader_seconds(args, datamodule, device: torch.device) -> float:
    """Median time for train.py's train loader alone to produce one batch."""
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
    bf16 = sorted(train.cpu_flags().intersection(train.NATIVE_BF16_CPU_FLAGS))
    return f"{name} ({', '.join(bf16) or 'no native bf16'}), {torch.get_num_threads()} threads"


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
    p.add_argument("--rounds", type=int, default=1, help="bare/train.py pairs per row; medians (default: 1)")
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 on tensor cores
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # as train.py: results only
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    auto, why = train.auto_precision(args.accelerator, train.cpu_flags())
    fixed = train.SumSignDataModule(args.train_samples, 1, args.features, seed=42, batch_size=args.batch_size)
    fresh = train.SumSignDataModule(args.train_samples, 1, args.features, seed=42, batch_size=args.batch_size,
                                    fresh_data=True)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}; torch "
          f"{torch.__version__}, Lightning {pl.__version__}; D={args.features}, hidden={args.hidden}, "
          f"batch={args.batch_size}; {args.steps} steps after {args.warmup}, {args.rounds} round(s)", flush=True)
    rows = [(precision, precision, fixed) for precision in DTYPES]
    rows += [(f"default (auto: {auto})", auto, fixed), ("default, --fresh-data", auto, fresh)]
    table = [f"{'train.py precision':<34} {'bare samples/s':>14} {'train.py samples/s':>18} {'ratio':>6} "
             f"{'vs bare 32-true':>15}"]
    bare32 = None
    for label, precision, datamodule in rows:
        bares, ours = [], []
        for _ in range(args.rounds):
            bares.append(bare_loop(args, precision, device))
            ours.append(train_py(args, precision, datamodule))
        bare, mine = statistics.median(bares), statistics.median(ours)
        bare32 = bare32 or bare  # the first row is 32-true
        table.append(f"{label:<34} {bare:>14.1f} {mine:>18.1f} {mine / bare:>6.3f} {mine / bare32:>15.3f}")
    step = args.batch_size / train_py(args, auto, fixed)
    for name, datamodule in (("fixed set", fixed), ("--fresh-data", fresh)):
        load = loader_seconds(args, datamodule, device)
        table.append(f"loader alone, {name}: {load * 1e3:.1f} ms per batch = {load / step:.1%} of train.py's "
                     f"{auto} step ({step * 1e3:.0f} ms)")
    table.append(f"auto precision here: {auto} ({why})")
    print("\n" + "\n".join(table))  # after the runs' progress bars


if __name__ == "__main__":
    main()
