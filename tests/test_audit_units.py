"""Audit building blocks: calibration arithmetic, exact and approximate search, mirror merging, scores, config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sfbd_guard.auditing import calibrate as cal
from sfbd_guard.auditing.checks import Scores, Thresholds, relative_l2, verdicts
from sfbd_guard.auditing.config import AuditConfig, SearchSpec, resolve_audit_config
from sfbd_guard.auditing.index import InnerProductIndex, Neighbours, l2_neighbours, merge_mirrored
from sfbd_guard.embedding.embed import PixelEmbedder, downsample
from sfbd_guard.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _scores(s1: list[float], ratio: list[float], hashes: list[bool] | None = None) -> Scores:
    n = len(s1)
    sims = np.stack([np.asarray(s1, np.float32), np.asarray(s1, np.float32) - 0.1], axis=1)
    return Scores(np.zeros((n, 2), np.int64), sims, np.zeros(n, bool), np.zeros(n, np.float32), np.zeros(n, np.int64),
                  np.asarray(ratio, np.float32), np.asarray(hashes or [False] * n))


def test_rank_is_the_least_strict_whose_95_percent_quantile_meets_alpha() -> None:
    from scipy.stats import beta

    # the maximum of 300 scores: mean rate 1/301 = 0.33 %, but its 95 % quantile is 1 - 0.05**(1/300) = 0.99 %
    assert cal.rate_quantile(1, 300) == pytest.approx(1 - 0.05 ** (1 / 300)) and cal.rate_quantile(1, 300) > 0.0099
    assert cal.choose_rank(300, 0.001) == (1, pytest.approx(cal.rate_quantile(1, 300)), False)  # needs ~3,000
    assert cal.holdout_needed(0.001) == 2995 and cal.holdout_needed(0.01) == 299
    k, bound, met = cal.choose_rank(5000, 0.01)
    assert met and bound <= 0.01 < beta.ppf(0.95, k + 1, 5000 - k) and bound == pytest.approx(beta.ppf(0.95, k, 5001 - k))
    values = np.arange(1, 5001, dtype=np.float64)
    tau, k_up, _, _ = cal.upper_threshold(values, 0.01)
    low, k_low, _, _ = cal.lower_threshold(values, 0.01)
    assert (tau, low, k_up, k_low) == (5001 - k, k, k, k)


def test_stated_bound_holds_for_95_percent_of_holdouts() -> None:
    """Calibration-conditional: over many holdouts, the realised rate exceeds the stated bound in <= 5 %."""
    rng = np.random.default_rng(0)
    alpha, m, trials, over = 0.05, 199, 2000, 0
    for _ in range(trials):
        tau, _, bound, met = cal.upper_threshold(rng.random(m), alpha)
        over += (1 - tau) > bound  # uniform scores: the realised rate of `s >= tau` is 1 - tau
    assert met and over / trials == pytest.approx(0.05, abs=0.015)


def test_calibrated_small_holdout_falls_back_to_the_stricter_value() -> None:
    config = AuditConfig()
    held = _scores([0.2, 0.3, 0.99], [0.9, 0.6, 0.8])
    result = cal.calibrated(config, "pixel", held, "split:valid", {})
    th = result.thresholds
    assert (th.copy, th.suspect, th.ratio) == pytest.approx((0.99, 0.99, 0.5))  # max(holdout max, 0.97/0.90); min(holdout min, 0.5)
    assert result.expected_fpr["copy"] == pytest.approx(1 - 0.05 ** (1 / 3)) and "too small" in th.note
    assert result.confidence == 0.95 and result.holdout["targets_met"]["copy"] is False
    big = _scores(list(np.linspace(0, 0.8, 4000)), list(np.linspace(0.3, 1, 4000)))
    result = cal.calibrated(config, "pixel", big, "dir:x", {})
    th = result.thresholds
    assert th.copy == pytest.approx(0.8) and th.suspect < th.copy  # k = 1 meets 0.1 % from 2,995 images
    assert "too small" not in th.note and th.method == "holdout"
    assert result.expected_fpr["copy"] <= 0.001 and result.expected_fpr["suspect_similarity"] <= 0.01


def test_uncalibrated_uses_documented_defaults_or_yaml_values() -> None:
    result = cal.uncalibrated(AuditConfig(), "clip", "no split")
    assert (result.thresholds.copy, result.thresholds.suspect, result.thresholds.ratio) == (0.95, 0.90, 0.5)
    assert result.thresholds.method == "default" and result.expected_fpr["copy"] is None
    custom = AuditConfig.model_validate({"thresholds": {"copy_similarity": 0.99, "suspect_ratio": 0.3}})
    th = cal.uncalibrated(custom, "pixel", "none").thresholds
    assert (th.copy, th.suspect, th.ratio) == (0.99, 0.90, 0.3)


def test_clopper_pearson_matches_closed_forms() -> None:
    low, high = cal.clopper_pearson(0, 10)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 10))
    low, high = cal.clopper_pearson(10, 10)
    assert high == 1 and low == pytest.approx(0.025 ** (1 / 10))
    low, high = cal.clopper_pearson(50, 100)
    assert low == pytest.approx(0.3983, abs=1e-4) and high == pytest.approx(0.6017, abs=1e-4)


def test_verdict_rules() -> None:
    th = Thresholds(copy=0.95, suspect=0.9, ratio=0.5, method="default", note="")
    scores = _scores([0.96, 0.92, 0.5, 0.5, 0.1], [0.9, 0.9, 0.4, 0.9, 0.9], [False, False, False, False, True])
    out, rules = verdicts(scores, th)
    assert out == ["copy", "suspect", "suspect", "novel", "copy"]
    assert rules[0] == ["s1>=copy", "s1>=suspect"] and rules[2] == ["l2_ratio<=ratio"] and rules[4] == ["hash"]


def test_the_l2_ratio_rule_needs_a_minimum_similarity() -> None:
    """An image far from every protected image can have one neighbour twice as close as the others: without a
    holdout, the ratio rule speaks only from the documented similarity (0.8) up; with one, from the holdout's median."""
    th = cal.uncalibrated(AuditConfig(), "pixel", "none").thresholds
    assert th.ratio_min_similarity == 0.8
    scores = _scores([0.1, 0.3, 0.85], [0.2, 0.4, 0.4], [False, False, False])
    out, rules = verdicts(scores, th)
    assert out == ["novel", "novel", "suspect"] and rules[2] == ["l2_ratio<=ratio"]
    holdout = _scores(list(np.linspace(0.2, 0.6, 401)), [0.9] * 401, [False] * 401)  # >= 299: k = 1 meets 1 %
    calibrated = cal.calibrated(AuditConfig(), "pixel", holdout, "test", {})
    assert calibrated.thresholds.ratio_min_similarity == pytest.approx(0.4)  # the median of the holdout's s1
    measured = calibrated.holdout["holdout_exceedance"]
    # every holdout ratio sits at the ratio threshold, but only the images from the median similarity up count
    assert set(measured) == {"copy", "suspect_similarity", "suspect_ratio", "flagged"}
    assert measured["suspect_ratio"] == pytest.approx(201 / 401)


def test_relative_l2_ratio() -> None:
    d1, ratio = relative_l2(Neighbours(np.zeros((3, 3), np.int64),
                                       np.array([[1, 2, 3], [0, 1, 2], [0, 0, 0]], np.float32)))
    assert list(d1) == [1, 0, 0] and ratio == pytest.approx([0.5, 0.0, 0.0])


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_equals_numpy_and_ivf_reranks_exactly() -> None:
    rng = np.random.default_rng(0)
    refs, queries = _unit(rng, 2000, 16), _unit(rng, 300, 16)
    truth = queries @ refs.T
    order = np.argsort(-truth, axis=1)[:, :5]
    exact = InnerProductIndex(refs, SearchSpec(batch=64)).search(queries, 5)
    assert np.array_equal(exact.rows, order)
    assert np.allclose(exact.scores, np.take_along_axis(truth, order, 1), atol=1e-5)
    ivf = InnerProductIndex(refs, SearchSpec(exact_limit=100, nprobe=1000, candidates=50))
    assert ivf.approximate and "re-rank" in ivf.kind
    found = ivf.search(queries, 5)
    assert np.array_equal(found.rows, order) and np.allclose(found.scores, exact.scores, atol=1e-5)
    rough = InnerProductIndex(refs, SearchSpec(exact_limit=100, nprobe=1, candidates=20)).search(queries, 5)
    valid = rough.rows >= 0  # whatever the candidates, the similarities reported are the exact ones
    assert np.allclose(rough.scores[valid], truth[np.nonzero(valid)[0], rough.rows[valid]], atol=1e-5)


def test_l2_neighbours_are_rms_distances() -> None:
    rng = np.random.default_rng(1)
    refs, queries = rng.random((50, 12), dtype=np.float32), rng.random((4, 12), dtype=np.float32)
    found = l2_neighbours(refs, queries, 3, batch=2)
    rms = np.sqrt(((queries[:, None] - refs[None]) ** 2).mean(axis=2))
    assert np.array_equal(found.rows, np.argsort(rms, axis=1)[:, :3])
    assert np.allclose(found.scores, np.sort(rms, axis=1)[:, :3], atol=1e-5)


def test_merge_mirrored_keeps_the_better_score_once() -> None:
    plain = Neighbours(np.array([[3, 1, 2]]), np.array([[0.9, 0.5, 0.4]], np.float32))
    mirrored = Neighbours(np.array([[1, 7, 3]]), np.array([[0.95, 0.6, 0.2]], np.float32))
    merged, flipped = merge_mirrored(plain, mirrored, 3)
    assert merged.rows.tolist() == [[1, 3, 7]] and merged.scores == pytest.approx(np.array([[0.95, 0.9, 0.6]]))
    assert flipped.tolist() == [True]


def test_pixel_embedding_is_pearson_correlation() -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    brighter = np.clip(images.astype(np.int64) * 0.5 + 40, 0, 255).astype(np.uint8)  # affine: same correlation
    embedder = PixelEmbedder(size=8, channels=3)
    a, b = embedder.embed(images), embedder.embed(brighter)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5) and np.allclose((a * b).sum(1), 1, atol=1e-2)
    flat = downsample(images, 8).reshape(3, -1)
    assert (a[0] @ a[1]) == pytest.approx(np.corrcoef(flat[0], flat[1])[0, 1], abs=1e-5)
    assert np.all(embedder.embed(np.full((1, 3, 16, 16), 7, np.uint8)) == 0)  # constant image: no direction
    assert downsample(images, 5).shape == (3, 3, 5, 5)  # not a divisor: PIL's box filter


def test_audit_yamls_in_the_repository_validate() -> None:
    files = sorted((REPO / "audits").glob("*.yaml"))
    assert files
    for path in files:
        resolve_audit_config(path, {})
    with pytest.raises(ConfigError, match="alpha_copy"):
        resolve_audit_config(None, {"calibration.alpha_copy": 0.2})
    assert resolve_audit_config(None, {"embedder.clip_weights": "/w.pt"}).embedder_kind == "clip"
    assert math.isclose(resolve_audit_config(None, {}).calibration.alpha_copy, 0.001)
