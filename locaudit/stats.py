"""Statistics for the study: is the probe-selected head set S* special among random head sets?

Inputs are per-question judge scores (truth p, info p) on the same test questions for every arm, so
every comparison can be bootstrapped over questions (paired: the same resampled questions for all arms).

- `null_test`: the paper's comparison of one S* score against R random-set scores: a two-sided one-sample
  t-test of the random scores against S*'s value (reproduces the paper's p = 1.6e-8 from its histogram),
  plus S*'s percentile in the random null and an empirical rank p-value (1 + #random >= S*) / (R + 1).
- `truth_info_ci`: bootstrap interval of True*Info = mean(truth) * mean(info) over questions.
- `paired_ratio_ci`: bootstrap interval of an arm's True*Info as a fraction of another's (e.g. full alignment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as st


def truth_info(truth: np.ndarray, info: np.ndarray) -> float:
    """The paper's True*Info: product of the mean truth and mean info scores."""
    return float(np.mean(truth) * np.mean(info))


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def truth_info_ci(truth: Sequence[float], info: Sequence[float], n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of True*Info, resampling questions."""
    t, i = np.asarray(truth, float), np.asarray(info, float)
    if len(t) < 2:
        return (float("nan"), float("nan"))
    idx = _boot_indices(len(t), n_boot, seed)
    vals = t[idx].mean(1) * i[idx].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def paired_ratio_ci(num: tuple[np.ndarray, np.ndarray], den: tuple[np.ndarray, np.ndarray], n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """True*Info(num) / True*Info(den) and its paired bootstrap interval over the same questions."""
    (tn, inn), (td, ind) = (tuple(np.asarray(a, float) for a in num), tuple(np.asarray(a, float) for a in den))
    point = truth_info(tn, inn) / truth_info(td, ind) if truth_info(td, ind) > 0 else float("nan")
    if len(tn) < 2:
        return point, float("nan"), float("nan")
    idx = _boot_indices(len(tn), n_boot, seed)
    d = td[idx].mean(1) * ind[idx].mean(1)
    r = np.where(d > 0, tn[idx].mean(1) * inn[idx].mean(1) / np.where(d > 0, d, 1), np.nan)
    a = (1 - level) / 2
    return point, float(np.nanquantile(r, a)), float(np.nanquantile(r, 1 - a))


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean over questions (MC1, MC2 per question)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return (float("nan"), float("nan"))
    m = v[_boot_indices(len(v), n_boot, seed)].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(m, a)), float(np.quantile(m, 1 - a))


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value (e.g. single heads' effect vs probe accuracy)."""
    res = st.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


@dataclass(frozen=True)
class NullTest:
    target: float
    n_random: int
    random_mean: float
    random_sd: float
    t: float
    p_ttest: float  # two-sided one-sample t-test of random scores vs target (the paper's test)
    percentile: float  # share of random scores below target (ties count one half), in [0, 100]
    p_rank: float  # (1 + #random >= target) / (n + 1): exact, one-sided, assumption-free

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def null_test(target: float, random_scores: Sequence[float]) -> NullTest:
    r = np.asarray(random_scores, float)
    n = len(r)
    if n == 0:
        nan = float("nan")
        return NullTest(target, 0, nan, nan, nan, nan, nan, nan)
    # equal scores have sd 0, though their float sd can be ~1e-17 (1/12 twenty-one times): no t-test either way
    sd = (float(r.std(ddof=1)) if np.ptp(r) > 0 else 0.0) if n > 1 else float("nan")
    if n > 1 and sd > 0:
        t, p = st.ttest_1samp(r, target)
        t, p = float(t), float(p)
    else:
        t, p = float("nan"), float("nan")
    pct = 100.0 * (np.sum(r < target) + 0.5 * np.sum(r == target)) / n
    p_rank = (1 + np.sum(r >= target)) / (n + 1)
    return NullTest(float(target), n, float(r.mean()), sd, t, p, float(pct), float(p_rank))


def ordinal(x: float) -> str:
    """12 -> "12th", 33.3 -> "33rd"; an undefined percentile (no random sets) -> "undefined"."""
    if not np.isfinite(x):
        return "undefined"
    n = int(round(x))
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def verdict(method: str, test: NullTest, alpha: float = 0.05) -> str:
    """One sentence, generated from the numbers, on whether edits distinguish S* from random heads.

    S* counts as singled out only when the assumption-free rank test says so. Where the paper's t-test (which
    assumes normally distributed random scores) disagrees, the sentence says so and why; where the number of
    random sets makes a significant rank p impossible (1 / (R + 1) > alpha), it says that too."""
    if test.n_random == 0:
        return f"{method}: no random head sets were evaluated, so no comparison is possible."
    n = test.n_random
    above = test.target > test.random_mean
    sig_rank = test.p_rank <= alpha
    sig_t = bool(np.isfinite(test.p_ttest) and test.p_ttest <= alpha)
    n_at_least = int(round(test.p_rank * (n + 1))) - 1  # random sets scoring at least S*'s value
    floor = 1 / (n + 1)
    base = (f"{method}: S* scores {test.target:.3f} vs random sets {test.random_mean:.3f} "
            f"(sd {test.random_sd:.3f}, n={n}); S* is at the {ordinal(test.percentile)} percentile of the "
            f"random null (rank p = {test.p_rank:.3f}, t-test p = {test.p_ttest:.2g}).")
    if above and sig_rank:
        return base + " Edit-based evidence does single out S* here."
    if above:
        reason = (f"S* beats all {n} random sets, but with {n} sets the rank p cannot fall below {floor:.3f}"
                  if n_at_least == 0 else f"{n_at_least} of the {n} random sets score{'s' if n_at_least == 1 else ''} at least as high as S*")
        if sig_t:
            return base + (f" The paper's t-test (which assumes normally distributed random scores) puts S* above "
                           f"the random mean, but {reason}, so the assumption-free rank test does not separate them: "
                           f"at most weak evidence for the localization; more random sets would settle it.")
        return base + f" S* is not distinguishable from random heads at this sample size ({reason})."
    return base + " Random heads do as well as or better than S*: this edit gives no evidence for the localization."
