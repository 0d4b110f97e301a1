"""Paired bootstrap of two runs on the same test rows (``featcache.heads.paired``) and the rows files it reads.

The point of pairing: every bootstrap draw scores both runs on the SAME resampled
rows, so what they share cancels. The fixtures are built so that this is visible
in the numbers: a run that is right wherever the other is right, and on a few
rows more, is better on every shared resample (the CI of the difference never
goes below 0), while on independently drawn rows it often looks worse.
"""

from __future__ import annotations

import numpy as np
import pytest

import featcache.heads.paired as paired
from featcache.heads.bootstrap import metrics_with_ci, resampled_scores, row_arrays
from featcache.heads.paired import (
    ROWS_FORMAT,
    PairingError,
    ids_sha256,
    paired_deltas,
    read_rows,
    rows_path,
    write_rows,
)

N, K = 300, 4
#: A run compared with itself: Δ 0, both CIs [0, 0], neither excludes 0, no step of the correction decides it.
ZERO = {"delta": 0.0, "ci": [0.0, 0.0], "ci_excludes_0": False, "simultaneous_ci": [0.0, 0.0], "distinguishable": False,
        "decided_by": None}


def _proba(y: np.ndarray, correct: np.ndarray, confidence: float = 0.7) -> np.ndarray:
    """Probabilities whose argmax is ``y`` where ``correct``, else the next class."""
    pred = np.where(correct, y, (y + 1) % K)
    proba = np.full((y.size, K), (1 - confidence) / (K - 1))
    proba[np.arange(y.size), pred] = confidence
    return proba


@pytest.fixture(scope="module")
def runs() -> dict[str, np.ndarray]:
    """``a`` right on 240 of 300 rows; ``b`` right on those and on 6 more (the same rows, strictly better)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, K, N)
    a_correct = np.zeros(N, dtype=bool)
    a_correct[rng.permutation(N)[:240]] = True
    b_correct = a_correct.copy()
    b_correct[np.flatnonzero(~a_correct)[:6]] = True
    return {"y": y, "a": _proba(y, a_correct), "b": _proba(y, b_correct)}


def _rows(runs: dict, name: str) -> dict[str, np.ndarray]:
    return row_arrays("classification", runs["y"], runs[name], K)


def test_identical_runs_differ_by_zero_with_ci_zero(runs):
    a = _rows(runs, "a")
    (delta,) = paired_deltas("classification", a, [a], ["accuracy", "log_loss", "macro_f1", "balanced_accuracy"], K)
    for metric, value in delta.items():
        assert value == ZERO, metric


def test_identical_regression_runs_differ_by_zero(runs):
    y = np.linspace(0.0, 1.0, 50)
    rows = row_arrays("regression", y, y + np.sin(np.arange(50)) / 10)
    (delta,) = paired_deltas("regression", rows, [rows], ["rmse", "mae", "r2"], n_boot=200)
    assert all(value == ZERO for value in delta.values())


def _assert_b_never_worse_on_a_shared_resample(delta: dict) -> None:
    """b is right wherever a is: on the same rows its accuracy is never lower, so the paired CI starts at >= 0."""
    lo, hi = delta["accuracy"]["ci"]
    assert delta["accuracy"]["delta"] == pytest.approx(6 / N)
    assert 0 <= lo <= 6 / N <= hi, (lo, hi)


def test_the_ci_is_that_of_the_difference_on_shared_resamples(runs):
    (delta,) = paired_deltas("classification", _rows(runs, "a"), [_rows(runs, "b")], ["accuracy"], K,
                             n_boot=1000, seed=0)
    _assert_b_never_worse_on_a_shared_resample(delta)
    assert delta["accuracy"]["distinguishable"] is True  # 6 rows better, never worse: not noise
    # By hand: the same generator's index matrix for both runs (that of metrics_with_ci's CIs).
    correct_a, correct_b = (runs[name].argmax(axis=1) == runs["y"] for name in ("a", "b"))
    idx = np.random.default_rng(0).integers(0, N, size=(1000, N))
    diffs = correct_b[idx].mean(axis=1) - correct_a[idx].mean(axis=1)
    assert delta["accuracy"]["ci"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))


def test_the_fixture_catches_resamples_that_are_not_shared(runs, monkeypatch):
    """Each run rescored on its own resamples (another seed): the difference goes negative and the check fails."""
    real = paired.resampled_scores

    def independent(task, rows, metrics, n_classes, *, n_boot, seed):
        return [real(task, [one], metrics, n_classes, n_boot=n_boot, seed=seed + k)[0] for k, one in enumerate(rows)]

    monkeypatch.setattr(paired, "resampled_scores", independent)
    (delta,) = paired_deltas("classification", _rows(runs, "a"), [_rows(runs, "b")], ["accuracy"], K,
                             n_boot=1000, seed=0)
    with pytest.raises(AssertionError):
        _assert_b_never_worse_on_a_shared_resample(delta)


def test_paired_ci_is_far_narrower_than_each_runs_own(runs):
    own = {name: metrics_with_ci("classification", runs["y"], runs[name], K, n_boot=1000, seed=0)["ci"]
           for name in ("a", "b")}
    (delta,) = paired_deltas("classification", _rows(runs, "a"), [_rows(runs, "b")], ["accuracy", "log_loss"], K,
                             n_boot=1000, seed=0)
    for metric in ("accuracy", "log_loss"):
        lo, hi = delta[metric]["ci"]
        widths = [own[name][metric][1] - own[name][metric][0] for name in ("a", "b")]
        assert hi - lo < 0.5 * min(widths), (metric, hi - lo, widths)
    # The unpaired CIs overlap: compared side by side, b would not look better than a.
    assert own["b"]["accuracy"][0] < own["a"]["accuracy"][1]


def test_rescored_rows_give_the_runs_own_scores(runs):
    """row_arrays keeps what every metric but top5 needs: the point values are metrics_with_ci's."""
    scores = resampled_scores("classification", [_rows(runs, "a")], ["accuracy", "balanced_accuracy", "macro_f1",
                                                                      "log_loss"], K, n_boot=50, seed=3)[0]
    own = metrics_with_ci("classification", runs["y"], runs["a"], K, n_boot=50, seed=3)
    for metric, values in scores.items():
        assert values.shape == (51,)
        assert values[0] == pytest.approx(own[metric], rel=1e-6)
        assert list(np.percentile(values[1:], [2.5, 97.5])) == pytest.approx(own["ci"][metric], rel=1e-6)


def test_rescored_regression_rows_give_the_runs_own_scores():
    y = np.linspace(0.0, 1.0, 80)
    pred = y + 0.1 * np.cos(np.arange(80))
    scores = resampled_scores("regression", [row_arrays("regression", y, pred)], ["rmse", "mae", "r2"], 0,
                              n_boot=50, seed=3)[0]
    own = metrics_with_ci("regression", y, pred, n_boot=50, seed=3)
    for metric, values in scores.items():
        assert values[0] == pytest.approx(own[metric])
        assert list(np.percentile(values[1:], [2.5, 97.5])) == pytest.approx(own["ci"][metric])


def test_runs_on_other_test_rows_are_refused(runs):
    a = _rows(runs, "a")
    shuffled = {key: value[::-1] for key, value in a.items()}
    with pytest.raises(PairingError, match=r"run 0 was scored on other test rows than the reference"):
        paired_deltas("classification", a, [shuffled], ["accuracy"], K)
    with pytest.raises(PairingError, match=r"run 0 was scored on other test rows.*\(299 vs 300 rows"):
        paired_deltas("classification", a, [{key: value[:-1] for key, value in a.items()}], ["accuracy"], K)
    with pytest.raises(PairingError, match=r"lack \['p_true'\]"):
        paired_deltas("classification", a, [{"y_true": a["y_true"], "y_pred": a["y_pred"]}], ["accuracy"], K)


def test_rows_file_round_trips_byte_identically(tmp_path, runs):
    rows = _rows(runs, "a")
    info = {"task": "classification", "ids_sha256": ids_sha256(f"img{k}" for k in range(N)), "n_classes": K,
            "n_boot": 1000, "seed": 0}
    path = rows_path(tmp_path / "metrics" / "logreg.json")
    assert path.name == "logreg.rows.npz"
    write_rows(path, rows, info)
    first = path.read_bytes()
    write_rows(path, rows, info)
    assert path.read_bytes() == first  # no timestamp inside: a rerun with the same scores changes nothing
    back = read_rows(path)
    assert {key: back[key] for key in info} == info and back["format"] == ROWS_FORMAT
    assert all(np.array_equal(back[key], rows[key]) and back[key].dtype == rows[key].dtype for key in rows)
    assert read_rows(tmp_path / "missing.rows.npz") is None
    (tmp_path / "bad.rows.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.rows\.npz could not be read as a rows file"):
        read_rows(tmp_path / "bad.rows.npz")


def test_ids_hash_depends_on_the_ids_and_their_order():
    assert ids_sha256(["a", "b"]) != ids_sha256(["b", "a"])
    assert ids_sha256(["ab", "c"]) != ids_sha256(["a", "bc"])
    assert ids_sha256(np.array(["a", "b"])) == ids_sha256(["a", "b"])


def _family(n_runs: int, extra: int = 6) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A reference right on 340 of 400 rows; run j wrong on those but ``extra`` rows of its own (no two share one)."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, K, 400)
    correct = np.zeros(400, dtype=bool)
    correct[rng.permutation(400)[:340]] = True
    right = np.flatnonzero(correct)
    runs = []
    for j in range(n_runs):
        worse = correct.copy()
        worse[right[j * extra:(j + 1) * extra]] = False
        runs.append(row_arrays("classification", y, _proba(y, worse), K))
    return row_arrays("classification", y, _proba(y, correct), K), runs


def test_among_20_comparisons_a_ci_that_excludes_0_alone_is_not_called_distinguishable():
    """Each of 20 runs is worse than the reference on 6 rows of its own: alone, its paired 95% CI excludes 0 (and it
    is distinguishable); among 20 such comparisons, one in 20 would be called so by luck, so the family-wise judgement
    (bootstrap max-|t|) needs more: the simultaneous CIs include 0 and ``distinguishable`` says False. The old code
    judged each CI alone: True for all 20."""
    from featcache.heads.paired import CORRECTION, paired_comparison

    reference, runs = _family(20)
    deltas, correction = paired_comparison("classification", reference, [reference, *runs], ["accuracy"], K,
                                           n_boot=1000, seed=0)
    critical = correction["critical_value"]
    assert correction == {"method": CORRECTION, "comparisons": 20, "level": 0.95, "critical_value": critical,
                          "steps": [{"critical_value": critical, "comparisons": 20, "called": 0}]}
    assert 2.8 < correction["critical_value"] < 3.6, correction  # Bonferroni's z for 20 two-sided: 3.02
    assert deltas[0]["accuracy"] == ZERO  # the reference itself: no comparison of the family
    for delta in deltas[1:]:
        accuracy = delta["accuracy"]
        assert accuracy["distinguishable"] is False, accuracy
        assert accuracy["decided_by"] == {"step": 1, "critical_value": critical, "t": pytest.approx(6 / 400 / (
            (accuracy["simultaneous_ci"][1] - accuracy["delta"]) / critical))}  # step 1 calls none: no step 2
        assert accuracy["delta"] == pytest.approx(-6 / 400)
        assert accuracy["ci"][1] < 0 and accuracy["ci_excludes_0"] is True  # the unadjusted CI alone says "worse"
        low, high = accuracy["simultaneous_ci"]
        assert low < accuracy["ci"][0] and high > 0
        assert (high + low) / 2 == pytest.approx(accuracy["delta"])  # Δ ± c SE
    # The same run alone (a family of one) is distinguishable: the "no" above is the correction's.
    (alone,) = paired_deltas("classification", reference, runs[:1], ["accuracy"], K, n_boot=1000, seed=0)
    assert alone["accuracy"]["distinguishable"] is True and alone["accuracy"]["simultaneous_ci"][1] < 0
    # Deterministic: the resamples of train.n_boot and train.seed, nothing else drawn.
    again, _ = paired_comparison("classification", reference, [reference, *runs], ["accuracy"], K, n_boot=1000,
                                 seed=0)
    assert again == deltas


def test_simultaneous_cis_widen_with_independent_statistics_not_with_copies():
    """max-|t| uses the correlation: 20 copies of one statistic cost nothing, 20 independent ones cost about what
    Bonferroni would (z of 0.05 / 40: 3.02), one alone gets the usual 1.96."""
    from featcache.heads.bootstrap import simultaneous_cis

    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20, 4001))
    draws[:, 0] = 0.0  # point values
    (one,), c_one = simultaneous_cis([draws[0]])
    assert 1.85 < c_one < 2.1 and one == pytest.approx([-c_one * draws[0, 1:].std(ddof=1),
                                                        c_one * draws[0, 1:].std(ddof=1)])
    assert simultaneous_cis([draws[0]] * 20)[1] == pytest.approx(c_one)
    assert 2.85 < simultaneous_cis(list(draws))[1] < 3.2
    flat, spread_less = np.array([0.5] * 11), np.array([0.5, np.nan, 0.1])
    assert simultaneous_cis([flat, spread_less, draws[0]])[0][:2] == [[0.5, 0.5], None]
    assert simultaneous_cis([flat]) == ([[0.5, 0.5]], None)
    with pytest.raises(ValueError, match="alpha=2 is invalid"):
        simultaneous_cis([flat], alpha=2)
