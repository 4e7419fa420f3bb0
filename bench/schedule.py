"""The learning rate, its decay and the weight averaging, against the rows it takes to reach each accuracy.

    python bench/schedule.py                                  # 10 runs at 2100 features: about 25 minutes
    python bench/schedule.py --variants default --seeds 1 2 3 4 5   # the default over seeds
    python bench/schedule.py --features 200 --max-epochs 30   # a quick look

Each run is train.py at its defaults (tuning on, new rows every epoch, 2.06 rows per feature an
epoch) at --features and each of --seeds, validated on --val-samples never-seen rows, with one
thing changed: --lr-decay-epochs, the averaging's gamma (IterateAveraging's, set here: train.py
has no flag for it), a fixed --lr instead of the LR finder's, or --precision 32-true, which
`auto` picks on CPUs without bf16 units. Prints the rows processed per feature (alpha) at which
val_acc first reached each accuracy, beside the optimal online learner's.
"""

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from learning_curve import (DEFAULT_SPF, TARGETS, first_alpha, limit_alpha, optimal_online, run,  # noqa: E402
                            train)

VARIANTS = {  # name: (what changes, the averaging's gamma, train.py flags)
    "default": ("nothing: lr / (1 + E/2), gamma 1", 1, []),
    "gamma-0.5": ("gamma 0.5", 0.5, []),
    "gamma-0": ("gamma 0: the plain mean of every step", 0, []),
    "decay-1": ("lr / (1 + E/1)", 1, ["--lr-decay-epochs", "1"]),
    "decay-3": ("lr / (1 + E/3)", 1, ["--lr-decay-epochs", "3"]),
    "32-true": ("--precision 32-true", 1, ["--precision", "32-true"]),
    **{f"lr-{lr}": (f"--no-lr-find --lr {lr}", 1, ["--no-lr-find", "--lr", lr])
       for lr in ("2.5e-4", "1e-3", "2e-3", "4e-3")},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=2100)
    p.add_argument("--val-samples", type=int, default=10000)
    p.add_argument("--max-epochs", type=int, default=110, help="epochs a run may take (default: 110)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--out", default="bench_schedule", help="folder for the runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = round(DEFAULT_SPF * args.features)
    alphas = [(e + 1) * rows / args.features for e in range(args.max_epochs)]
    theory = list(np.geomspace(0.5, 120, 120))  # past the optimal online learner's 86 for 0.99
    limits = [limit_alpha(t, theory, optimal_online(theory)) for t in TARGETS]

    header = " | ".join(f"alpha to {t}" for t in TARGETS)
    table = [f"| changed | seed | lr | {header} | epochs, ended by | best val_acc |",
             f"| --- | ---: | ---: |{' ---: |' * len(TARGETS)} --- | ---: |",
             f"| (optimal online learner) | | | {' | '.join(f'{a:.1f}' for a in limits)} | | |"]
    for name in args.variants:
        change, gamma, flags = VARIANTS[name]
        for seed in args.seeds:
            train.IterateAveraging.__init__.__defaults__ = (gamma,)  # main() builds it with the default
            summary, val_acc = run(["--features", str(args.features), "--train-samples", str(rows), "--val-samples",
                                    str(args.val_samples), "--max-epochs", str(args.max_epochs), "--seed", str(seed),
                                    *flags, "--logdir", os.path.join(args.out, f"{name}-{seed}")])
            reached = [first_alpha(t, alphas, val_acc) for t in TARGETS]
            cells = [f"{a:.1f} ({a / limit:.2f}x)" if a else "-" for a, limit in zip(reached, limits)]
            table.append(f"| {change} | {seed} | {summary['lr']:.3g} | {' | '.join(cells)} | {summary['epochs']}, "
                         f"{summary['ended_by']} | {summary['best_val_acc']:.4f} |")
    print(f"\n{args.features} features, {rows} new rows an epoch, validation on {args.val_samples} never-seen rows; "
          f"alpha = rows processed per feature when val_acc first reached it")
    print("\n".join(table))


if __name__ == "__main__":
    main()
