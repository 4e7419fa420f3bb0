"""Train a two-layer linear network to tell whether 21000 random numbers sum to more than zero.

The classic "zero to hero" PyTorch Lightning tutorial, on Lightning 2.6: synthetic "sum-sign"
data, batch-size scaling, then the learning-rate finder, then training with early stopping on
val_loss, checkpoints and TensorBoard logs.

    pip install -r requirements.txt
    python train.py                          # CPU
    python train.py --gpus 1                 # one GPU
    tensorboard --logdir=lightning_logs      # look at the run
    python train.py <same flags> --resume lightning_logs/version_0/checkpoints/last.ckpt

Each run writes lightning_logs/version_N/: TensorBoard events, hparams.yaml, lr_finder.png,
checkpoints/best-epoch=E.ckpt and checkpoints/last.ckpt, and summary.json. At the defaults, on
a 2-core CPU, expect about 11 minutes: early stopping ends training after 7 of the 100 epochs,
with a best val_loss near 0.42 and val_acc near 0.81. That is about what any linear model can
generalise from 43210 samples of 21000 features; training accuracy goes on rising (README.md).
"""

import argparse
import glob
import json
import logging
import math
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_convert
from torchmetrics.classification import BinaryAccuracy

# Features are stored as int8 codes k in [-127, 127] and served as k / 127: uniform on 255 evenly
# spaced points of [-1, 1]. One byte a value keeps the default training set at 0.9 GB instead of
# 3.6 GB in float32, and the label, sum(k) > 0, is computed exactly in integers, so it is the same
# on every device and at every precision.
CODE_MAX = 127
SPLIT_IDS = {"train": 0, "val": 1}
GENERATION_CHUNK_ROWS = 1024  # rows drawn at a time: bounds the int32 temporaries of the label sums
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
TUNER_TEMP_FILES = (".scale_batch_size_*.ckpt", ".lr_find_*.ckpt")
TUNED_ENV = "SUM_SIGN_TUNED"  # rank 0's tuned values, for the ranks Lightning starts at fit()
MEMORY_FRACTION = 0.5  # of the RAM available when tuning starts that batches may use


# ---------------------------------------------------------------------------------------------
class SumSignDataset(Dataset):
    """`samples` rows of `features` values uniform in [-1, 1]; label 1.0 where a row sums to > 0.

    The split is a pure function of (seed, split): its own generator, seeded from both, draws it
    once, whatever the device, batch size or number of processes.
    """

    def __init__(self, samples: int, features: int, seed: int, split: str):
        generator = torch.Generator().manual_seed(seed * len(SPLIT_IDS) + SPLIT_IDS[split])
        self.codes = torch.empty(samples, features, dtype=torch.int8)
        self.labels = torch.empty(samples)
        for start in range(0, samples, GENERATION_CHUNK_ROWS):
            rows = self.codes[start : start + GENERATION_CHUNK_ROWS]
            rows.random_(-CODE_MAX, CODE_MAX + 1, generator=generator)
            self.labels[start : start + len(rows)] = (rows.sum(1, dtype=torch.int32) > 0).float()

    def to(self, device: torch.device) -> "SumSignDataset":
        self.codes, self.labels = self.codes.to(device), self.labels.to(device)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.codes[index].float() / CODE_MAX, self.labels[index]

    def __getitems__(self, indices: list[int]):
        # The DataLoader hands over a whole batch of indices: one gather on the device the data
        # lives on instead of `batch_size` Python-level __getitem__ calls and a collate.
        index = torch.tensor(indices, device=self.codes.device)
        return self.codes.index_select(0, index).float().div_(CODE_MAX), self.labels[index]


class SumSignDataModule(pl.LightningDataModule):
    def __init__(self, train_samples: int, val_samples: int, features: int, seed: int, batch_size: int):
        super().__init__()
        self.train_samples, self.val_samples, self.features = train_samples, val_samples, features
        self.seed, self.batch_size = seed, batch_size
        self.train_set = self.val_set = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:  # the tuners and fit each call setup(): draw the data once
            return
        device = self.trainer.strategy.root_device
        # On a GPU the whole set lives in device memory (0.9 GB at the defaults): a batch is then
        # one gather there, with no host-side collation or copy to wait for.
        self.train_set = SumSignDataset(self.train_samples, self.features, self.seed, "train").to(device)
        self.val_set = SumSignDataset(self.val_samples, self.features, self.seed, "val").to(device)

    def _loader(self, dataset: SumSignDataset, shuffle: bool) -> DataLoader:
        # DistributedSampler shuffles with seed + epoch, so the order of every epoch is a function
        # of (seed, epoch) alone: reruns and resumed runs see the same batches. It also gives each
        # process of a multi-device run its own shard. Workers would only copy in-memory tensors.
        sampler = DistributedSampler(
            dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=shuffle, seed=self.seed
        )
        return DataLoader(dataset, self.batch_size, sampler=sampler, collate_fn=default_convert)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


# ---------------------------------------------------------------------------------------------
class SumSignModel(pl.LightningModule):
    """Linear(features, hidden) -> Linear(hidden, 1) -> sigmoid, trained with Adam on BCE."""

    def __init__(self, features: int = 21000, hidden: int = 2048, lr: float = 1e-6, batch_size: int = 512):
        super().__init__()
        # The tuners write the found batch_size and lr into self.hparams, so checkpoints keep them.
        # logger=False: main() logs the tuned values itself; Lightning would log the initial ones.
        self.save_hyperparameters(logger=False)
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 1)  # no activation between: both layers are linear, as the article
        self.val_acc = BinaryAccuracy()  # applies the sigmoid itself to logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability that each row of `x` sums to more than zero."""
        return torch.sigmoid(self.logits(x))

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.logits(x)
        # From logits: stable where sigmoid would round to 0 or 1 and BCE would take log(0).
        loss = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=stage == "val")
        if stage == "train":  # per step above (Lightning's default for training), and per epoch
            self.log("train_loss_epoch", loss, on_step=False, on_epoch=True)
        else:
            self.val_acc(logits, y)
            self.log("val_acc", self.val_acc, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def configure_optimizers(self):
        # fused: one kernel for the whole update instead of a few per tensor (measured in bench/).
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=True)


class TrainThroughput(Callback):
    """Training samples per second, from the wall time of training batches alone.

    A step's time runs from one batch's end to the next one's, so it holds fetching the batch
    too. The first batch of each epoch is left out (it starts the loader), and validation and
    tuning are never counted: the steady-state figure that bench/compare.py measures.
    """

    def __init__(self):
        self.step_seconds, self.step_samples = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self._last, self._epoch_start = None, len(self.step_seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.step_seconds.append(now - self._last)
            self.step_samples.append(len(batch[0]) * trainer.world_size)
        self._last = now

    def on_train_epoch_end(self, trainer, pl_module):
        seconds = sum(self.step_seconds[self._epoch_start :])
        if seconds > 0:
            pl_module.log("train_samples_per_second", sum(self.step_samples[self._epoch_start :]) / seconds)

    @property
    def samples_per_second(self) -> float:
        """Median over steps: one slow step (a checkpoint write, a noisy neighbour) does not move it."""
        rates = sorted(n / s for n, s in zip(self.step_samples, self.step_seconds))
        return rates[len(rates) // 2] if rates else float("nan")


class BestEpochMetrics(Callback):
    """val_loss and val_acc of the epoch with the lowest val_loss, the one the best checkpoint holds.

    Kept in checkpoints, so a resumed run still knows the best epoch from before the interruption.
    """

    def __init__(self):
        self.best = {"val_loss": float("inf"), "val_acc": float("nan")}

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics  # already averaged over all ranks
        if not trainer.sanity_checking and metrics["val_loss"] < self.best["val_loss"]:
            self.best = {name: metrics[name].item() for name in self.best}

    def state_dict(self):
        return dict(self.best)

    def load_state_dict(self, state_dict):
        self.best = dict(state_dict)


# ---------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; a user needs only the error, in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded(kind, low, name):
    """An argparse type: a number of type `kind` that is >= `low` (or > 0 where `low` is None)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if (value <= 0 if low is None else value < low) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    return parse


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
    hw.add_argument("--gpus", type=bounded(int, -1, "an integer >= -1"), default=None,
                    help="GPUs to train on: 0 = CPU, N = N GPUs, -1 = all; shorthand for "
                         "--accelerator/--devices, not to be combined with them (default: unset)")
    hw.add_argument("--accelerator", choices=("auto", "cpu", "gpu", "mps"), default=None,
                    help="Lightning accelerator (default: cpu)")
    hw.add_argument("--devices", type=devices_arg, default=None,
                    help="devices per node: N >= 1, -1 for all, or auto (default: 1)")
    hw.add_argument("--num-nodes", type=count, default=1, help="machines in the job (default: 1)")
    hw.add_argument("--precision", choices=PRECISIONS, default="32-true",
                    help="Lightning precision (default: 32-true; on GPUs with tensor cores float32 "
                         "matmuls use TF32)")
    hw.add_argument("--deterministic", action="store_true",
                    help="deterministic GPU kernels: bit-identical GPU reruns, slower (CPU runs are "
                         "reproducible without it)")
    data = p.add_argument_group("data and model")
    data.add_argument("--features", type=count, default=21000, help="features per sample (default: 21000)")
    data.add_argument("--train-samples", type=count, default=43210, help="training samples (default: 43210)")
    data.add_argument("--val-samples", type=count, default=1234,
                      help="validation samples, >= 1: early stopping watches val_loss (default: 1234)")
    data.add_argument("--hidden", type=count, default=2048, help="width of the first layer (default: 2048)")
    data.add_argument("--seed", type=bounded(int, 0, "an integer >= 0"), default=42,
                      help="seed of the weights, the data and the shuffle (default: 42)")
    tune = p.add_argument_group("tuning")
    tune.add_argument("--batch-size", type=count, default=512,
                      help="samples per step and device; where scaling starts, or the batch size "
                           "when it is off (default: 512)")
    tune.add_argument("--lr", type=bounded(float, None, "a number > 0"), default=1e-6,
                      help="Adam learning rate, used when the LR finder is off or cannot suggest "
                           "(default: 1e-6)")
    tune.add_argument("--no-scale-batch-size", action="store_true", help="skip batch-size scaling")
    tune.add_argument("--no-lr-find", action="store_true", help="skip the learning-rate finder")
    tune.add_argument("--min-steps-per-epoch", type=count, default=64,
                      help="batch-size scaling stops before an epoch would have fewer optimizer "
                           "steps than this (default: 64)")
    tune.add_argument("--lr-find-steps", type=bounded(int, 2, "an integer >= 2"), default=60,
                      help="training steps the LR finder spends, one learning rate each (default: 60)")
    train = p.add_argument_group("training and output")
    train.add_argument("--max-epochs", type=count, default=100, help="upper bound on epochs (default: 100)")
    train.add_argument("--patience", type=bounded(int, 0, "an integer >= 0"), default=5,
                       help="epochs without a lower val_loss before early stopping (default: 5)")
    train.add_argument("--logdir", default="lightning_logs",
                       help="runs go to LOGDIR/version_N (default: lightning_logs)")
    train.add_argument("--resume", metavar="CKPT", default=None,
                       help="continue the run that wrote this checkpoint (its last.ckpt), in its "
                            "folder, with its tuned batch size and lr; tuning is skipped")
    train.add_argument("--fast-dev-run", action="store_true",
                       help="one training and one validation batch, no tuning, no files: a smoke test")
    args = p.parse_args(argv)

    if args.gpus is not None and (args.accelerator is not None or args.devices is not None):
        p.error("argument --gpus: not allowed with --accelerator or --devices (it sets both)")
    if args.gpus is not None and args.gpus != 0 and not torch.cuda.is_available():
        p.error(f"argument --gpus: {args.gpus} GPU(s) asked for, but CUDA is not available here; "
                "use --gpus 0 to train on the CPU")
    if args.gpus is not None:
        args.accelerator, args.devices = ("cpu", 1) if args.gpus == 0 else ("gpu", args.gpus)
    args.accelerator = args.accelerator or "cpu"
    args.devices = args.devices or 1

    if os.path.exists(args.logdir) and not os.path.isdir(args.logdir):
        p.error(f"argument --logdir: {args.logdir!r} is a file, not a folder")
    parent = args.logdir if os.path.isdir(args.logdir) else os.path.dirname(os.path.abspath(args.logdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:  # os.access() says yes to root everywhere; making (and removing) a folder is the test
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError:
        p.error(f"argument --logdir: cannot create folders in {parent!r}")
    if args.resume is not None:
        args.resume_hparams = checkpoint_hparams(p, args)
    return args


def checkpoint_hparams(p: OneLineParser, args: argparse.Namespace) -> dict:
    """The hyperparameters of the run --resume continues, after checking that it is that run."""
    if not os.path.isfile(args.resume):
        p.error(f"argument --resume: no such file: {args.resume!r}")
    try:
        # weights_only=False: Lightning checkpoints hold plain Python objects (hparams, callback
        # state) beside the tensors; this is the user's own file. mmap: read no weights here.
        checkpoint = torch.load(args.resume, map_location="cpu", mmap=True, weights_only=False)
        hparams = dict(checkpoint["hyper_parameters"])
        if "state_dict" not in checkpoint or "loops" not in checkpoint:
            raise KeyError("not a training checkpoint")
    except Exception:
        p.error(f"argument --resume: {args.resume!r} is not a checkpoint written by train.py")
    for flag in ("features", "hidden"):
        if hparams.get(flag) != getattr(args, flag):
            p.error(f"argument --resume: the checkpoint was made with --{flag} {hparams.get(flag)}, "
                    f"not {getattr(args, flag)}")
    return hparams


@rank_zero_only
def say(message: str) -> None:
    print(message, flush=True)


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):  # not Linux: assume half the machine is free
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def scale_batch_size(tuner: Tuner, model: SumSignModel, datamodule: SumSignDataModule, args, logger,
                     world_size: int) -> str:
    """Lightning's power search, bounded by the data and, on CPU, by RAM; returns what bounded it.

    Lightning doubles the batch until an out-of-memory error, which a CPU never raises, or until
    max_val. Two bounds make the search worth its cost: an epoch keeps at least
    --min-steps-per-epoch optimizer steps (on the CPU a step's time grows in proportion to the
    batch, so a larger batch buys no throughput, only fewer updates per epoch), and on CPU a batch
    never takes more than MEMORY_FRACTION of the RAM available.
    """
    samples_per_device = args.train_samples // world_size
    steps_bound = max(1, samples_per_device // args.min_steps_per_epoch)
    bounds = {f"--min-steps-per-epoch {args.min_steps_per_epoch}": steps_bound}
    if args.accelerator == "cpu":
        # A sample's share of a step beyond the model: its int8 row and float32 copy, the hidden
        # activation and its gradient; doubled for the allocator's slack.
        per_sample = 2 * (5 * args.features + 8 * args.hidden)
        bounds["available RAM"] = max(1, int(available_memory_bytes() * MEMORY_FRACTION) // per_sample)
    reason, cap = min(bounds.items(), key=lambda item: item[1])
    start = min(args.batch_size, cap)
    # Lightning's power mode returns max_val once a doubling reaches it, tried or not: keep max_val
    # on the doubling ladder from `start`, so the size it returns has been run.
    max_val = start * 2 ** int(math.log2(cap / start))
    found = tuner.scale_batch_size(model, datamodule=datamodule, mode="power", init_val=start, max_val=max_val)
    reason = reason if found >= max_val else "largest size that ran"
    rows = [f"| {name} | {size} |" for name, size in bounds.items()]
    logger.experiment.add_text("batch_size_search", "\n".join(
        ["| bound | largest batch it allows |", "| --- | --- |", *rows,
         f"| **chosen** (searched {start} to {max_val} by doubling) | **{found}**, stopped by: {reason} |"]))
    return reason


def find_lr(tuner: Tuner, model: SumSignModel, datamodule: SumSignDataModule, args, logger) -> None:
    finder = tuner.lr_find(model, datamodule=datamodule, num_training=args.lr_find_steps)
    if finder is None or finder.suggestion() is None:
        say(f"LR finder could not suggest a learning rate; keeping --lr {args.lr:g}")
        model.hparams.lr = args.lr
        return
    figure = finder.plot(suggest=True)
    os.makedirs(logger.log_dir, exist_ok=True)
    figure.savefig(os.path.join(logger.log_dir, "lr_finder.png"))
    logger.experiment.add_figure("lr_finder", figure)


def remove_tuner_files(root: str) -> None:
    # Lightning's tuners keep the initial weights in these files and delete them when they finish;
    # an exception or Ctrl-C in between would leave them behind.
    for pattern in TUNER_TEMP_FILES:
        for path in glob.glob(os.path.join(root, pattern)):
            os.remove(path)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def saved_path(checkpoint: ModelCheckpoint) -> str:
    """Absolute path of the file a ModelCheckpoint last kept, or "" if it has kept none."""
    return checkpoint.best_model_path and os.path.abspath(checkpoint.best_model_path)


def resume_command(last_ckpt: str) -> str:
    argv = sys.argv[1:]
    if "--resume" in argv:
        del argv[argv.index("--resume") : argv.index("--resume") + 2]
    return shlex.join(["python", "train.py", *argv, "--resume", last_ckpt])


def make_trainer(args, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator=args.accelerator, precision=args.precision, deterministic=args.deterministic or None,
        default_root_dir=args.logdir,  # where the tuners keep their temporary checkpoints
        use_distributed_sampler=False,  # SumSignDataModule shards the data itself
        enable_model_summary=False, **kwargs,
    )


def single_device_trainer(args) -> pl.Trainer:
    # Lightning's batch-size finder refuses distributed strategies, and the tuners must not touch
    # the run's logger or callbacks: they get a Trainer of their own, on one device.
    return make_trainer(args, devices=1, num_nodes=1, logger=False, enable_checkpointing=False)


def tune(args, model, datamodule, logger, world_size: int) -> dict:
    """Batch-size scaling, then the LR finder, on one device; the values they found."""
    tuner = Tuner(single_device_trainer(args))
    try:
        if not args.no_scale_batch_size:
            bound = scale_batch_size(tuner, model, datamodule, args, logger, world_size)
            say(f"batch size: {model.hparams.batch_size} per device (scaling stopped at: {bound})")
        if not args.no_lr_find:
            find_lr(tuner, model, datamodule, args, logger)
            say(f"learning rate: {model.hparams.lr:.3g}")
    finally:
        remove_tuner_files(args.logdir)
    return {"batch_size": model.hparams.batch_size, "lr": model.hparams.lr}


def tuned_values(args, trainer: pl.Trainer, tune_here) -> dict:
    """The batch size and lr to train with, tuned once per job, whoever started its processes."""
    if args.resume:
        return {k: args.resume_hparams[k] for k in ("batch_size", "lr")}
    if TUNED_ENV in os.environ:  # a rank that this script's own launch started: rank 0 has tuned
        return json.loads(os.environ[TUNED_ENV])
    if args.fast_dev_run:
        return {"batch_size": args.batch_size, "lr": args.lr}
    if trainer.world_size > 1 and trainer.strategy.cluster_environment.creates_processes_externally:
        # torchrun or SLURM started every rank: join the process group now (fit() reuses it), let
        # rank 0 tune and hand its values to the others.
        trainer.strategy.setup_environment()
        return trainer.strategy.broadcast(tune_here() if trainer.is_global_zero else None)
    found = tune_here()
    # fit() starts the other ranks by running this script again; they inherit the environment.
    os.environ[TUNED_ENV] = json.dumps(found)
    return found


def make_logger(args) -> TensorBoardLogger:
    if args.resume:  # log on in the resumed run's own folder, so its curves continue
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        return TensorBoardLogger(os.path.dirname(run_dir), name="", version=os.path.basename(run_dir),
                                 default_hp_metric=False)
    return TensorBoardLogger(args.logdir, name="", default_hp_metric=False)


def log_hyperparameters(logger: TensorBoardLogger, args, model: SumSignModel) -> None:
    """Every flag and the tuned values; the best metrics are filled in at the end (HPARAMS tab)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("resume_hparams", "lr", "batch_size")}
    logger.log_hyperparams(dict(flags, **model.hparams),
                           metrics={"best_val_loss": float("nan"), "best_val_acc": float("nan")})


def fit(trainer: pl.Trainer, model, datamodule, args, last_checkpoint: ModelCheckpoint) -> int:
    """trainer.fit(); 0 when it ends, or 128 + signal after Ctrl-C or SIGTERM, saying how to resume."""
    signals = []

    def stop(signum, frame):  # SIGTERM (a scheduler's stop) ends the run as Ctrl-C does
        signals.append(signum)
        raise KeyboardInterrupt

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=args.resume)
        return 0
    except SystemExit:  # Lightning's answer to Ctrl-C: graceful shutdown, then sys.exit(1)
        if not trainer.interrupted:
            raise
        last = saved_path(last_checkpoint)
        say(f"\ninterrupted; last complete checkpoint: {last or 'none, no epoch completed'}")
        if last:
            say(f"resume with: {resume_command(last)}")
        return 128 + (signals[-1] if signals else signal.SIGINT)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    # Tensor cores run float32 matmuls as TF32 when allowed, as Lightning advises; no-op on CPU.
    torch.set_float32_matmul_precision("high")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # milestones only on stdout
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data needs none

    datamodule = SumSignDataModule(args.train_samples, args.val_samples, args.features, args.seed, args.batch_size)
    model = SumSignModel(args.features, args.hidden, args.lr, args.batch_size)
    logger = make_logger(args)
    best_checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", filename="best-{epoch}")
    # save_last=True would refresh last.ckpt only in epochs that improve val_loss; a second
    # checkpoint without a monitor writes it after every completed epoch, as --resume needs.
    last_checkpoint = ModelCheckpoint(filename="last", enable_version_counter=False)
    best_metrics, throughput = BestEpochMetrics(), TrainThroughput()
    callbacks = [best_checkpoint, last_checkpoint, best_metrics, throughput,
                 EarlyStopping(monitor="val_loss", mode="min", patience=args.patience),
                 LearningRateMonitor(logging_interval="epoch")]
    trainer = make_trainer(
        args, devices=args.devices, num_nodes=args.num_nodes, max_epochs=args.max_epochs,
        callbacks=[] if args.fast_dev_run else callbacks, logger=not args.fast_dev_run and logger,
        enable_checkpointing=not args.fast_dev_run, fast_dev_run=args.fast_dev_run,
    )

    t_tune = time.perf_counter()
    tuned = tuned_values(args, trainer, lambda: tune(args, model, datamodule, logger, trainer.world_size))
    model.hparams.update(tuned)
    datamodule.batch_size = tuned["batch_size"]
    if not (args.resume or args.fast_dev_run):
        log_hyperparameters(logger, args, model)

    t_fit = time.perf_counter()
    status = fit(trainer, model, datamodule, args, last_checkpoint)
    t_end = time.perf_counter()
    if status or args.fast_dev_run:
        return status
    seconds = dict(tune_seconds=t_fit - t_tune, fit_seconds=t_end - t_fit, total_seconds=t_end - t_start)
    return report(args, trainer, model, best_checkpoint, last_checkpoint, best_metrics, throughput, seconds)


def report(args, trainer, model, best_checkpoint, last_checkpoint, best_metrics, throughput, seconds) -> int:
    """Rank 0 writes summary.json and prints the result; every rank returns the exit status."""
    val_loss = trainer.callback_metrics.get("val_loss")
    diverged = val_loss is None or not torch.isfinite(val_loss).item()
    if not trainer.is_global_zero:
        return 1 if diverged else 0
    best_path = saved_path(best_checkpoint)
    best = best_metrics.best
    if diverged and best_path and not math.isfinite(best["val_loss"]):
        os.remove(best_path)  # it holds the non-finite weights, not a model worth keeping
        best_path = ""
    logger, run_dir = trainer.logger, trainer.logger.log_dir
    summary = {
        "batch_size": model.hparams.batch_size,
        "lr": model.hparams.lr,
        "epochs": trainer.current_epoch,
        "stopped_early": trainer.current_epoch < args.max_epochs,
        "diverged": diverged,
        "best_val_loss": best["val_loss"] if best_path else None,
        "best_val_acc": best["val_acc"] if best_path else None,
        "checkpoint": best_path or None,
        "last_checkpoint": saved_path(last_checkpoint) or None,
        **seconds,
        "train_samples_per_second": throughput.samples_per_second,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.log_metrics({"best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"]}, trainer.global_step)
    logger.finalize("success")
    if diverged:
        say(f"training diverged at epoch {trainer.current_epoch - 1}: val_loss is not finite with "
            f"lr {model.hparams.lr:g}; lower --lr or drop --no-lr-find")
        return 1
    say(f"best checkpoint: {best_path} (val_loss {best['val_loss']:.4f}, val_acc {best['val_acc']:.4f})")
    say(f"done in {seconds['total_seconds']:.0f} s: {summary['epochs']} epochs; summary in "
        f"{os.path.join(run_dir, 'summary.json')}; look at it with: tensorboard --logdir={args.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
