"""The article's program, ported to Lightning 2.6 as literally as it allows: the baseline that
`python train.py` is compared against end to end.

Only what no longer runs was changed: `Tuner.scale_batch_size` then `Tuner.lr_find` instead of
`Trainer(auto_scale_batch_size=True, auto_lr_find=True)` and `trainer.tune`, `self.log` instead
of returned 'log' dicts, `on_validation_epoch_end` instead of `validation_epoch_end`.

    python bench/article.py                      # the article's sizes: 21000 features, 43210 samples
    python bench/article.py --features 2100 --train-samples 4321 --max-epochs 100   # a scaled copy

Prints the tuned batch size and lr, the epochs run, the final val_loss and val_acc, the wall
time of each phase, the peak resident memory, and how many validation rows are also training
rows, as one JSON line. (They all are: Lightning restores the global random state between the
article's draws, so its validation set is the first 1234 rows of its training set, and its
val_acc measures memorisation.)
"""

import argparse
import json
import resource
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, Dataset

parser = argparse.ArgumentParser()
parser.add_argument("--features", type=int, default=21000)
parser.add_argument("--train-samples", type=int, default=43210)
parser.add_argument("--val-samples", type=int, default=1234)
parser.add_argument("--max-epochs", type=int, default=100)
ARGS = parser.parse_args()


class XORDataset(Dataset):  # the article's name for it
    def __init__(self, samples):
        self.data = torch.rand(samples, ARGS.features) * 2 - 1

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        row = self.data[idx]
        return row, (row.sum() > 0).float()


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lr = 1e-6
        self.batch_size = 512
        self.layer_1 = nn.Linear(ARGS.features, 2048)
        self.layer_2 = nn.Linear(2048, 1)
        self.sigmoid = nn.Sigmoid()
        self.val_outputs = []

    def forward(self, x):
        return self.sigmoid(self.layer_2(self.layer_1(x))).reshape(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.binary_cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        self.val_outputs.append((F.binary_cross_entropy(y_hat, y), ((y_hat > 0.5).float() == y).float().mean()))

    def on_validation_epoch_end(self):
        self.log("val_loss", torch.stack([o[0] for o in self.val_outputs]).mean())
        self.log("val_acc", torch.stack([o[1] for o in self.val_outputs]).mean())
        self.val_outputs.clear()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(XORDataset(ARGS.train_samples), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(XORDataset(ARGS.val_samples), batch_size=self.batch_size)


if __name__ == "__main__":
    start = time.perf_counter()
    pl.seed_everything(42)
    model = Model()
    early_stop = EarlyStopping(monitor="val_loss", min_delta=0.0, patience=5, mode="min")
    trainer = pl.Trainer(max_epochs=ARGS.max_epochs, min_epochs=1, callbacks=[early_stop],
                         default_root_dir="bench_article_logs")
    tuner = Tuner(trainer)
    tuner.scale_batch_size(model)
    tuner.lr_find(model)
    tuned = time.perf_counter()
    trainer.fit(model)
    done = time.perf_counter()
    torch.save(model.state_dict(), "bench_article_logs/model.pt")
    # Rows are 21000 random floats: matching the first 8 values identifies a row.
    train_rows = {tuple(r) for r in trainer.train_dataloader.dataset.data[:, :8].tolist()}
    val_in_train = sum(tuple(r) in train_rows for r in trainer.val_dataloaders.dataset.data[:, :8].tolist())
    print(json.dumps({
        "batch_size": model.batch_size, "lr": model.lr, "epochs": trainer.current_epoch,
        "val_loss": trainer.callback_metrics["val_loss"].item(), "val_acc": trainer.callback_metrics["val_acc"].item(),
        "tune_seconds": round(tuned - start, 1), "fit_seconds": round(done - tuned, 1),
        "total_seconds": round(done - start, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "val_rows_also_in_train": val_in_train, "val_rows": ARGS.val_samples,
    }))
