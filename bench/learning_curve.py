"""val_acc on never-seen rows against rows per feature (alpha): train.py's default (new rows every
epoch) and the article's fixed sets, beside the theoretical limits of any learner.

    python bench/learning_curve.py                       # 2100 features, CPU: under 10 minutes
    python bench/learning_curve.py --features 200 --png lc200.png   # not quicker: batches of 3 to 100 rows, 12 min

- Default: one run of train.py at its defaults, with epochs of the default's 2.06 rows per
  feature, ending by itself (early stopping on val_acc).
- Fixed set: one --fixed-data run per training-set size N = s x features, for s in --fixed-spf,
  each to early stopping. The model sees N distinct rows, again and again.
- Limits (the teacher-student perceptron, solved below): the optimal online learner (each row
  used once; Kinouchi & Caticha 1992), whose error tends to 0.88/alpha, and the Bayes-optimal
  batch learner (each row used any number of times; Opper & Haussler 1991), 0.44/alpha.
Every run validates after every epoch on the same --val-samples rows, drawn by their own
generator and never trained on. Two panels: val_acc against the distinct rows a run had (what
data buys), and against the rows processed (compute, and time at one speed). Prints the
numbers; writes the plot (default: docs/learning_curve.png).
"""

import argparse
import json
import math
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402

TARGETS = (0.95, 0.97, 0.98, 0.99)
DEFAULT_SPF = 43210 / 21000  # train.py's rows per epoch, per feature


# --- the limits: accuracy = 1 - arccos(R) / pi, R the cosine between the learned and the true weights ---
def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2))


def optimal_online(alphas) -> list[float]:
    """Accuracy of the optimal online learner after alpha rows per feature (Kinouchi & Caticha 1992):
    dR/dalpha = (1 - R^2) / (2 pi R) E_t[exp(-z^2) / Phi(z)], z = R t / sqrt(1 - R^2), t ~ N(0, 1)."""
    z = np.linspace(-30, 10, 40001)  # the expectation is taken over z: it narrows as R -> 1
    cdf = _normal_cdf(z)
    ratio = np.where(cdf > 1e-300, np.exp(-z * z) / np.maximum(cdf, 1e-300), 0.0)

    def slope(r):
        s = math.sqrt(1 - r * r) / r
        density = np.exp(-((z * s) ** 2) / 2) * s / math.sqrt(2 * math.pi)
        return (1 - r * r) / (2 * math.pi * r) * np.trapezoid(density * ratio, z)

    accuracies, alpha, r = [], 1e-4, math.sqrt(2e-4 / math.pi)  # Hebb's start: R^2 = 2 alpha / pi
    for target in alphas:  # ascending; RK4 in steps of 0.1 % of alpha
        while alpha < target:
            h = min(1e-3 * max(alpha, 1), target - alpha)
            k1 = slope(r)
            k2 = slope(min(r + h / 2 * k1, 1 - 1e-12))
            k3 = slope(min(r + h / 2 * k2, 1 - 1e-12))
            k4 = slope(min(r + h * k3, 1 - 1e-12))
            r, alpha = min(r + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6, 1 - 1e-12), alpha + h
        accuracies.append(1 - math.acos(r) / math.pi)
    return accuracies


def bayes_batch(alphas) -> list[float]:
    """Accuracy of the Bayes-optimal learner from alpha distinct rows per feature (Opper & Haussler
    1991): q / sqrt(1 - q) = alpha / pi E_t[exp(-q t^2 / 2) / Phi(sqrt(q) t)], R = sqrt(q)."""
    t, weights = np.polynomial.hermite_e.hermegauss(200)
    weights = weights / weights.sum()
    accuracies = []
    for alpha in alphas:
        low, high = 0.0, 1.0
        for _ in range(100):  # bisection: the left side rises with q, the right side falls
            q = (low + high) / 2
            right = alpha / math.pi * np.sum(weights * np.exp(-q * t * t / 2) / _normal_cdf(math.sqrt(q) * t))
            low, high = (q, high) if q / math.sqrt(1 - q) < right else (low, q)
        accuracies.append(1 - math.acos(math.sqrt(q)) / math.pi)
    return accuracies


def first_alpha(accuracy: float, alphas, accuracies):
    return next((a for a, acc in zip(alphas, accuracies) if acc >= accuracy), None)


def limit_alpha(accuracy: float, alphas, accuracies) -> float:
    """Where a theory curve crosses `accuracy`, interpolated between its points in log alpha."""
    i = next(i for i, acc in enumerate(accuracies) if acc >= accuracy)
    a0, a1, c0, c1 = alphas[i - 1], alphas[i], accuracies[i - 1], accuracies[i]
    return math.exp(math.log(a0) + (accuracy - c0) / (c1 - c0) * (math.log(a1) - math.log(a0)))


def theory_alphas(longest: float) -> list[float]:
    """Where the limits are drawn: past the longest run, and past alpha 86, where they reach every target."""
    return list(np.geomspace(0.5, max(longest, 100) * 1.2, 120))


# --- the runs ---------------------------------------------------------------------------------------
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
    p.add_argument("--val-samples", type=int, default=10000, help="never-seen rows every point is measured on")
    p.add_argument("--fixed-spf", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32],
                   help="training-set sizes of the --fixed-data runs, in rows per feature")
    p.add_argument("--max-epochs", type=int, default=300, help="bound on the default run's epochs (default: 300)")
    p.add_argument("--out", default="bench_learning_curve", help="folder for the runs")
    p.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "..", "docs", "learning_curve.png"))
    args = p.parse_args()
    common = ["--features", str(args.features), "--val-samples", str(args.val_samples), "--logdir", args.out]

    rows = round(DEFAULT_SPF * args.features)
    fresh_summary, fresh_acc = run([*common, "--train-samples", str(rows), "--max-epochs", str(args.max_epochs)])
    fresh_alpha = [(e + 1) * rows / args.features for e in range(len(fresh_acc))]  # processed = distinct
    fixed = {spf: run([*common, "--fixed-data", "--train-samples", str(int(spf * args.features))])
             for spf in args.fixed_spf}

    theory_alpha = theory_alphas(max(fresh_alpha[-1], 2 * args.fixed_spf[-1]))
    online, bayes = optimal_online(theory_alpha), bayes_batch(theory_alpha)
    print(f"\n{args.features} features, validation on {args.val_samples} never-seen rows, precision "
          f"{fresh_summary['precision']}")
    print(f"default (new rows every epoch): {fresh_summary['epochs']} epochs of {rows} rows, ended by "
          f"{fresh_summary['ended_by']}, {fresh_summary['total_seconds']:.0f} s, best val_acc "
          f"{fresh_summary['best_val_acc']:.4f}")
    print("  val_acc  alpha: default  optimal online  ratio  Bayes batch")
    for target in TARGETS:
        ours = first_alpha(target, fresh_alpha, fresh_acc)
        limit = limit_alpha(target, theory_alpha, online)
        ratio = f"{ours / limit:5.2f}" if ours else "    -"
        print(f"  {target:7.2f}  {ours or float('nan'):14.1f}  {limit:14.1f}  {ratio}  "
              f"{limit_alpha(target, theory_alpha, bayes):11.1f}")
    print("fixed set, one run per size\n  distinct/feature  best val_acc  Bayes limit  epochs  seconds")
    for spf, (summary, acc), limit in zip(fixed, fixed.values(), bayes_batch(list(fixed))):
        print(f"  {spf:>16g}  {summary['best_val_acc']:>12.4f}  {limit:>11.4f}  {summary['epochs']:>6}  "
              f"{summary['total_seconds']:>7.1f}")

    figure, (by_data, by_work) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    by_data.plot(list(fixed), [s["best_val_acc"] for s, _ in fixed.values()], "o-", label="--fixed-data: best of a run")
    by_data.plot(fresh_alpha, fresh_acc, ".-", label="default: new rows every epoch")
    by_data.set_xlabel("distinct training rows per feature")
    by_data.axvline(DEFAULT_SPF, color="grey", linestyle=":", label="the article's set: 2.06 rows per feature")
    for spf, (_, acc) in fixed.items():
        by_work.plot([spf * (e + 1) for e in range(len(acc))], acc, "-", color="tab:blue", alpha=0.35 + spf / 80)
        by_work.annotate(f"{spf:g}", (spf * len(acc), acc[-1]), fontsize=8, color="tab:blue")
    by_work.plot([], [], "-", color="tab:blue", label="--fixed-data, N rows per feature (N at the end)")
    by_work.plot(fresh_alpha, fresh_acc, ".-", color="tab:orange", label="default: new rows every epoch")
    by_work.set_xlabel("rows processed per feature (compute; time at one speed)")
    for ax in (by_data, by_work):
        ax.plot(theory_alpha, online, "--", color="black", label="limit: optimal online learner")
        ax.plot(theory_alpha, bayes, ":", color="black", label="limit: Bayes-optimal, any passes")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0.6, 1.0)
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
