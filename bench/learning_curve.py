"""val_acc on never-seen data against training samples per feature: fixed training sets of
several sizes against --fresh-data, all trained by train.py at its defaults.

    python bench/learning_curve.py                       # 2100 features, CPU: about 6 minutes
    python bench/learning_curve.py --features 200        # a quicker look

- Fixed set: one run per training-set size N = s x features, for s in --fixed-spf, each to early
  stopping. The model sees N distinct rows, again and again.
- Fresh data: one --fresh-data run whose epochs hold --fresh-epoch-spf x features new rows each.
Every run validates after every epoch on the same --val-samples rows, drawn by their own
generator and never trained on. Two panels: the best val_acc against the distinct rows a run had
(what data buys), and val_acc after each epoch against the rows processed so far, which is the
compute and, at one speed, the time (what a run buys). Prints the numbers; writes the plot
(default: docs/learning_curve.png, which README.md shows).
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402


def run(argv: list[str]) -> tuple[dict, list[float]]:
    """train.main() in this process; the run's summary.json and its val_acc after each epoch."""
    assert train.main(argv) == 0, argv
    logdir = argv[argv.index("--logdir") + 1]
    run_dir = max((os.path.join(logdir, d) for d in os.listdir(logdir)), key=os.path.getmtime)
    val_acc = [e.value for e in EventAccumulator(run_dir).Reload().Scalars("val_acc")]
    return json.load(open(os.path.join(run_dir, "summary.json"))), val_acc


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

    fixed = {}  # samples per feature -> (summary, val_acc per epoch)
    for spf in args.fixed_spf:
        fixed[spf] = run([*common, "--train-samples", str(int(spf * args.features))])
    fresh_summary, fresh_acc = run([*common, "--fresh-data", "--max-epochs", str(args.fresh_epochs),
                                    "--train-samples", str(int(args.fresh_epoch_spf * args.features))])
    fresh_spf = [(e + 1) * args.fresh_epoch_spf for e in range(len(fresh_acc))]  # seen, all distinct

    print(f"\n{args.features} features, validation on {args.val_samples} never-seen rows, precision "
          f"{fresh_summary['precision']}")
    print("fixed set, one run per size\n  distinct/feature  best val_acc  epochs  processed/feature  seconds")
    for spf, (summary, acc) in fixed.items():
        print(f"  {spf:>16g}  {summary['best_val_acc']:>12.4f}  {summary['epochs']:>6}  {spf * len(acc):>17g}  "
              f"{summary['total_seconds']:>7.1f}")
    print(f"fresh data, one run ({fresh_summary['total_seconds']:.0f} s)\n  distinct = processed/feature  val_acc")
    for spf, acc in zip(fresh_spf, fresh_acc):
        print(f"  {spf:>28g}  {acc:>7.4f}")

    figure, (by_data, by_work) = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    by_data.plot(list(fixed), [s["best_val_acc"] for s, _ in fixed.values()], "o-", label="fixed set: best of a run")
    by_data.plot(fresh_spf, fresh_acc, ".-", label="--fresh-data, after each epoch")
    by_data.set_xlabel("distinct training rows per feature")
    for spf, (_, acc) in fixed.items():
        by_work.plot([spf * (e + 1) for e in range(len(acc))], acc, "-", color="tab:blue", alpha=0.35 + spf / 80)
        by_work.annotate(f"{spf:g}", (spf * len(acc), acc[-1]), fontsize=8, color="tab:blue")
    by_work.plot([], [], "-", color="tab:blue", label="fixed set of N rows per feature (N at the end)")
    by_work.plot(fresh_spf, fresh_acc, ".-", color="tab:orange", label="--fresh-data")
    by_work.set_xlabel("rows processed per feature (compute; time at one speed)")
    by_data.axvline(43210 / 21000, color="grey", linestyle=":", label="the article's sizes: 2.06 rows per feature")
    for ax in (by_data, by_work):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    by_data.set_ylabel("val_acc on never-seen rows")
    figure.suptitle(f"sum-sign, {args.features} features, Linear-Linear, Adam: train.py's defaults, "
                    f"validated on {args.val_samples} rows no run trained on")
    figure.tight_layout()
    figure.savefig(args.png, dpi=100)
    print(f"plot: {os.path.normpath(args.png)}")


if __name__ == "__main__":
    main()
