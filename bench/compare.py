"""Training throughput of train.py against a bare PyTorch loop doing the same math.

    python bench/compare.py                              # 32-true, bf16-mixed, bf16-true; D=21000, batch 512
    python bench/compare.py --precisions 32-true --steps 8 --rounds 3
    python bench/compare.py --accelerator gpu            # on a GPU

For each precision, in this one process: the bare loop (the same two Linear layers, BCE on
logits, fused Adam, batches sliced from one tensor already in memory, no framework), then
train.py's own DataModule, LightningModule, TrainThroughput callback and a real Trainer, tuning
off. Each prints the median of steady-state samples/s over --steps steps after --warmup steps;
the ratio is train.py's over the bare loop's. Last, the data loader alone: the median time to
produce one batch, as a share of train.py's median step.
"""

import argparse
import os
import statistics
import sys
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train import SumSignDataModule, SumSignModel, TrainThroughput  # noqa: E402

DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(args, precision: str, device: torch.device) -> float:
    """Samples/s of the hand-written loop: median over steps after warm-up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.features, args.hidden), nn.Linear(args.hidden, 1))
    model = model.to(device=device, dtype=DTYPES[precision])
    x = (torch.rand(args.batches * args.batch_size, args.features, device=device) * 2 - 1).to(DTYPES[precision])
    y = (x.float().sum(1) > 0).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    seconds = []
    for step in range(args.warmup + args.steps):
        rows = slice((step % args.batches) * args.batch_size, (step % args.batches + 1) * args.batch_size)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(x[rows]).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(seconds[args.warmup :])


def lightning_run(args, precision: str, datamodule: SumSignDataModule):
    """Samples/s of train.py's pipeline, measured by its own TrainThroughput; and its median step."""
    torch.manual_seed(0)
    model = SumSignModel(args.features, args.hidden, lr=1e-4, batch_size=args.batch_size)
    probe = TrainThroughput()
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision=precision, max_epochs=1,
        limit_train_batches=args.warmup + args.steps + 1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[probe], use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=datamodule)
    # TrainThroughput already leaves out the first batch; drop the rest of the warm-up too.
    probe.step_seconds, probe.step_samples = probe.step_seconds[args.warmup :], probe.step_samples[args.warmup :]
    return probe.samples_per_second, statistics.median(probe.step_seconds)


def loader_seconds(args, datamodule: SumSignDataModule, device: torch.device) -> float:
    """Median time for the train loader alone to produce one batch."""
    batches = iter(datamodule.train_dataloader())
    seconds = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        next(batches)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[args.warmup :])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--features", type=int, default=21000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-samples", type=int, default=43210)
    p.add_argument("--batches", type=int, default=4, help="distinct batches the bare loop cycles through")
    p.add_argument("--steps", type=int, default=5, help="measured steps per run (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring (default: 2)")
    p.add_argument("--rounds", type=int, default=1, help="bare/train.py pairs per precision; medians (default: 1)")
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 on tensor cores
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    datamodule = SumSignDataModule(args.train_samples, 1, args.features, seed=42, batch_size=args.batch_size)

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads; D={args.features}, hidden={args.hidden}, "
          f"batch={args.batch_size}; medians of {args.steps} steps after {args.warmup}, "
          f"{args.rounds} round(s)", flush=True)
    print(f"{'precision':<11} {'bare samples/s':>15} {'train.py samples/s':>19} {'ratio':>6}", flush=True)
    step = None
    for precision in args.precisions:
        # Alternate the two, so drift in a shared machine's speed hits both alike.
        bares, ours_runs = [], []
        for _ in range(args.rounds):
            bares.append(bare_loop(args, precision, device))
            ours_runs.append(lightning_run(args, precision, datamodule))
        bare = statistics.median(bares)
        ours, step_seconds = sorted(ours_runs)[len(ours_runs) // 2]
        step = step if step is not None else step_seconds
        print(f"{precision:<11} {bare:>15.1f} {ours:>19.1f} {ours / bare:>6.3f}", flush=True)
    load = loader_seconds(args, datamodule, device)
    print(f"loader alone: {load * 1e3:.1f} ms per batch = {load / step:.1%} of train.py's "
          f"{args.precisions[0]} step ({step * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
