"""val_acc on never-seen data against distinct training samples per feature: a fixed training set
against --fresh-data, both trained by train.py at its defaults.

    python bench/learning_curve.py                       # 2100 features, CPU: about 5 minutes
    python bench/learning_curve.py --features 200        # a quicker look

- Fixed set: one run per training-set size N = s x features, for s in --fixed-spf, each to early
  stopping; its best val_acc. The model sees N distinct rows, again and again.
- Fresh data: one --fresh-data run whose epochs hold --fresh-epoch-spf x features new rows each;
  after epoch e it has seen (e + 1) times as many distinct rows; its val_acc after every epoch.
Both validate on the same --val-samples rows, drawn by their own generator and never trained on.
Prints the table and writes the plot (default: docs/learning_curve.png, which README.md shows).
"""

import argparse
import json
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402


def run(argv: list[str]) -> str:
    """train.main() in this process; the run's folder."""
    assert train.main(argv) == 0, argv
    logdir = argv[argv.index("--logdir") + 1]
    return max((os.path.join(logdir, d) for d in os.listdir(logdir)), key=os.path.getmtime)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=2100)
    p.add_argument("--val-samples", type=int, default=5000, help="never-seen rows every point is measured on")
    p.add_argument("--fixed-spf", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32],
                   help="training-set sizes of the fixed-set runs, in samples per feature")
    p.add_argument("--fresh-epoch-spf", type=float, default=8, help="new rows per epoch of the fresh run, per feature")
    p.add_argument("--fresh-epochs", type=int, default=32, help="upper bound on the fresh run's epochs")
    p.add_argument("--out", default="bench_learning_curve", help="folder for the runs")
    p.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "..", "docs", "learning_curve.png"))
    args = p.parse_args()
    common = ["--features", str(args.features), "--val-samples", str(args.val_samples), "--logdir", args.out]

    start, fixed = time.perf_counter(), []
    for spf in args.fixed_spf:
        run_dir = run([*common, "--train-samples", str(int(spf * args.features))])
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        fixed.append((spf, summary["best_val_acc"], summary["epochs"], summary["total_seconds"]))
    fixed_seconds = time.perf_counter() - start

    start, rows_per_epoch = time.perf_counter(), int(args.fresh_epoch_spf * args.features)
    run_dir = run([*common, "--fresh-data", "--train-samples", str(rows_per_epoch),
                   "--max-epochs", str(args.fresh_epochs)])
    val_acc = [e.value for e in EventAccumulator(run_dir).Reload().Scalars("val_acc")]
    fresh = [((e + 1) * rows_per_epoch / args.features, acc) for e, acc in enumerate(val_acc)]
    fresh_seconds = time.perf_counter() - start

    cpu = train.cpu_flags()
    print(f"\n{args.features} features, validation on {args.val_samples} never-seen rows; "
          f"precision {train.auto_precision('cpu', cpu)[0]}")
    print(f"fixed set ({fixed_seconds:.0f} s in all)\n  samples/feature  best val_acc  epochs  seconds")
    for spf, acc, epochs, seconds in fixed:
        print(f"  {spf:>15g}  {acc:>12.4f}  {epochs:>6}  {seconds:>7.1f}")
    print(f"fresh data, one run ({fresh_seconds:.0f} s)\n  samples/feature  val_acc")
    for spf, acc in fresh:
        print(f"  {spf:>15g}  {acc:>7.4f}")

    figure, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([f[0] for f in fixed], [f[1] for f in fixed], "o-", label="fixed set: best val_acc of a run per size")
    ax.plot([f[0] for f in fresh], [f[1] for f in fresh], ".-", label="--fresh-data: val_acc after each epoch")
    ax.axvline(43210 / 21000, color="grey", linestyle=":", label="the article's sizes (2.06 samples per feature)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct training samples per feature")
    ax.set_ylabel("val_acc on never-seen rows")
    ax.set_title(f"sum-sign, {args.features} features, Linear-Linear, Adam, train.py defaults")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(args.png, dpi=110)
    print(f"plot: {os.path.normpath(args.png)}")


if __name__ == "__main__":
    main()
