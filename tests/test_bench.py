"""bench/learning_curve.py's limits: the figures the README and docs/results.md quote."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import learning_curve  # noqa: E402


def test_the_limits_reach_every_target_and_give_the_quoted_rows_per_feature():
    alphas = learning_curve.theory_alphas(6.2)  # a 3-epoch run: the limits must still reach 0.99
    online, bayes = learning_curve.optimal_online(alphas), learning_curve.bayes_batch(alphas)
    crossings = {name: [round(learning_curve.limit_alpha(target, alphas, curve)) for target in learning_curve.TARGETS]
                 for name, curve in (("online", online), ("bayes", bayes))}
    assert crossings == {"online": [15, 27, 42, 86], "bayes": [9, 15, 22, 44]}
    # the article's fixed set, 2.06 rows per feature: no learner generalises past about 0.83
    assert learning_curve.bayes_batch([43210 / 21000])[0] == pytest.approx(0.829, abs=5e-4)
