"""Step-down family-wise calls of ``distinguishable`` (Romano-Wolf, ``featcache.heads.bootstrap.stepdown_max_t``).

The single-step max-|t| method calls a difference when its simultaneous CI (Δ ± c SE, c from the max of the
centred |t*| over the whole family) excludes 0. The step-down starts with that same c, then recomputes it over
the differences not yet called: once a large difference is called, the moderate ones face a smaller c. These
tests build families where that matters, check that it never calls fewer, that a family of ties is still called
in about alpha of repetitions only, and that a family of one is one bootstrap-t test.
"""

from __future__ import annotations

import numpy as np
import pytest

from featcache.heads.bootstrap import resampled_scores, row_arrays, simultaneous_cis, stepdown_max_t
from featcache.heads.paired import CORRECTION, paired_comparison

K = 3


def _standardised(z: np.ndarray) -> np.ndarray:
    z = z - z.mean()
    return z / z.std()


def _large_and_two_moderate() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Regression rows (y = 0, every prediction > 0, so each run's MAE minus the reference's is the mean of its
    per-row shift ``d``): run L is worse by t ≈ 6 SEs; runs M1 and M2, which share most of their noise (two heads
    on the same features), are each worse by t ≈ 2.15, between the single step's c (≈ 2.25 for a family of
    about two independent differences) and the step-down's second c (≈ 2.06, for the two correlated ones)."""
    n = 300
    rng = np.random.default_rng(3)
    base = 5 + rng.random(n)
    shared, own1, own2, big = (_standardised(rng.normal(size=n)) for _ in range(4))
    moderate = 2.25 / np.sqrt(n)
    shifts = [6 / np.sqrt(n) + big, moderate + 0.95 * shared + 0.312 * own1, moderate + 0.95 * shared + 0.312 * own2]
    y = np.zeros(n)
    return row_arrays("regression", y, base), [row_arrays("regression", y, base + shift) for shift in shifts]


def test_step_down_calls_the_moderate_differences_the_single_step_misses():
    """L is called at step 1 (as by the single step); without it, the max over M1 and M2 gives a smaller c, and both
    are called at step 2, though their simultaneous CIs (the single step's, unchanged) still include 0. The old code
    called only L."""
    reference, runs = _large_and_two_moderate()
    deltas, correction = paired_comparison("regression", reference, runs, ["mae"], n_boot=1000, seed=0)
    large, *moderate = (delta["mae"] for delta in deltas)
    first, second = correction["steps"]
    assert correction["method"] == CORRECTION == "step-down bootstrap max-|t| (Romano-Wolf)"
    assert first == {"critical_value": correction["critical_value"], "comparisons": 3, "called": 1}
    assert second == {"critical_value": pytest.approx(second["critical_value"]), "comparisons": 2, "called": 2}
    assert second["critical_value"] < first["critical_value"]
    assert large["distinguishable"] is True and large["decided_by"]["step"] == 1
    assert large["simultaneous_ci"][0] > 0  # the single step calls it too
    for delta in moderate:
        low, high = delta["simultaneous_ci"]
        assert low < 0 < high  # the single step: not called
        assert delta["distinguishable"] is True, delta
        se = (high - delta["delta"]) / first["critical_value"]  # simultaneous CI: Δ ± c_1 SE
        assert delta["decided_by"] == {"step": 2, "critical_value": second["critical_value"],
                                       "t": pytest.approx(delta["delta"] / se)}
        assert second["critical_value"] < delta["decided_by"]["t"] < first["critical_value"]


def _random_family(seed: int, m: int = 12, n_boot: int = 400) -> list[np.ndarray]:
    """``m`` correlated statistics (point, then ``n_boot`` resamples) with random true values, some 0."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=n_boot)
    spreads = rng.uniform(0.5, 2.0, m)
    points = rng.choice([0.0, 0.0, 1.0, 2.0, 3.0, 5.0], m) * spreads * rng.choice([-1, 1], m)
    weight = rng.uniform(0, 0.9)
    return [np.concatenate([[point], point + spread * (weight * shared + np.sqrt(1 - weight ** 2)
                                                       * rng.normal(size=n_boot))])
            for point, spread in zip(points, spreads, strict=True)]


def test_step_down_never_calls_fewer_than_the_single_step():
    """On random families, every statistic whose simultaneous CI excludes 0 is called, step 1's c is the single
    step's, each next c is no larger, and a statistic is called exactly when its t exceeds its step's c."""
    more = 0
    for seed in range(8):
        stats = _random_family(seed)
        cis, critical = simultaneous_cis(stats)
        calls, steps = stepdown_max_t(stats)
        single = {j for j, (lo, hi) in enumerate(cis) if lo > 0 or hi < 0}
        stepped = {j for j, call in enumerate(calls) if call["distinguishable"]}
        assert single <= stepped, seed
        more += len(stepped - single)
        assert steps[0]["critical_value"] == critical and steps[0]["called"] == len(single)
        assert all(later["critical_value"] <= earlier["critical_value"] for earlier, later in zip(steps, steps[1:]))
        assert sum(step["called"] for step in steps) == len(stepped) and steps[-1]["called"] in (0, steps[-1][
            "comparisons"])
        for call in calls:
            assert call["distinguishable"] == (call["t"] > call["critical_value"])
            assert call["critical_value"] == steps[call["step"] - 1]["critical_value"]
    assert more > 0  # the step-down does call more on some of these families


def _draw_run(rng: np.random.Generator, y: np.ndarray) -> dict[str, np.ndarray]:
    """A run right on about 70% of the rows, at random, with a random confidence: every run of the same law."""
    n = y.size
    pred = np.where(rng.random(n) < 0.7, y, (y + 1 + rng.integers(0, K - 1, n)) % K)
    confidence = rng.uniform(0.4, 0.9, n)
    proba = np.repeat(((1 - confidence) / (K - 1))[:, None], K, axis=1)
    proba[np.arange(n), pred] = confidence
    return row_arrays("classification", y, proba, K)


def test_a_family_of_ties_is_called_in_about_alpha_of_repetitions():
    """300 repetitions of a reference and 4 runs drawn independently from the same law (8 comparisons, every one a
    tie): the step-down calls any of them distinguishable in about 5% of the repetitions (binomial sd 1.3%), where
    the unadjusted CIs call some tie in about a fifth. About 1 s (200 rows, 200 resamples)."""
    metrics, repetitions, called, unadjusted = ["accuracy", "log_loss"], 300, 0, 0
    for rep in range(repetitions):
        rng = np.random.default_rng([7, rep])
        y = rng.integers(0, K, 200)
        rows = [_draw_run(rng, y) for _ in range(5)]
        deltas, correction = paired_comparison("classification", rows[0], rows[1:], metrics, K, n_boot=200, seed=rep)
        assert correction["method"] == CORRECTION and correction["steps"]
        called += any(delta[m]["distinguishable"] for delta in deltas for m in metrics)
        unadjusted += any(delta[m]["ci_excludes_0"] for delta in deltas for m in metrics)
    assert called / repetitions <= 0.09, called
    assert unadjusted / repetitions >= 0.15, unadjusted


@pytest.mark.parametrize("worse", [2, 6])
def test_a_family_of_one_is_one_bootstrap_t_test(worse):
    """One comparison: one step, its c the (1 - alpha) quantile of the centred |t*|, the call |Δ| / SE > c, the
    same as the single step's simultaneous CI excluding 0 (worse on 2 rows: not called; on 6: called)."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, K, 400)
    correct = rng.random(400) < 0.85
    proba = np.full((400, K), 0.1)
    proba[np.arange(400), np.where(correct, y, (y + 1) % K)] = 0.8
    reference = row_arrays("classification", y, proba, K)
    proba[np.flatnonzero(correct)[:worse]] = np.roll(proba[np.flatnonzero(correct)[:worse]], 1, axis=1)
    run = row_arrays("classification", y, proba, K)
    (delta,), correction = paired_comparison("classification", reference, [run], ["accuracy"], K, n_boot=1000,
                                             seed=0)
    reference_scores, run_scores = resampled_scores("classification", [reference, run], ["accuracy"], K,
                                                    n_boot=1000, seed=0)
    diff = run_scores["accuracy"] - reference_scores["accuracy"]
    se = diff[1:].std(ddof=1)
    critical = np.quantile(np.abs(diff[1:] - diff[0]) / se, 0.95)
    test = bool(abs(diff[0]) / se > critical)  # one bootstrap-t test at alpha 0.05
    accuracy = delta["accuracy"]
    assert accuracy["delta"] == pytest.approx(-worse / 400) and test is (worse == 6)
    assert correction["steps"] == [{"critical_value": pytest.approx(critical), "comparisons": 1, "called": int(test)}]
    assert accuracy["distinguishable"] is test
    low, high = accuracy["simultaneous_ci"]
    assert accuracy["distinguishable"] is bool(low > 0 or high < 0)
    assert accuracy["decided_by"] == {"step": 1, "critical_value": correction["critical_value"],
                                      "t": pytest.approx(abs(diff[0]) / se)}
