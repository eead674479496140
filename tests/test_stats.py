"""The study's statistics on hand-computable inputs: True*Info, bootstrap intervals, the null tests, verdicts."""

import numpy as np
import pytest
from scipy import stats as st

from locaudit import stats


def test_truth_info_is_product_of_means():
    assert stats.truth_info(np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.5, 0.5, 1.0, 1.0])) == pytest.approx(0.75 * 0.75)


def test_truth_info_ci_is_the_percentile_bootstrap_over_questions():
    rng = np.random.default_rng(3)
    t, i = rng.random(40), rng.random(40)
    lo, hi = stats.truth_info_ci(t, i, n_boot=500, seed=7)
    idx = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    vals = t[idx].mean(1) * i[idx].mean(1)
    assert (lo, hi) == pytest.approx((np.quantile(vals, 0.025), np.quantile(vals, 0.975)))
    assert lo < stats.truth_info(t, i) < hi
    assert stats.truth_info_ci(t, i, n_boot=500, seed=7) == (lo, hi)  # seeded
    assert all(np.isnan(stats.truth_info_ci([1.0], [1.0])))  # one question: no interval


def test_paired_ratio_ci_is_one_for_an_arm_against_itself_and_scales():
    rng = np.random.default_rng(0)
    t, i = rng.random(30), rng.random(30)
    assert stats.paired_ratio_ci((t, i), (t, i), n_boot=200) == pytest.approx((1.0, 1.0, 1.0))
    point, lo, hi = stats.paired_ratio_ci((t / 2, i), (t, i), n_boot=200)  # half the truth everywhere
    assert (point, lo, hi) == pytest.approx((0.5, 0.5, 0.5))
    point, lo, hi = stats.paired_ratio_ci((rng.random(30), i), (t, i), n_boot=200)
    assert lo < point < hi


def test_null_test_matches_scipy_and_counts_ranks():
    r = [0.30, 0.31, 0.26, 0.32, 0.49, 0.19]
    nt = stats.null_test(0.477, r)
    t, p = st.ttest_1samp(r, 0.477)
    assert (nt.t, nt.p_ttest) == pytest.approx((t, p))
    assert nt.percentile == pytest.approx(100 * 5 / 6)
    assert nt.p_rank == pytest.approx(2 / 7)  # S* itself plus the one random set above it
    assert nt.random_mean == pytest.approx(np.mean(r)) and nt.random_sd == pytest.approx(np.std(r, ddof=1))
    tie = stats.null_test(0.3, [0.3, 0.2])
    assert tie.percentile == pytest.approx(75.0) and tie.p_rank == pytest.approx(2 / 3)
    assert stats.null_test(0.3, []).n_random == 0
    for value in (0.5, 1 / 12):  # equal random scores (whose float sd need not be 0): sd 0 and no t-test
        flat = stats.null_test(0.9, [value] * 21)
        assert flat.random_sd == 0.0 and np.isnan(flat.t) and np.isnan(flat.p_ttest) and flat.p_rank == 1 / 22


def test_verdicts_follow_the_numbers():
    single_out = stats.verdict("ITI", stats.null_test(0.9, np.linspace(0.2, 0.3, 30)))
    assert "does single out S*" in single_out and "n=30" in single_out
    # the t-test says S* is above the mean, but one random set beats it: the verdict says the two disagree
    split = stats.verdict("IPO", stats.null_test(0.477, [0.30, 0.31, 0.26, 0.32, 0.49, 0.19]))
    assert "t-test (which assumes" in split and "1 of the 6 random sets scores at least" in split
    assert "single out" not in split
    # S* above every random set, but 6 sets cannot give a rank p below 1/7
    few_t = stats.verdict("IPO", stats.null_test(0.5, [0.1, 0.2, 0.45, 0.3, 0.12, 0.4]))
    assert "t-test (which assumes" in few_t and "beats all 6 random sets" in few_t and "below 0.143" in few_t
    few = stats.verdict("IPO", stats.null_test(0.5, [0.1, 0.499, 0.45, 0.48, 0.05, 0.47]))
    assert "not distinguishable" in few and "beats all 6" in few and "t-test (which" not in few
    below = stats.verdict("ITI", stats.null_test(0.25, [0.31, 0.26, 0.25, 0.26, 0.30, 0.27]))
    assert "no evidence for the localization" in below and "8th percentile" in below  # the tie counts one half
    assert "no random head sets" in stats.verdict("ITI", stats.null_test(0.3, []))


def _null(target, scores):
    return stats.null_test(target, scores).as_dict()


def test_replication_rows_follow_the_numbers():
    from locaudit.replication import markdown, replication_rows

    arms = {name: {"ci": [0.3, 0.5], "n_questions": 40, "truth_info": 0.4} for name in ("ipo-top16", "full", "iti-top16")}
    st = {"arms": arms,
          "iti": {"top_arm": "iti-top16", "test": _null(0.2, [0.3, 0.31, 0.29, 0.28]),
                  "side_metrics": {"mc2": {**_null(0.6, [0.3, 0.31, 0.29, 0.28]), "ci": [0.5, 0.7]}}},
          "ipo": {"top_arm": "ipo-top16", "test": _null(0.5, [0.45, 0.55, 0.4]), "random_scores": [0.45, 0.55, 0.4],
                  "fraction_of_full": {"ipo-top16": {"ratio": 1.1, "ci": [0.9, 1.3]},
                                       "ipo-random16-s0": {"ratio": 0.7, "ci": [0.5, 0.9]},
                                       "ipo-random16-s1": {"ratio": 1.0, "ci": [0.8, 1.2]}}},
          "single": {"n": 2, "n_reaching_full": 1, "full_ci_low": 0.3}}
    rows = {r["key"]: r for r in replication_rows(st)}
    assert rows["iti_special"]["verdict"] == "does not replicate"  # S* below every random set
    assert rows["iti_mc2"]["verdict"] == "inconclusive"  # above all 4 sets, but rank p >= 1/5
    assert "cannot fall below 0.200" in rows["iti_mc2"]["because"]
    assert rows["ipo_random"]["verdict"] == "replicates" and "1 of 3 random sets" in rows["ipo_random"]["measured"]
    assert rows["ipo_full"]["verdict"] == "replicates" and rows["random_full"]["verdict"] == "replicates"
    assert "1 of 2 random sets' paired 95% CIs" in rows["random_full"]["measured"]
    assert rows["single"]["verdict"] == "inconclusive" and "ipo_mc2" not in rows
    st["ipo"]["fraction_of_full"]["ipo-top16"]["ci"] = [0.5, 0.95]
    assert {r["key"]: r for r in replication_rows(st)}["ipo_full"]["verdict"] == "does not replicate"
    st["iti"]["test"] = _null(0.9, [0.3] * 30)
    assert {r["key"]: r for r in replication_rows(st)}["iti_special"]["verdict"] == "replicates"
    assert markdown(replication_rows(st)).count("\n") == len(replication_rows(st)) + 1


def test_replication_rows_without_random_sets():
    """Every random set stuck (or none planned): no percentile exists, and the rows say so instead of failing."""
    from locaudit.replication import replication_rows

    empty = _null(0.3, [])
    st = {"arms": {a: {"ci": [0.2, 0.4], "n_questions": 6, "truth_info": 0.3} for a in ("ipo-top16", "iti-top16")},
          "ipo": {"top_arm": "ipo-top16", "test": empty, "random_scores": []},
          "iti": {"top_arm": "iti-top16", "test": empty}}
    rows = {r["key"]: r for r in replication_rows(st)}
    assert rows["ipo_random"]["verdict"] == "inconclusive" and "no random set was evaluated" in rows["ipo_random"]["measured"]
    assert stats.ordinal(float("nan")) == "undefined" and stats.ordinal(33.3) == "33rd" and stats.ordinal(12) == "12th"
