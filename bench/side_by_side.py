"""The article's program against train.py at its defaults, side by side, on never-seen data.

    python bench/side_by_side.py                 # a ten-fold scaled copy of the article's sizes
    python bench/side_by_side.py --features 200 --train-samples 432 --max-epochs 10   # smaller: 4 min on 2 cores

Runs, each as its own process and timed end to end (tuning included):
- bench/article.py: the article's program ported literally to Lightning 2.6 (its batch-size and
  LR finders, --max-epochs epochs, early stopping on a validation set that is its training set);
- train.py at the same sizes and its defaults otherwise: --train-samples new rows every epoch,
  early stopping on val_acc ends it (no --max-epochs).
Then scores both saved models on the same --test-samples rows, features uniform on [-1, 1] as
the article draws them, that neither has seen, and prints one line per program.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from train import SumSignModel  # noqa: E402


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - start, proc.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=2100)
    p.add_argument("--train-samples", type=int, default=4321)
    p.add_argument("--max-epochs", type=int, default=100, help="the article program's epochs (default: 100)")
    p.add_argument("--test-samples", type=int, default=20000)
    args = p.parse_args()
    sizes = ["--features", str(args.features), "--train-samples", str(args.train_samples)]

    article_seconds, out = timed([sys.executable, os.path.join(HERE, "article.py"), *sizes,
                                  "--max-epochs", str(args.max_epochs)])
    article_report = json.loads(out.strip().splitlines()[-1])
    article = nn.Sequential(nn.Linear(args.features, 2048), nn.Linear(2048, 1))
    state = torch.load("bench_article_logs/model.pt", map_location="cpu")
    article.load_state_dict({k.replace("layer_1", "0").replace("layer_2", "1"): v for k, v in state.items()})

    logdir = "bench_side_by_side_logs"
    ours_seconds, _ = timed([sys.executable, os.path.join(HERE, "..", "train.py"), *sizes, "--logdir", logdir])
    run = max((os.path.join(logdir, d) for d in os.listdir(logdir)), key=os.path.getmtime)
    summary = json.load(open(os.path.join(run, "summary.json")))
    ours = SumSignModel.load_from_checkpoint(summary["checkpoint"], map_location="cpu")

    generator = torch.Generator().manual_seed(20_000_000)  # neither program draws from this stream
    x = torch.rand(args.test_samples, args.features, generator=generator) * 2 - 1
    y = x.sum(1) > 0
    with torch.no_grad():
        article_acc = ((article(x).squeeze(1) > 0) == y).float().mean().item()
        ours_acc = ((ours.logits(x) > 0) == y).float().mean().item()
    print(f"{args.features} features, {args.train_samples} training samples; accuracy on {args.test_samples} "
          f"never-seen rows; wall time end to end, tuning included")
    print(f"article's program : {article_acc:.4f} in {article_seconds:5.0f} s ({article_report['epochs']} epochs, "
          f"batch {article_report['batch_size']}; its own val_acc {article_report['val_acc']:.3f} on "
          f"{article_report['val_rows_also_in_train']} of {article_report['val_rows']} validation rows it trained on)")
    print(f"train.py          : {ours_acc:.4f} in {ours_seconds:5.0f} s ({summary['epochs']} epochs, ended by "
          f"{summary['ended_by']}, batch {summary['batch_size']}, lr {summary['lr']:.3g}, {summary['precision']}; "
          f"its best val_acc {summary['best_val_acc']:.4f}); time ratio {ours_seconds / article_seconds:.2f}")


if __name__ == "__main__":
    main()
