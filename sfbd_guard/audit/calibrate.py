"""Thresholds from real images that were not trained on (split-conformal quantiles), or documented defaults.

With m holdout scores v_(1) <= ... <= v_(m) and a new non-copy image exchangeable with them, the
threshold tau = v_(r), r = ceil((m + 1)(1 - alpha)), gives P(s >= tau) = (m + 1 - r)/(m + 1) <= alpha
(the rank of s among the m + 1 values is uniform). That needs m >= 1/alpha - 1 (alpha 0.001: 999
images). With fewer, tau = max(largest holdout score, the default) and the bound is 1/(m + 1) at best:
the summary says so. The ratio rule uses the lower tail the same way: tau = v_(floor((m + 1) alpha)), and
applies only to images whose top-1 similarity reaches the `ratio_min_quantile` quantile of the holdout's (the
median by default): requiring both can only lower its false-positive rate, so the bound still holds. Each rule's
rate on the holdout itself is measured and reported next to the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checks import Scores, Thresholds
from .config import DEFAULT_THRESHOLDS, AuditConfig


@dataclass(frozen=True)
class Calibration:
    thresholds: Thresholds
    expected_fpr: dict[str, float | None]  # upper bounds on the false-positive rate per rule (None = unknown)
    holdout: dict[str, Any] = field(default_factory=dict)  # source, count, dropped, exceedances


def upper_threshold(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    """(tau, P(s >= tau) bound) for the (1 - alpha) conformal quantile; (None, None) if m is too small."""
    m = len(values)
    rank = math.ceil((m + 1) * (1 - alpha))
    if m == 0 or rank > m:
        return None, None
    return float(np.sort(values)[rank - 1]), (m + 1 - rank) / (m + 1)


def lower_threshold(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    """(tau, P(s <= tau) bound) for the alpha conformal quantile of the lower tail; (None, None) if m is too small."""
    m = len(values)
    rank = math.floor((m + 1) * alpha)
    if m == 0 or rank < 1:
        return None, None
    return float(np.sort(values)[rank - 1]), rank / (m + 1)


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


def _or_stricter(found: tuple[float | None, float | None], fallback: float, extreme: float, m: int,
                upper: bool) -> tuple[float, float | None, bool]:
    """The conformal threshold, or (holdout too small) the stricter of the holdout extreme and the default.

    Both fallbacks are at least as strict as the holdout extreme, so P(false positive) <= 1/(m + 1).
    """
    tau, bound = found
    if tau is not None:
        return tau, bound, False
    return (max if upper else min)(fallback, extreme), 1 / (m + 1), True


def calibrated(config: AuditConfig, kind: str, holdout: Scores, source: str, dropped: dict[str, int]) -> Calibration:
    """Thresholds from the holdout's top-1 similarities and L2 ratios (see the module docstring)."""
    spec, base, m = config.calibration, defaults(config, kind), len(holdout.s1)
    s1, ratio = holdout.s1.astype(np.float64), holdout.l2_ratio.astype(np.float64)
    top, bottom = float(s1.max()), float(ratio.min())
    copy, fpr_copy, small_c = _or_stricter(upper_threshold(s1, spec.alpha_copy), base["copy"], top, m, True)
    suspect, fpr_s, small_s = _or_stricter(upper_threshold(s1, spec.alpha_suspect), base["suspect"], top, m, True)
    low, fpr_r, small_r = _or_stricter(lower_threshold(ratio, spec.alpha_suspect), base["ratio"], bottom, m, False)
    suspect = min(suspect, copy)
    min_sim = float(np.quantile(s1, spec.ratio_min_quantile))
    note = (f"calibrated on {m} holdout image(s) ({source}): copy = the (1 - {spec.alpha_copy:g}) quantile and "
            f"suspect = the (1 - {spec.alpha_suspect:g}) quantile of their top-1 similarity to the protected set, "
            f"ratio = the {spec.alpha_suspect:g} quantile of their relative L2 ratio, applied from the "
            f"{spec.ratio_min_quantile:g} quantile of their similarity ({min_sim:.4f}) up")
    if small_c or small_s or small_r:
        need = math.ceil(1 / spec.alpha_copy) - 1 if small_c else math.ceil(1 / spec.alpha_suspect) - 1
        note += (f"; the holdout is too small for some alpha (needs >= {need} images), so those thresholds are "
                 "the most extreme holdout score or the documented default, whichever is stricter")
    flagged = min(1.0, (fpr_s or 0.0) + (fpr_r or 0.0))  # union bound over the two suspect rules
    close = (ratio <= low) & (s1 >= min_sim)
    exceed = {"copy": float(np.mean(s1 >= copy)), "suspect_similarity": float(np.mean(s1 >= suspect)),
              "suspect_ratio": float(np.mean(close)), "flagged": float(np.mean((s1 >= suspect) | close))}
    return Calibration(Thresholds(copy, suspect, low, "holdout", note, min_sim),
                       {"copy": fpr_copy, "suspect_similarity": fpr_s, "suspect_ratio": fpr_r, "flagged": flagged},
                       {"source": source, "count": m, "dropped": dropped, "holdout_exceedance": exceed})
