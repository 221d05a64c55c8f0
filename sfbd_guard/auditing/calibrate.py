"""Thresholds from real images that were not trained on (calibration-conditional order statistics), or documented
defaults.

With m holdout scores v_(1) >= ... >= v_(m) (largest first) and new non-copy images exchangeable with them, the
threshold tau = v_(k) (the k-th largest) flags a fraction F = P(s >= tau | holdout) of such images, and over the
draw of the holdout F ~ Beta(k, m - k + 1) (for continuous scores). Its mean k / (m + 1) is the classic
split-conformal number, but one holdout gives one F: the claim the audit makes is the 95 % quantile of that Beta,
"F <= beta.ppf(0.95, k, m - k + 1) with 95 % confidence" (the maximum of 300 scores: mean 0.33 %, 95 % quantile
0.99 %). `choose_rank` takes the largest k (the least strict threshold) whose 95 % quantile is at most the
configured alpha; when even k = 1 is above it (m < log(0.05) / log(1 - alpha): about 3,000 images for 0.1 %,
300 for 1 %), the threshold is the stricter of the holdout maximum and the documented default, and the bound
stated is the one k = 1 achieves. The ratio rule uses the lower tail the same way (the k-th smallest L2 ratio)
and applies only to images whose top-1 similarity reaches the `ratio_min_quantile` quantile of the holdout's (the
median by default): requiring both can only lower its rate. "Copy or suspect" is the union of the two suspect
rules; its bound adds their 97.5 % quantiles, so that both hold at once with 95 % confidence (Bonferroni). Each
rule's rate on the holdout itself is measured and reported next to the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checks import Scores, Thresholds
from .config import DEFAULT_THRESHOLDS, AuditConfig

CONFIDENCE = 0.95  # the probability, over the draw of the holdout, that a stated bound holds


@dataclass(frozen=True)
class Calibration:
    thresholds: Thresholds
    # per rule, the false-positive rate on real unseen images that holds with CONFIDENCE (None = unknown)
    expected_fpr: dict[str, float | None]
    holdout: dict[str, Any] = field(default_factory=dict)  # source, count, dropped, exceedances, ranks, targets
    confidence: float | None = None  # CONFIDENCE when calibrated


def rate_quantile(k: int, m: int, level: float = CONFIDENCE) -> float:
    """The `level` quantile of the false-positive rate of a threshold at the k-th most extreme of m scores."""
    from scipy.stats import beta

    return float(beta.ppf(level, k, m - k + 1))


def choose_rank(m: int, alpha: float, level: float = CONFIDENCE) -> tuple[int, float, bool]:
    """(k, bound, met): the largest k in 1..m with rate_quantile(k, m) <= alpha, and that quantile; when no k meets
    alpha, (1, rate_quantile(1, m), False). The quantile grows with k, so a bisection finds it."""
    if m < 1:
        raise ValueError("no holdout scores")
    if rate_quantile(1, m, level) > alpha:
        return 1, rate_quantile(1, m, level), False
    low, high = 1, m  # rate_quantile(low) <= alpha
    while low < high:
        mid = (low + high + 1) // 2
        if rate_quantile(mid, m, level) <= alpha:
            low = mid
        else:
            high = mid - 1
    return low, rate_quantile(low, m, level), True


def predicted_count(k: int, m: int, n: int, level: float = CONFIDENCE) -> int:
    """The `level` quantile of how many of n new non-copy images a threshold at the k-th most extreme of m holdout
    scores flags: Beta-binomial(n, k, m - k + 1), the realised rate's Beta with the binomial draw of n images on top
    (what a reviewer who counts false positives among n images sees)."""
    from scipy.stats import betabinom

    return int(betabinom.ppf(level, n, k, m - k + 1)) if n > 0 else 0


def predicted_false(calibration: Calibration, n: int) -> dict[str, int] | None:
    """Among n audited images none of which copies anything, at most this many called copy / flagged, with
    CONFIDENCE (flagged: both suspect rules at once, Bonferroni); None without a holdout."""
    ranks, m = calibration.holdout.get("ranks"), int(calibration.holdout.get("count") or 0)
    if not ranks or not m:
        return None
    half = 1 - (1 - CONFIDENCE) / 2
    flagged = (predicted_count(ranks["suspect_similarity"], m, n, half)
               + predicted_count(ranks["suspect_ratio"], m, n, half))
    return {"of": n, "copy": predicted_count(ranks["copy"], m, n), "flagged": min(n, flagged)}


def holdout_needed(alpha: float, level: float = CONFIDENCE) -> int:
    """The smallest m for which the holdout maximum meets alpha with confidence `level`."""
    return math.ceil(math.log(1 - level) / math.log(1 - alpha))


def upper_threshold(values: np.ndarray, alpha: float, level: float = CONFIDENCE) -> tuple[float, int, float, bool]:
    """(tau, k, bound, met): tau the k-th largest value, k = choose_rank(m, alpha)."""
    k, bound, met = choose_rank(len(values), alpha, level)
    return float(np.sort(values)[::-1][k - 1]), k, bound, met


def lower_threshold(values: np.ndarray, alpha: float, level: float = CONFIDENCE) -> tuple[float, int, float, bool]:
    """(tau, k, bound, met): tau the k-th smallest value, k = choose_rank(m, alpha)."""
    k, bound, met = choose_rank(len(values), alpha, level)
    return float(np.sort(values)[k - 1]), k, bound, met


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for successes / trials."""
    from scipy.stats import beta

    if trials == 0:
        return 0.0, 1.0
    tail = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def defaults(config: AuditConfig, kind: str) -> dict[str, float]:
    """The documented thresholds for `kind`, with any `thresholds:` set in the audit YAML."""
    base = DEFAULT_THRESHOLDS[kind]
    given = config.thresholds
    chosen = (given.copy_similarity, given.suspect_similarity, given.suspect_ratio, given.ratio_min_similarity)
    names = ("copy", "suspect", "ratio", "ratio_min_similarity")
    return {name: base[name] if value is None else value for name, value in zip(names, chosen, strict=True)}


def uncalibrated(config: AuditConfig, kind: str, reason: str) -> Calibration:
    values = defaults(config, kind)
    note = (f"no holdout ({reason}): documented default thresholds for the {kind} embedder; "
            "the false-positive rate on this data is not known")
    thresholds = Thresholds(values["copy"], min(values["suspect"], values["copy"]), values["ratio"], "default", note,
                            values["ratio_min_similarity"])
    return Calibration(thresholds, {"copy": None, "suspect_similarity": None, "suspect_ratio": None, "flagged": None},
                       {"source": None, "count": 0, "reason": reason})


def calibrated(config: AuditConfig, kind: str, holdout: Scores, source: str, dropped: dict[str, int]) -> Calibration:
    """Thresholds from the holdout's top-1 similarities and L2 ratios (see the module docstring)."""
    spec, base, m = config.calibration, defaults(config, kind), len(holdout.s1)
    s1, ratio = holdout.s1.astype(np.float64), holdout.l2_ratio.astype(np.float64)
    copy, k_c, fpr_copy, met_c = upper_threshold(s1, spec.alpha_copy)
    suspect, k_s, fpr_s, met_s = upper_threshold(s1, spec.alpha_suspect)
    low, k_r, fpr_r, met_r = lower_threshold(ratio, spec.alpha_suspect)
    if not met_c:
        copy = max(copy, base["copy"])
    if not met_s:
        suspect = max(suspect, base["suspect"])
    if not met_r:
        low = min(low, base["ratio"])
    suspect = min(suspect, copy)
    min_sim = float(np.quantile(s1, spec.ratio_min_quantile))
    half = 1 - (1 - CONFIDENCE) / 2  # both suspect rules at once, with CONFIDENCE
    flagged = min(1.0, rate_quantile(k_s, m, half) + rate_quantile(k_r, m, half))
    note = (f"calibrated on {m} holdout image(s) ({source}): copy = the {_ordinal(k_c)}largest and suspect = the "
            f"{_ordinal(k_s)}largest of their top-1 similarities to the protected set, ratio = the {_ordinal(k_r)}"
            f"smallest of their relative L2 ratios, applied from the {spec.ratio_min_quantile:g} quantile of their "
            f"similarity ({min_sim:.4f}) up; each rank is the least strict whose false-positive rate is at most its "
            f"target (copy {spec.alpha_copy:g}, suspect {spec.alpha_suspect:g}) with {CONFIDENCE:.0%} confidence")
    short = [f"{name} (needs >= {holdout_needed(alpha)} images)" for name, alpha, met in
             (("copy", spec.alpha_copy, met_c), ("suspect", spec.alpha_suspect, met_s and met_r)) if not met]
    if short:
        note += (f"; the holdout is too small for the target of {' and '.join(short)}: those thresholds are the most "
                 "extreme holdout score or the documented default, whichever is stricter, and the bound stated is "
                 "what the holdout achieves")
    close = (ratio <= low) & (s1 >= min_sim)
    exceed = {"copy": float(np.mean(s1 >= copy)), "suspect_similarity": float(np.mean(s1 >= suspect)),
              "suspect_ratio": float(np.mean(close)), "flagged": float(np.mean((s1 >= suspect) | close))}
    mean = {"copy": k_c / (m + 1), "suspect_similarity": k_s / (m + 1), "suspect_ratio": k_r / (m + 1)}
    return Calibration(Thresholds(copy, suspect, low, "holdout", note, min_sim),
                       {"copy": fpr_copy, "suspect_similarity": fpr_s, "suspect_ratio": fpr_r, "flagged": flagged},
                       {"source": source, "count": m, "dropped": dropped, "holdout_exceedance": exceed,
                        "ranks": {"copy": k_c, "suspect_similarity": k_s, "suspect_ratio": k_r},
                        "targets_met": {"copy": met_c, "suspect_similarity": met_s, "suspect_ratio": met_r},
                        "mean_fpr": mean},
                       CONFIDENCE)


def _ordinal(k: int) -> str:
    return "" if k == 1 else f"{k}-th "
