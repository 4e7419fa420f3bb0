"""Train a two-layer linear network to tell whether 21000 random numbers sum to more than zero.

The classic "zero to hero" PyTorch Lightning tutorial, on Lightning 2.6: synthetic "sum-sign"
data, new rows every epoch, batch-size scaling, then the learning-rate finder, then training with
averaged weights and early stopping on val_acc, checkpoints and TensorBoard logs.

    pip install -r requirements.txt
    python train.py                          # CPU
    python train.py --gpus 1                 # one GPU
    python train.py --fixed-data             # the article's one fixed set of 43210 rows, for comparison
    tensorboard --logdir=lightning_logs      # look at the run
    python train.py <same flags> --resume lightning_logs/version_0/checkpoints/last.ckpt

Each run writes lightning_logs/version_N/: TensorBoard events, hparams.yaml, lr_finder.png,
checkpoints/best-epoch=E.ckpt (weights) and checkpoints/last.ckpt (full state), and summary.json.
Validation is on 10000 rows no run trains on. By default every epoch trains on 43210 new rows and
the model learns the rule: val_acc passes 0.95 after 9 epochs and 0.99 after 62; the run
ends once val_acc stops rising, or after 100 epochs (35 to 65 minutes on a 2-core CPU; docs/results.md).
With --fixed-data the model memorises its set and stops near val_acc 0.8, about what any learner
can generalise from 2 rows per feature.
"""

import signal

if __name__ == "__main__":  # Ctrl-C during the imports (seconds) ends the process, not with their traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import resource
import select
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.accelerators import CUDAAccelerator, MPSAccelerator
from pytorch_lightning.callbacks import (Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, Timer,
                                         WeightAveraging)
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

# bf16 matmuls against float32's on CPUs without fast bf16 units (cpu_bf16()'s answers; docs/design.md).
BF16_SLOWDOWN = {"avx512_bf16 on Intel": ("~1.5x", "AVX512_BF16 without AMX"),
                 "emulated": ("~9x", "no bf16 units: torch emulates them")}
# cgroup v2 ("" controllers) and v1 "memory": mount, limit file, usage file, memory.stat's prefix for subtrees.
CGROUP_MEMORY_FILES = {"": ("/sys/fs/cgroup", "memory.max", "memory.current", ""),
                       "memory": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_")}
MEMORY_FRACTION = 0.5  # of the RAM available when tuning starts that batches may use
AVERAGING_GAMMA = 1  # the averaged weights span about the last half of the steps
# The lr taken is the LR finder's lowest-loss lr over this (fastai's rule; Lightning's suggestion: docs/design.md).
LR_BELOW_LOWEST_LOSS = 10
SIGNAL_GRACE_SECONDS = 10  # a signal whose handler has not run by then ends the process (the main thread waits in C++)
# What --resume must find unchanged: every other flag either may change or is taken from the checkpoint.
RUN_DEFINING_FLAGS = ("features", "hidden", "seed", "train_samples", "val_samples", "fixed_data", "precision",
                      "patience", "lr_decay_epochs")


# ---------------------------------------------------------------------------------------------
def random_stream(device, *key) -> torch.Generator:
    """A generator seeded from `key` alone, e.g. (seed, "val"): no other draw can shift it."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little"))


class SumSignRows(Dataset):
    """`rows` rows of `features` values, labelled 1.0 where they sum to > 0, served a batch at a time.

    A value is an int8 code k from random bits, served as (2k + 1) / 256: 256 evenly spaced values in
    (-1, 1). The rows from `start` on are a function of (key, start) alone, so a rerun or a resume draws
    the same. They are drawn on `device` when asked for and never kept, or, `stored`, drawn once on the
    CPU (the same on every device) and kept on `device` as codes, a byte a feature.
    """

    def __init__(self, rows: int, features: int, key: tuple, device="cpu", dtype=torch.float32, stored=False):
        self.rows, self.features, self.key, self.device, self.dtype = rows, features, key, device, dtype
        self.codes = self.draw(slice(0, rows), "cpu").to(device) if stored else None
        # Labels kept too, as a batch's int8 row sums are slow on a CPU; chunks bound the int32 temporaries.
        self.labels = torch.cat([self.label(chunk) for chunk in self.codes.split(1024)]) if stored else None

    def draw(self, positions: slice, device=None) -> torch.Tensor:
        """The int8 codes of the rows at `positions`, from random bits."""
        generator = random_stream(device or self.device, *self.key, positions.start)
        size = len(range(self.rows)[positions]) * self.features
        bits = torch.empty(-(-size // 8), dtype=torch.int64, device=generator.device)
        bits.random_(-(2**63), None, generator=generator)  # all 64 bits uniform
        return bits.view(torch.int8)[:size].view(-1, self.features)

    def __len__(self) -> int:
        return self.rows

    def label(self, codes: torch.Tensor) -> torch.Tensor:
        return (2 * codes.sum(1, dtype=torch.int32) + self.features > 0).float()  # sum(x) > 0, in integers

    def __getitem__(self, positions: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows at a slice of positions or, stored, at a tensor of indices on `device`: one gather."""
        if self.codes is None:
            codes = self.draw(positions)
            y = self.label(codes)
        else:
            codes, y = self.codes.index_select(0, positions), self.labels.index_select(0, positions)
        return codes.to(self.dtype).mul_(2 / 256).add_(1 / 256), y  # (2k + 1) / 256: exact in bf16 and float16


class SumSignDataModule(pl.LightningDataModule):
    def __init__(self, train_samples: int, val_samples: int, features: int, seed: int, batch_size: int,
                 fixed_data: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore="batch_size", logger=False)  # kept in checkpoints: --resume checks them
        self.batch_size = batch_size  # the batch-size finder sets it here
        self.train_set = self.val_set = None

    def setup(self, stage: str) -> None:
        if self.val_set is not None:  # the tuners and fit each call setup(): draw the data once
            return
        hp, device = self.hparams, self.trainer.strategy.root_device  # the data lives where training runs
        self.val_set = SumSignRows(hp.val_samples, hp.features, (hp.seed, "val"), device, self.dtype, stored=True)
        if hp.fixed_data:
            self.train_set = SumSignRows(hp.train_samples, hp.features, (hp.seed, "train"), device, self.dtype,
                                         stored=True)

    def _shard(self, order: torch.Tensor) -> torch.Tensor:
        # As DistributedSampler does: pad by repeating rows, so every rank gets as many batches.
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_rank = -(-len(order) // world)
        return order.repeat(-(-per_rank * world // len(order)))[: per_rank * world][rank::world]

    @property
    def dtype(self) -> torch.dtype:
        # Batches come in the type the first matmul runs in, in which the values are exact.
        return {"bf16": torch.bfloat16, "16": torch.float16}.get(self.trainer.precision.split("-")[0], torch.float32)

    def _loader(self, rows: Dataset) -> DataLoader:
        # One slice per batch, answered with a whole batch: no per-sample work, no collation.
        batches = [slice(start, start + self.batch_size) for start in range(0, len(rows), self.batch_size)]
        return DataLoader(rows, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        # Called every epoch (reload_dataloaders_every_n_epochs=1): epoch e's rows are a function of (seed, e).
        hp, epoch, device = self.hparams, self.trainer.current_epoch, self.trainer.strategy.root_device
        if not hp.fixed_data:
            rows = -(-hp.train_samples // self.trainer.world_size)  # per rank, as _shard pads
            key = (hp.seed, "train", epoch, self.trainer.global_rank)
            return self._loader(SumSignRows(rows, hp.features, key, device, self.dtype))
        generator = random_stream(device, hp.seed, "order", epoch)
        order = torch.randperm(hp.train_samples, generator=generator, device=device)
        return self._loader(Subset(self.train_set, self._shard(order)))  # a slice of order picks a batch

    def val_dataloader(self) -> DataLoader:
        order = torch.arange(len(self.val_set), device=self.val_set.codes.device)
        return self._loader(Subset(self.val_set, self._shard(order)))


# ---------------------------------------------------------------------------------------------
class SumSignModel(pl.LightningModule):
    """Linear(features, hidden) -> Linear(hidden, 1) -> sigmoid, trained with Adam on BCE."""

    def __init__(self, features: int = 21000, hidden: int = 2048, lr: float = 1e-6, batch_size: int = 512,
                 lr_decay_epochs: float = 2.0):
        super().__init__()
        # The tuners write batch_size and lr here, so checkpoints keep them; main() logs the tuned values.
        self.save_hyperparameters(logger=False)
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 1)  # no activation between: both layers are linear, as the article
        self.val_acc = BinaryAccuracy()
        self.train_loss_epoch = MeanMetric(nan_strategy="disable")  # its NaN check would sync a GPU every step

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability that each row of `x` sums to more than zero."""
        return torch.sigmoid(self.logits(x))

    def _logits_and_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.logits(x)
        return logits, F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))

    def training_step(self, batch, batch_idx):
        _, loss = self._logits_and_loss(batch)
        self.train_loss_epoch.update(loss.detach().expand(len(batch[1])))  # one value a row: weighted by rows
        # Logged only on the steps the logger writes; on a GPU the bar shows the epoch mean (no sync a step).
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train_loss", loss, prog_bar=self.device.type == "cpu")
        return loss

    def validation_step(self, batch, batch_idx):
        logits, loss = self._logits_and_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.val_acc(logits > 0, batch[1])  # given logits all within [0, 1], torchmetrics takes them for probabilities
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=True)
        # lr / (1 + epochs / N), lowered every step: fast at first, ever less noise later (docs/design.md).
        decay = LambdaLR(optimizer, lambda _: 1 / (1 + self.epochs_trained() / self.hparams.lr_decay_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    def epochs_trained(self) -> float:
        """Epochs trained, the running one's steps as a fraction: not steps, which a resume on more devices shrinks."""
        steps = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return self.trainer.current_epoch + steps / self.trainer.num_training_batches

    def on_train_epoch_end(self):
        self.log("train_loss_epoch", self.train_loss_epoch, prog_bar=self.device.type != "cpu")

    def on_save_checkpoint(self, checkpoint):
        # Lightning calls no callback for a weights-only checkpoint: put the validated, averaged weights in.
        averaging = callback(self.trainer, IterateAveraging)
        if averaging and "optimizer_states" not in checkpoint:
            checkpoint["state_dict"] = averaging.averaged_state_dict()


class IterateAveraging(WeightAveraging):
    """Validate, checkpoint and keep a polynomial-decay average of the weights (Shamir & Zhang 2013):
    step t moves it (gamma + 1) / (t + gamma) of the way, so it spans the last 1 / (gamma + 1) of training.
    The average is float32 whatever the precision: in bf16 its late, small steps would round away.
    """

    def __init__(self, gamma: float = AVERAGING_GAMMA):
        super().__init__()
        self.gamma, self.training_weights = gamma, None

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # Lightning copies the model as it is: in bf16 under bf16-true
            self._average_model.module.float()

    def on_validation_epoch_start(self, trainer, pl_module):
        # Lightning swaps the two through the model's weights, which would round the average to bf16 each epoch.
        self.training_weights = [p.detach().clone() for p in pl_module.parameters()]
        self._copy_average_to_current(pl_module)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        for weight, training_weight in zip(pl_module.parameters(), self.training_weights):
            weight.copy_(training_weight)
        self.training_weights = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, *args):
        # Counted by the trainer: AveragedModel.update_parameters reads its count on the GPU, a sync a step.
        step = trainer.global_step
        if step > self._latest_update_step:
            averaged = list(self._average_model.module.parameters())
            current = [p.detach().to(a.dtype) for a, p in zip(averaged, pl_module.parameters())]  # float32 average
            torch._foreach_lerp_(averaged, current, (self.gamma + 1) / (step + self.gamma))  # all of it at step 1
            self._average_model.n_averaged += 1  # the count saved in checkpoints stays true
            self._latest_update_step = step

    def averaged_state_dict(self) -> dict:
        return self._average_model.module.state_dict()


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    t_start = time.perf_counter()
    args = parse_args(argv)
    stop = StopOnSignal(argv, args.resume)
    try:
        pl.seed_everything(args.seed, verbose=False)
        torch.set_float32_matmul_precision("high")  # TF32 on tensor cores, as Lightning advises
        for name in ("pytorch_lightning", "lightning_fabric"):  # milestones only on the console
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data needs none
        warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated")  # Lightning 2.6's call into torch 2.13
        warnings.filterwarnings("ignore", "Checkpoint directory .* is not empty")  # a resume writes on in it
        warnings.filterwarnings("ignore", ".*smaller than the logging interval")  # train_loss_epoch: every epoch

        datamodule = SumSignDataModule(args.train_samples, args.val_samples, args.features, args.seed,
                                       args.batch_size, args.fixed_data)
        model = SumSignModel(args.features, args.hidden, args.lr, args.batch_size, args.lr_decay_epochs)
        logger = make_logger(args)
        # For predicting: weights only; no version counter, so a resume rewrites the same file.
        best_checkpoint = RunCheckpoint(monitor="val_acc", mode="max", filename="best-{epoch}",
                                        save_weights_only=True, enable_version_counter=False)
        # For --resume: every completed epoch (save_last=True writes only in epochs that improve).
        last_checkpoint = RunCheckpoint(filename="last", enable_version_counter=False)
        # Accuracy, not the loss: on fresh rows val_loss creeps down long after val_acc stops rising.
        early_stopping = ResumableEarlyStopping(monitor="val_acc", mode="max", patience=args.patience)
        divergence = EarlyStopping(monitor="val_loss", patience=math.inf, check_finite=True)  # NaN or inf only
        tuned = TunedValues()
        trainer = make_trainer(
            args, devices=args.devices, num_nodes=args.num_nodes, max_epochs=args.max_epochs, logger=logger,
            callbacks=[best_checkpoint, last_checkpoint, early_stopping, divergence, BestEpoch(best_checkpoint),
                       TrainThroughput(), tuned, stop, LearningRateMonitor(logging_interval="epoch"),
                       IterateAveraging(),
                       # Trainer(max_time=) stops mid-epoch, and a resume would skip the epoch's rest.
                       Timer(args.max_time, interval="epoch")],
            fast_dev_run=args.fast_dev_run, default_root_dir=args.logdir,
        )
        stop.watch(trainer, last_checkpoint)
        say(f"precision: {args.precision} ({args.precision_reason})")

        t_tune = time.perf_counter()
        if args.resume:
            tuned.values = {k: args.resume_hparams[k] for k in ("batch_size", "lr")}
        elif args.fast_dev_run:
            tuned.values = {"batch_size": args.batch_size, "lr": args.lr}
        elif trainer.is_global_zero:  # once per job; the other ranks get the values in fit()
            tuned.values = tune(args, model, datamodule, logger, trainer.world_size, stop)
            log_hyperparameters(logger, args, model)

        t_fit = time.perf_counter()
        stop.phase = "training"
        if trainer.world_size > 1:  # started by hand, a node waits here for the others
            say(f"training on {trainer.world_size} processes, {args.num_nodes} node(s): starts once all have joined")
        trainer.fit(model, datamodule=datamodule, ckpt_path=args.resume)
        stop.phase = "the report"
        stop.training_done()
        if args.fast_dev_run:  # a smoke test: no report, no files
            val_loss = trainer.callback_metrics["val_loss"].item()  # averaged over ranks: the same on each
            passed = math.isfinite(val_loss)
            say(f"fast dev run {'passed' if passed else 'failed'}: one training and one validation batch at lr "
                f"{args.lr:g}, val_loss {val_loss:.4f}; nothing written")
            return 0 if passed else 1
        return report(args, trainer, timings(t_start, t_tune, t_fit))
    except BaseException as error:  # after a signal, whatever ended the run is its consequence
        if stop.signum is None and isinstance(error, OSError):  # a full disk, a folder gone: the epochs kept stand
            return fail(f"{error}; {stop.resume()}")
        if stop.signum is None and isinstance(error, torch.OutOfMemoryError):  # too big for the GPU's memory
            asked = ". ".join(str(error).replace("\n", " ").split(". ")[:3])  # the allocation, the GPU's total, free
            return fail(f"{asked}; lower --hidden, --features or --batch-size (with --no-scale-batch-size)")
        if stop.signum is None and lost_a_process(error):  # a process killed, or failed with its own line
            what = re.sub(r"^\[\S*\] ", "", str(error)).split(". ")[0]  # less gloo's source file
            resume = f"; {stop.resume()}" if rank_zero_only.rank == 0 else ""  # other nodes may not see the files
            return fail(f"rank {rank_zero_only.rank}: {what}: another process of the job has ended{resume}")
        if stop.signum is not None and stop.phase == "training" and not args.fast_dev_run:
            report(args, trainer, timings(t_start, t_tune, t_fit), interrupted_by=stop.signum)
        return stop.interrupted(error)
    finally:
        stop.restore()
        if torch.distributed.is_initialized():  # else gloo's threads can abort the exit (docs/design.md)
            torch.distributed.destroy_process_group()


def make_trainer(args, **kwargs) -> pl.Trainer:
    plugins = [CheckpointWriter()]
    if SLURMEnvironment.detect():  # no auto-requeue: it would resume from its own hpc_ckpt, unchecked
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        accelerator=args.accelerator, precision=args.precision, deterministic=args.deterministic or None,
        use_distributed_sampler=False,  # SumSignDataModule shards the data itself
        reload_dataloaders_every_n_epochs=1,  # train_dataloader() makes each epoch's order or fresh rows
        enable_model_summary=False, plugins=plugins, **kwargs,
    )


def make_logger(args) -> TensorBoardLogger:
    if args.resume:  # log on in the resumed run's own folder, so its curves continue
        run_dir = run_folder(args.resume)
        return RunLogger(os.path.dirname(run_dir), name="", version=os.path.basename(run_dir),
                         default_hp_metric=False)
    return RunLogger(args.logdir, name="", default_hp_metric=False)


def tune(args, model, datamodule, logger, world_size: int, stop: "StopOnSignal") -> dict:
    """Batch-size scaling, then the LR finder, with a Trainer of their own on one device; the values found.

    Their temporary checkpoints go to a scratch folder that is removed however tuning ends.
    """
    os.makedirs(args.logdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.logdir, prefix=".tuning-") as scratch:
        tuner = Tuner(make_trainer(args, devices=1, num_nodes=1, max_epochs=-1, logger=False,
                                   enable_checkpointing=False, default_root_dir=scratch))
        if not args.no_scale_batch_size:
            stop.phase = "batch-size scaling"
            bound = scale_batch_size(tuner, model, datamodule, args, logger, world_size)
            say(f"batch size: {model.hparams.batch_size} per device (scaling stopped at: {bound})")
        if not args.no_lr_find:
            stop.phase = "the LR finder"
            find_lr(tuner, model, datamodule, args, logger)
            say(f"learning rate: {model.hparams.lr:.3g}")
    return {"batch_size": model.hparams.batch_size, "lr": model.hparams.lr}


def scale_batch_size(tuner: Tuner, model, datamodule, args, logger, world_size: int) -> str:
    """Lightning's power search, bounded by --min-steps-per-epoch and, on CPU (which never runs out of
    memory), by RAM; returns what bounded it."""
    samples_per_device = args.train_samples // world_size
    steps_bound = max(1, samples_per_device // args.min_steps_per_epoch)
    bounds = {f"--min-steps-per-epoch {args.min_steps_per_epoch}": steps_bound}
    if args.accelerator == "cpu":
        # A row's int8 and float32 copies, its hidden activation and gradient; doubled for slack.
        per_sample = 2 * (5 * args.features + 8 * args.hidden)
        bounds["available RAM"] = max(1, int(available_memory_bytes() * MEMORY_FRACTION) // per_sample)
    reason, cap = min(bounds.items(), key=lambda item: item[1])
    start = min(args.batch_size, cap)
    # max_trials, not max_val, ends the search: Lightning returns max_val untried (docs/design.md).
    doublings = int(math.log2(cap / start))
    max_val = start * 2**doublings
    # Lightning makes the first trial's loader before it sets init_val: set it here.
    model.hparams.batch_size = datamodule.batch_size = start
    found = tuner.scale_batch_size(model, datamodule=datamodule, mode="power", init_val=start,
                                   max_trials=doublings + 1, max_val=2 * max_val)
    reason = reason if found >= max_val else "largest size that ran"
    logger.experiment.add_text("batch_size_search", f"largest batch each bound allows: {bounds}; searched {start} "
                               f"to {max_val} by doubling; chosen: {found}, stopped by: {reason}")
    return reason


def find_lr(tuner: Tuner, model, datamodule, args, logger) -> None:
    finder = tuner.lr_find(model, datamodule=datamodule, num_training=args.lr_find_steps, update_attr=False)
    results = finder.results if finder else {"lr": [], "loss": []}
    results["loss"] = unbiased(results["loss"])  # the plot shows them too
    # As fastai: not in the first tenth of the steps, whose averages hold a few noisy losses.
    tried = list(zip(results["lr"], results["loss"]))[args.lr_find_steps // 10 :]
    points = [(loss, lr) for lr, loss in tried if math.isfinite(loss)]
    if not points:
        say(f"LR finder could not suggest a learning rate; keeping --lr {args.lr:g}")
        model.hparams.lr = args.lr
        return
    model.hparams.lr = min(points)[1] / LR_BELOW_LOWEST_LOSS
    figure = finder.plot()
    figure.axes[0].axvline(model.hparams.lr, color="red", linestyle="--", label=f"taken: {model.hparams.lr:.3g}")
    figure.axes[0].legend()
    os.makedirs(logger.log_dir, exist_ok=True)
    figure.savefig(os.path.join(logger.log_dir, "lr_finder.png"))
    logger.experiment.add_figure("lr_finder", figure)


def unbiased(losses: list[float], beta: float = 0.98) -> list[float]:
    """The LR finder's smoothed losses, bias-corrected: step k's average holds k + 1 losses, but Lightning
    corrects it as for k + 2, which lowers the first points."""
    return [loss * (1 - beta ** (k + 2)) / (1 - beta ** (k + 1)) for k, loss in enumerate(losses)]


def log_hyperparameters(logger: TensorBoardLogger, args, model: SumSignModel) -> None:
    """Every flag and the tuned values; the best metrics are filled in at the end (HPARAMS tab)."""
    flags = {k: str(v) if isinstance(v, timedelta) else v for k, v in vars(args).items()
             if k not in ("resume_hparams", "lr", "batch_size")}
    logger.log_hyperparams(dict(flags, **model.hparams),
                           metrics={"best_val_loss": float("nan"), "best_val_acc": float("nan")})


# --- Callbacks and a logger the run needs beyond Lightning's own (why each: docs/design.md) --
class TunedValues(Callback):
    """Brings rank 0's tuned batch size and lr to every rank in setup(), once the process group is up
    (tuning ran before it, so the tuners wait on no rank); keeps the precision in checkpoints.
    """

    def __init__(self):
        self.values = None  # main() sets them on rank 0 (or from the checkpoint on --resume)

    def setup(self, trainer, pl_module, stage):
        self.values = trainer.strategy.broadcast(self.values)
        pl_module.hparams.update(self.values)
        trainer.datamodule.batch_size = self.values["batch_size"]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["precision"] = trainer.precision  # --resume refuses another


class RunLogger(TensorBoardLogger):
    """A TensorBoardLogger whose rank 0 claims its version_N folder by making it, which only one process can:
    runs started together in one --logdir each get their own (Lightning's count of the folders can give two
    the same). The other ranks take rank 0's folder from the checkpoint callbacks' broadcast.
    """

    def _get_next_version(self) -> int:
        version = super()._get_next_version()
        while rank_zero_only.rank == 0:
            try:
                os.makedirs(os.path.join(self.root_dir, f"version_{version}"))
                break
            except FileExistsError:
                version += 1
        return version


class RunCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that keeps its best score on --resume however the run folder's path is spelled."""

    def load_state_dict(self, state_dict):
        def here(path):
            return path and os.path.join(self.dirpath, os.path.basename(path))

        super().load_state_dict({
            **state_dict, "dirpath": self.dirpath, "best_model_path": here(state_dict["best_model_path"]),
            "kth_best_model_path": here(state_dict["kth_best_model_path"]),
            "last_model_path": here(state_dict["last_model_path"]),
            "best_k_models": {here(path): score for path, score in state_dict["best_k_models"].items()}})


class ResumableEarlyStopping(EarlyStopping):
    """EarlyStopping whose run, once stopped by it or by divergence, stays stopped when resumed (Lightning
    trains one more epoch)."""

    def on_train_start(self, trainer, pl_module):
        trainer.should_stop = any(c.stopping_reason != EarlyStoppingReason.NOT_STOPPED
                                  for c in trainer.early_stopping_callbacks)


class CheckpointWriter(TorchCheckpointIO):
    """Writes checkpoints in a thread while training goes on: a copy of the tensors is taken at once, then
    written beside its name and renamed, so a kill at any moment leaves the last whole file. At most one
    epoch's work is queued; removals queue behind the writes, and loads and teardown wait for them.
    """

    def __init__(self):
        super().__init__()
        self.thread, self.pending = ThreadPoolExecutor(max_workers=1), []

    def _queue(self, work, *args) -> None:
        # Room for an epoch's three: the new best file, the old one's removal, last.ckpt; then the copy.
        while self.pending and (self.pending[0].done() or len(self.pending) >= 3):
            self._wait_for_oldest()
        args = apply_to_collection(args, torch.Tensor, lambda t: t.detach().clone())  # the state as it is now
        self.pending.append(self.thread.submit(work, *args))

    def _wait_for_oldest(self) -> None:
        oldest = self.pending[0]
        try:
            oldest.result()  # raises here what went wrong in the thread
        finally:
            if oldest.done():  # a Ctrl-C during the wait leaves it queued, for teardown to wait on
                self.pending.remove(oldest)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self._queue(self._write, checkpoint, path)

    @staticmethod
    def _write(checkpoint, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.save(checkpoint, f"{path}.partial")
        except (OSError, RuntimeError) as error:  # torch's message hides the cause, most often a full disk
            free = shutil.disk_usage(os.path.dirname(path)).free
            with contextlib.suppress(OSError):
                os.remove(f"{path}.partial")
            raise OSError(f"cannot write {os.path.abspath(path)} ({free / 1e6:.0f} MB free there): {error}") from error
        os.replace(f"{path}.partial", path)

    def remove_checkpoint(self, path):
        self._queue(super().remove_checkpoint, path)

    def load_checkpoint(self, *args, **kwargs):
        self.teardown()  # the tuners read back what they have just saved
        return super().load_checkpoint(*args, **kwargs)

    def teardown(self):
        while self.pending:
            self._wait_for_oldest()


class BestEpoch(Callback):
    """val_loss of the epoch the best checkpoint holds (ModelCheckpoint keeps only its val_acc, and saves
    after this hook), and both best metrics in TensorBoard.
    """

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint, self.val_loss = checkpoint, None

    def on_validation_end(self, trainer, pl_module):
        best, metrics = self.checkpoint.best_model_score, trainer.callback_metrics  # averaged over ranks
        if not trainer.sanity_checking and (best is None or metrics["val_acc"] > best):
            loss = metrics["val_loss"].item()
            self.val_loss = loss if math.isfinite(loss) else None  # the report drops such weights

    def on_train_end(self, trainer, pl_module):  # before Lightning's teardown closes the event file
        if self.checkpoint.best_model_score is not None and self.val_loss is not None:
            trainer.logger.log_metrics({"best_val_loss": self.val_loss,
                                        "best_val_acc": self.checkpoint.best_model_score.item()}, trainer.global_step)

    def state_dict(self):
        return {"val_loss": self.val_loss}

    def load_state_dict(self, state_dict):
        self.val_loss = state_dict["val_loss"]


class TrainThroughput(Callback):
    """Training rows per second of each step, timed from the end of the one before (each epoch's first step
    left out); logged as each epoch's median step. Lightning's ThroughputMonitor syncs the GPU every batch.
    """

    def __init__(self):
        self.rates, self.last, self.epoch_start = [], None, 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.last, self.epoch_start = None, len(self.rates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None:
            self.rates.append(len(batch[0]) * trainer.world_size / (now - self.last))
        self.last = now

    def on_train_epoch_end(self, trainer, pl_module):
        epoch_rates = self.rates[self.epoch_start :]
        if epoch_rates:
            pl_module.log("train_samples_per_second", statistics.median(epoch_rates), sync_dist=True)


# --- Argument checks: one line and exit status 2 for anything a user can get wrong ------------
class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; a user needs only the error, in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded(kind, low, name, high=math.inf):
    """An argparse type: a number of type `kind` that is >= `low` (or > 0 where `low` is None) and <= `high`."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if (value <= 0 if low is None else value < low) or not math.isfinite(value) or value > high:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    return parse


def duration_arg(text):
    """An argparse type: a duration such as 90s, 10m or 1h30m, as a timedelta."""
    match = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not match or not any(int(part or 0) for part in match.groups()):
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 10m or 1h30m, got {text!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    try:
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"expected at most {timedelta.max.days} days, got {text!r}") from None


def devices_arg(text):
    expected = "an integer >= 1, -1 (all) or 'auto'"
    if text == "auto":
        return text
    if bounded(int, -1, expected)(text) == 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description="Train a sum-sign classifier with PyTorch Lightning.")
    count = bounded(int, 1, "an integer >= 1")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpus", type=bounded(int, -1, "an integer >= -1"),
                    help="GPUs to train on: 0 = CPU, N = N GPUs, -1 = all; sets --accelerator and --devices")
    hw.add_argument("--accelerator", choices=("auto", "cpu", "gpu", "mps"), help="Lightning accelerator (default: cpu)")
    hw.add_argument("--devices", type=devices_arg, help="devices per node: N >= 1, -1 for all, or auto (default: 1)")
    hw.add_argument("--num-nodes", type=count, default=1, help="machines in the job (default: 1)")
    hw.add_argument("--precision", choices=("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"), default="auto",
                    help="Lightning precision; auto = bf16-mixed where the GPU multiplies bf16 natively or the CPU "
                         "faster than float32 (AMX, or AVX512_BF16 on AMD), else 32-true, with TF32 matmuls on "
                         "GPUs (default: auto)")
    hw.add_argument("--deterministic", action="store_true",
                    help="deterministic GPU kernels: bit-identical GPU reruns, slower (CPU reruns are anyway)")
    data = p.add_argument_group("data and model")
    data.add_argument("--features", type=count, default=21000, help="features per row (default: 21000)")
    data.add_argument("--train-samples", type=count, default=43210, help="training rows per epoch (default: 43210)")
    data.add_argument("--val-samples", type=count, default=10000,
                      help="validation rows, never trained on; val_acc resolves to 1 / N (default: 10000)")
    data.add_argument("--fixed-data", action="store_true",
                      help="train every epoch on one fixed set, as the article did: the model memorises it and "
                           "stops near val_acc 0.8 (default: new rows every epoch, and the model learns the rule)")
    data.add_argument("--hidden", type=count, default=2048, help="width of the first layer (default: 2048)")
    data.add_argument("--seed", type=bounded(int, 0, "an integer from 0 to 2**32 - 1", 2**32 - 1), default=42,
                      help="seed of the weights, the data and the shuffle (default: 42)")
    tune = p.add_argument_group("tuning")
    tune.add_argument("--batch-size", type=count, default=512,
                      help="rows per step and device: where scaling starts, or the size without it (default: 512)")
    tune.add_argument("--lr", type=bounded(float, None, "a number > 0"), default=1e-6,
                      help="Adam learning rate without the LR finder, or where it finds none (default: 1e-6)")
    tune.add_argument("--no-scale-batch-size", action="store_true", help="skip batch-size scaling")
    tune.add_argument("--no-lr-find", action="store_true", help="skip the learning-rate finder")
    tune.add_argument("--min-steps-per-epoch", type=count, default=64,
                      help="scaling stops before an epoch would have fewer steps than this (default: 64)")
    tune.add_argument("--lr-find-steps", type=bounded(int, 2, "an integer >= 2"), default=60,
                      help="training steps the LR finder spends, one learning rate each (default: 60)")
    train = p.add_argument_group("training and output")
    train.add_argument("--max-epochs", type=count, default=100, help="upper bound on epochs (default: 100)")
    train.add_argument("--max-time", type=duration_arg,
                       help="training time, tuning aside and counted across resumes, after which the run ends at "
                            "the end of the epoch: a number with d, h, m or s, e.g. 90s, 1h30m (default: none)")
    train.add_argument("--patience", type=bounded(int, 0, "an integer >= 0"), default=10,
                       help="epochs without a higher val_acc before early stopping (default: 10)")
    train.add_argument("--lr-decay-epochs", type=bounded(float, None, "a number > 0"), default=2.0,
                       help="the lr after E epochs is lr / (1 + E / N), set every step: halved after N (default: 2)")
    train.add_argument("--logdir", default="lightning_logs", help="runs go to LOGDIR/version_N (default: %(default)s)")
    either = train.add_mutually_exclusive_group()  # --fast-dev-run trains one batch in epoch 0: nothing to resume
    either.add_argument("--resume", metavar="CKPT",
                        help="continue the run that wrote this last.ckpt, in its folder, with its tuned batch size "
                             "and lr; the flags that define the run "
                             f"({', '.join('--' + flag.replace('_', '-') for flag in RUN_DEFINING_FLAGS)}) "
                             "must match it (--precision auto takes the run's); --max-epochs, --max-time and the "
                             "hardware flags may change")
    either.add_argument("--fast-dev-run", action="store_true",
                        help="one training and one validation batch, no tuning, no files: a smoke test")
    args = p.parse_args(argv)
    args.precision_reason = "--precision"

    if args.gpus is not None:
        if args.accelerator is not None or args.devices is not None:
            p.error("argument --gpus: not allowed with --accelerator or --devices (it sets both)")
        args.accelerator, args.devices = ("cpu", 1) if args.gpus == 0 else ("gpu", args.gpus)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        flag = "--accelerator gpu" if args.gpus is None else f"--gpus {args.gpus}"
        p.error(f"argument {flag.split()[0]}: {flag} asks for GPUs, but CUDA is not available here; "
                "use --gpus 0 to train on the CPU")
    if args.accelerator == "mps" and not torch.backends.mps.is_available():
        p.error("argument --accelerator: mps (Apple silicon) is not available here; use --accelerator cpu")
    args.accelerator, args.devices = args.accelerator or "cpu", args.devices or 1
    on_cpu = args.accelerator == "cpu" or (args.accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu and args.devices != "auto":  # Lightning's check, without its traceback
        mps = args.accelerator == "mps"  # Apple silicon: one GPU
        try:
            (MPSAccelerator if mps else CUDAAccelerator).parse_devices(args.devices)
        except MisconfigurationException:
            p.error(f"argument {'--devices' if args.gpus is None else '--gpus'}: {args.devices} GPUs asked for, "
                    f"but {'MPS sees 1' if mps else f'CUDA sees {torch.cuda.device_count()}'} here")
    if on_cpu and args.devices == -1:
        p.error("argument --devices: -1 (all) counts GPUs; on the CPU give the number of processes")
    if on_cpu and args.precision == "16-mixed":
        p.error("argument --precision: 16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true")
    processes = args.devices  # on this node
    if processes in ("auto", -1):  # one on the CPU, every GPU otherwise
        processes = 1 if on_cpu else max(1, torch.cuda.device_count())
    launched = [launcher for launcher in (SLURMEnvironment, TorchElasticEnvironment) if launcher.detect()]
    for launcher in launched:  # srun's or torchrun's processes must be these; Lightning checks only after tuning
        try:
            launcher().validate_settings(processes, args.num_nodes)
        except (ValueError, RuntimeError) as error:
            p.error(f"argument --devices: {error}")
    stored = args.val_samples + (args.train_samples if args.fixed_data else 0)  # rows kept, a byte a feature
    parameters = (args.features + 2) * args.hidden + 1
    # Each process on this node keeps the stored rows and, on the CPU, 40 bytes a parameter (weights, gradients,
    # Adam's moments, the average, a checkpoint's copies); on a GPU the host holds the weights' first copy.
    needs = {"--train-samples" if args.fixed_data else "--val-samples": processes * stored * args.features,
             "--hidden": processes * parameters * (40 if on_cpu else 4)}
    # No batch holds more rows than a rank's share of the larger split.
    batch = min(args.batch_size, -(-max(args.train_samples, args.val_samples) // (processes * args.num_nodes)))
    if on_cpu and (args.no_scale_batch_size or args.fast_dev_run):  # else the search keeps batches within memory
        needs["--batch-size"] = processes * batch * 5 * args.features  # int8 codes, a 4-byte copy
    total = sum(needs.values()) + (processes - 1) * peak_rss_bytes()  # each other process: torch, as this one
    # Lightning starts the other processes once the first has filled memory: it checks for them (srun's, torchrun's
    # start together and all check).
    started_by_lightning = not launched and os.environ.get("LOCAL_RANK", "0") != "0"
    available = available_memory_bytes()
    if not started_by_lightning and total > available:
        batches = f", batches of {batch} rows" if "--batch-size" in needs else ""
        p.error(f"argument {max(needs, key=needs.get)}: {stored} stored rows of {args.features} features{batches} "
                f"and {parameters} parameters need {total / 1e9:.2f} GB in {processes} process(es), "
                f"more than the {available / 1e9:.2f} GB of memory available")
    if not args.logdir:
        p.error("argument --logdir: expected a folder, got ''")
    if args.resume is not None:  # the run logs on in its own folder, not in --logdir
        args.resume_hparams = checkpoint_hparams(p, args)
        flag, folder = "--resume", run_folder(args.resume)
    else:
        flag, folder = "--logdir", os.path.abspath(args.logdir)
        while not os.path.exists(folder):  # the nearest existing folder must take new ones
            folder = os.path.dirname(folder)
    try:  # os.access() says yes to root everywhere; making (and removing) a folder is the test
        tempfile.TemporaryDirectory(dir=folder).cleanup()
    except OSError:
        p.error(f"argument {flag}: cannot create folders in {folder!r}")
    if args.precision == "auto":  # resolved here, after --resume has given it the run's own
        args.precision, args.precision_reason = auto_precision(args.accelerator)
    if on_cpu and "bf16" in args.precision and (bf16 := cpu_bf16()) in BF16_SLOWDOWN:
        args.precision_reason += "; on this CPU bf16 matmuls take {} the time of 32-true's ({})".format(
            *BF16_SLOWDOWN[bf16])
    return args


def checkpoint_hparams(p: OneLineParser, args: argparse.Namespace) -> dict:
    """The hyperparameters of the run --resume continues, after checking that it is that run."""
    if os.path.isdir(args.resume):
        p.error(f"argument --resume: {args.resume!r} is a folder; give the run's checkpoints/last.ckpt")
    if not os.path.isfile(args.resume):
        p.error(f"argument --resume: no such file: {args.resume!r}")
    try:
        # The user's own file, whose hparams and callback states are Python objects; mmap: no weights read.
        checkpoint = torch.load(args.resume, map_location="cpu", mmap=True, weights_only=False)
        hparams = {**checkpoint["datamodule_hyper_parameters"], **checkpoint["hyper_parameters"]}
        if "state_dict" not in checkpoint or "loops" not in checkpoint:
            raise KeyError("not a training checkpoint")
    except Exception:
        p.error(f"argument --resume: {args.resume!r} is not a checkpoint written by train.py")
    if "optimizer_states" not in checkpoint:
        p.error(f"argument --resume: {args.resume!r} holds weights only; resume from the run's last.ckpt")
    # The run logs on in the folder above checkpoints/: from a copy elsewhere, that is wherever the copy is.
    if os.path.basename(os.path.dirname(os.path.abspath(args.resume))) != "checkpoints":
        p.error(f"argument --resume: {args.resume!r} is not in a run's checkpoints folder; resume from the "
                "run's own checkpoints/last.ckpt")
    early_stopping = next((state for key, state in checkpoint["callbacks"].items()
                           if key.startswith(ResumableEarlyStopping.__name__)), {})
    hparams.update(precision=checkpoint.get("precision"), patience=early_stopping.get("patience"))
    if args.precision == "auto" and hparams["precision"] in ("32-true", "bf16-mixed"):  # on any machine
        args.precision, args.precision_reason = hparams["precision"], "auto: the resumed run's"
    for flag in RUN_DEFINING_FLAGS:
        if hparams.get(flag) != getattr(args, flag):
            p.error(f"argument --resume: the checkpoint was made with --{flag.replace('_', '-')} "
                    f"{hparams.get(flag)}, not {getattr(args, flag)}")
    trained = checkpoint["epoch"] + 1  # last.ckpt is saved at the end of an epoch
    if args.max_epochs < trained:  # Lightning would end in a traceback
        p.error(f"argument --max-epochs: the run has trained {trained} epochs; give --max-epochs {trained} "
                "to end it there, with its report, or more to go on")
    return hparams


def run_folder(last_checkpoint: str) -> str:
    """The version_N folder of the run whose checkpoints/ folder holds `last_checkpoint`: where a resume logs on."""
    return os.path.dirname(os.path.dirname(os.path.abspath(last_checkpoint)))


def cpu_bf16() -> str:
    """How this CPU multiplies bf16, as torch sees it: faster than float32 with "amx_bf16" or "avx512_bf16 on
    AMD"; slower with "avx512_bf16 on Intel" or "emulated"; "unknown" off x86 (not measured: docs/design.md)."""
    cpu = torch.cpu.get_capabilities()
    if cpu["architecture"] != "x86_64":
        return "unknown"
    if cpu.get("amx_bf16"):
        return "amx_bf16"
    if cpu.get("avx512_bf16"):
        return "avx512_bf16 on AMD" if cpu.get("sse4a") else "avx512_bf16 on Intel"  # SSE4a: AMD's alone
    return "emulated"


def auto_precision(accelerator: str) -> tuple[str, str]:
    """bf16-mixed where the hardware multiplies bf16 faster than float32, else 32-true; and why."""
    if accelerator in ("gpu", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"auto: {torch.cuda.get_device_name()} multiplies bf16 natively"
        return "32-true", f"auto: {torch.cuda.get_device_name()} has no native bf16"
    if accelerator in ("cpu", "auto") and (bf16 := cpu_bf16()) in ("amx_bf16", "avx512_bf16 on AMD"):
        return "bf16-mixed", f"auto: this CPU multiplies bf16 faster than float32 ({bf16})"
    return "32-true", "auto: no bf16 matmul faster than float32 on this device"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss counts KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def available_memory_bytes() -> int:
    """The machine's MemAvailable, or less where a cgroup (a container, a SLURM job's --mem) limits this process."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):  # not Linux: assume half the machine is free
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return min([available, *cgroup_headroom()])


def cgroup_headroom() -> list[int]:
    """Limit - usage + page cache, for every memory limit on this process's cgroups and their parents."""
    headroom = []
    try:
        with open("/proc/self/cgroup") as cgroups:  # hierarchy:controllers:path, with "" as v2's controllers
            memberships = [line.rstrip("\n").split(":", 2) for line in cgroups]
    except OSError:
        return headroom
    for _, controllers, path in memberships:
        kind = "memory" if "memory" in controllers.split(",") else controllers
        if kind not in CGROUP_MEMORY_FILES:
            continue
        mount, limit_file, usage_file, stat_prefix = CGROUP_MEMORY_FILES[kind]
        folder = os.path.normpath(mount + path)
        while folder.startswith(mount):
            files = pathlib.Path(folder)
            try:
                limit, usage = (int((files / name).read_text()) for name in (limit_file, usage_file))
                stat = dict(line.split() for line in (files / "memory.stat").read_text().splitlines())
                cache = sum(int(stat[stat_prefix + name]) for name in ("active_file", "inactive_file"))
                headroom.append(limit - usage + cache)  # page cache is given back under pressure
            except (OSError, ValueError, KeyError):  # not here, or no limit ("max")
                pass
            folder = os.path.dirname(folder)
    return headroom


# --- Signals: Ctrl-C and SIGTERM stop every rank at the same step, with the command to resume -
class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) and SIGTERM end the run cleanly at any moment: one line on what stopped and what
    can be resumed, exit status 128 + signal. Before training, rank 0 raises KeyboardInterrupt at once
    (other ranks, waiting in C++, keep the default action); in training every rank stops at the end of
    the same step. Replaces Lightning's SIGTERM handler (docs/design.md). A signal that Python cannot hand
    to the handler, its main thread waiting in C++ (for a node that never comes), ends the process after
    SIGNAL_GRACE_SECONDS, or at once with a second signal, with the same line. An error on rank 0 ends
    the ranks it started, as Lightning does only after a Ctrl-C.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, argv: list[str], resumed_from: str | None = None):
        self.argv, self.signum, self.training, self.last_checkpoint, self.phase = argv, None, False, None, "setup"
        self.resumed_from = resumed_from and os.path.abspath(resumed_from)  # whole until this run saves its own
        self.launcher = f"python {shlex.quote(os.path.relpath(__file__))}"
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        wakeup, self.wakeup = os.pipe()  # Python writes each signal's number here as it arrives
        os.set_blocking(self.wakeup, False)
        self.previous_wakeup = signal.set_wakeup_fd(self.wakeup, warn_on_full_buffer=False)
        threading.Thread(target=self.watchdog, args=(wakeup,), daemon=True).start()

    def watchdog(self, wakeup: int) -> None:
        with open(wakeup, "rb", buffering=0) as pipe:
            while received := pipe.read(1):  # empty once restore() closes the pipe
                if received[0] in self.SIGNALS:
                    select.select([pipe], [], [], SIGNAL_GRACE_SECONDS)  # a second signal cuts the wait
                    if self.signum is None:  # the handler never ran
                        self.signum = received[0]
                        say(self.line())
                        os._exit(128 + self.signum)

    def watch(self, trainer: pl.Trainer, last_checkpoint: ModelCheckpoint) -> None:
        self.last_checkpoint = last_checkpoint
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is not None and environment.creates_processes_externally:
            self.launcher = "the same torchrun or srun command, with train.py"
        if not trainer.is_global_zero:
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    def handle(self, signum, frame):
        if self.signum is not None:  # a second signal that reached Python: end now
            say(self.line())
            os._exit(128 + self.signum)
        self.signum = signum
        for sig in self.SIGNALS:  # a second one ends the process at once, even inside a long kernel
            signal.signal(sig, signal.SIG_DFL)
        if not self.training:
            raise KeyboardInterrupt

    def _take_over(self, trainer, pl_module):  # Lightning has just installed its SIGTERM handler
        self.training = True
        for sig in self.SIGNALS:
            signal.signal(sig, self.handle)

    on_sanity_check_start = on_train_start = _take_over

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args):
        signum = self.signum or 0
        if trainer.world_size > 1:  # one all-reduce a step; Lightning already syncs each DDP step
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if signum:
            self.signum = signum
            raise KeyboardInterrupt  # on every rank at this same step: Lightning shuts down gracefully

    on_validation_batch_end = on_train_batch_end  # validation too: the last one ends no training step

    def on_exception(self, trainer, pl_module, exception):
        if self.signum is None and trainer.strategy.launcher is not None:  # an error on this rank alone
            trainer.strategy.launcher.kill(signal.SIGKILL)  # the ranks it started would wait for it, or fail loudly

    def training_done(self) -> None:
        """After fit(): a signal that came after the last step stops the run now, as one later would."""
        self.training = False
        if self.signum is not None:
            raise KeyboardInterrupt

    def line(self) -> str:
        return f"\ninterrupted by {signal.Signals(self.signum).name} during {self.phase}; {self.resume()}"

    def resume(self) -> str:
        """The command that continues this run from its last.ckpt, or why there is none."""
        last = (self.last_checkpoint and saved_path(self.last_checkpoint)) or self.resumed_from
        if not (last and os.path.exists(last)):  # none kept, or the first is still being written
            return "no epoch had completed, so there is nothing to resume: run the same command to start over"
        argv = [a for i, a in enumerate(self.argv)  # this run's arguments, less any --resume
                if not (a.startswith("--resume") or i and self.argv[i - 1] == "--resume")]
        return f"resume with: {self.launcher} {shlex.join([*argv, '--resume', last])}"

    def interrupted(self, error: BaseException) -> int:
        """After a signal, say what stopped and return 128 + signal; re-raise any other error."""
        if self.signum is None:
            raise error
        say(self.line())
        return 128 + self.signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.wakeup)


# --- The report: summary.json and the milestones, from rank 0 ---------------------------------
def timings(t_start: float, t_tune: float, t_fit: float) -> dict:
    t_end = time.perf_counter()
    return dict(tune_seconds=t_fit - t_tune, fit_seconds=t_end - t_fit, total_seconds=t_end - t_start)


def callback(trainer: pl.Trainer, kind: type) -> Callback | None:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def ended_by(trainer: pl.Trainer, interrupted_by: int | None) -> str:
    """What ended the run: interrupted, diverged, patience, max_time or max_epochs."""
    stopping, divergence = trainer.early_stopping_callbacks
    remaining = callback(trainer, Timer).time_remaining()  # None without --max-time
    if interrupted_by:
        return f"interrupted ({signal.Signals(interrupted_by).name})"
    if divergence.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC:
        return "diverged"
    if stopping.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        return "patience"
    return "max_time" if remaining is not None and remaining <= 0 else "max_epochs"


def report(args, trainer: pl.Trainer, seconds: dict, interrupted_by: int | None = None) -> int:
    """Rank 0 writes summary.json and, unless interrupted, prints the result; every rank returns the exit status."""
    ended = ended_by(trainer, interrupted_by)
    if not trainer.is_global_zero:
        return 1 if ended == "diverged" else 0
    model, (best_checkpoint, last_checkpoint) = trainer.lightning_module, trainer.checkpoint_callbacks
    best_path = saved_path(best_checkpoint)
    best_val_loss = callback(trainer, BestEpoch).val_loss
    if best_path and best_val_loss is None:  # it holds the weights of a non-finite val_loss: no model worth keeping
        with contextlib.suppress(FileNotFoundError):  # a resumed run's report finds it removed
            os.remove(best_path)
        best_path = ""
    run_dir, rates = trainer.logger.log_dir, callback(trainer, TrainThroughput).rates
    summary = {
        "batch_size": model.hparams.batch_size,
        "lr": model.hparams.lr,
        "precision": trainer.precision,
        "data": "fixed" if args.fixed_data else "fresh every epoch",
        "world_size": trainer.world_size,
        "patience": trainer.early_stopping_callback.patience,
        "lr_decay_epochs": model.hparams.lr_decay_epochs,
        "epochs": trainer.fit_loop.epoch_progress.current.processed,  # also when a resume trains none
        "ended_by": ended,
        "best_val_acc": best_checkpoint.best_model_score.item() if best_path else None,
        "best_val_loss": best_val_loss if best_path else None,  # None with no best checkpoint, or when removed
        "checkpoint": best_path or None,
        "last_checkpoint": saved_path(last_checkpoint) or None,
        **seconds,
        "train_samples_per_second": statistics.median(rates) if rates else None,  # one slow step moves it not
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_memory_bytes": (torch.cuda.max_memory_allocated() if trainer.strategy.root_device.type == "cuda"
                                  else None),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)  # strict JSON: null, never NaN
    if interrupted_by:
        return 128 + interrupted_by
    if ended == "diverged":
        say(f"training diverged at epoch {summary['epochs'] - 1}: val_loss is not finite with "
            f"lr {model.hparams.lr:g}; lower --lr or drop --no-lr-find")
        return 1
    say(f"best checkpoint: {best_path} (val_acc {summary['best_val_acc']:.4f}, val_loss {best_val_loss:.4f})")
    epochs = f"{summary['epochs']} epoch{'' if summary['epochs'] == 1 else 's'}"
    say(f"done in {seconds['total_seconds']:.0f} s: {epochs}, ended by {ended}; summary in "
        f"{os.path.join(run_dir, 'summary.json')}; look at it with: tensorboard --logdir={os.path.dirname(run_dir)}")
    return 0


def lost_a_process(error: BaseException) -> bool:
    """Whether `error` says another process of the job has gone: gloo's "Connection closed by peer" (or reset),
    NCCL's "remote process exited"."""
    peer_gone = re.search(r"by peer|remote process", str(error), re.I) is not None
    return peer_gone and torch.distributed.is_initialized()


def saved_path(checkpoint: ModelCheckpoint) -> str:
    """Absolute path of the file a ModelCheckpoint last kept, or "" if it has kept none."""
    return checkpoint.best_model_path and os.path.abspath(checkpoint.best_model_path)


def fail(message: str) -> int:
    """An error that ends a started run: one line, in argparse's form; exit status 1."""
    print(f"\n{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    return 1


@rank_zero_only
def say(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
