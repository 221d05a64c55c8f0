"""summary.json: counts per verdict, flagged fraction with a 95% interval, thresholds and how they were set,
embedder, index and timings. Counts are images, never pairs. Its contract (types, reader, writer) is
contracts/audit_summary.py `AuditSummary`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..embedding.embed import Embedder
from ..version import __version__
from .calibrate import Calibration, clopper_pearson, predicted_false
from .checks import VERDICTS, Scores
from .config import AuditConfig
from .index import InnerProductIndex
from .originals import PreparedInfo
from .reference import Reference
from .results import SCHEMA_VERSION, quantiles


def _share(count: int, total: int) -> dict[str, Any]:
    low, high = clopper_pearson(count, total)
    return {"count": count, "of": total, "fraction": count / total if total else 0.0,
            "ci95": [round(low, 6), round(high, 6)], "interval": "Clopper-Pearson (exact binomial)"}


def fpr_text(calibration: Calibration, samples: int | None = None) -> str:
    fpr = calibration.expected_fpr
    if fpr["copy"] is None or fpr["flagged"] is None:
        return "expected false-positive rate: unknown (uncalibrated default thresholds)"
    level = calibration.confidence or 0.95
    count = calibration.holdout.get("count", 0)
    text = (f"false-positive rate on real unseen images, with {level:.0%} confidence over the draw of the "
            f"{count} holdout images: copy <= {fpr['copy']:.2%}, copy or suspect <= {fpr['flagged']:.2%}")
    predicted = predicted_false(calibration, samples) if samples else None
    if predicted:
        text += (f"; so among these {predicted['of']} samples, if none copied anything, at most {predicted['copy']} "
                 f"would be called copies and {predicted['flagged']} flagged ({level:.0%} confidence)")
    missed = [name for name, met in (calibration.holdout.get("targets_met") or {}).items() if not met]
    if missed:
        text += " (the holdout is too small for the configured target of " + ", ".join(missed) + ")"
    return text


def _thresholds(calibration: Calibration, config: AuditConfig, samples: int) -> dict[str, Any]:
    th = calibration.thresholds
    return {"copy": th.copy, "suspect": th.suspect, "ratio": th.ratio, "ratio_min_similarity": th.ratio_min_similarity,
            "ratio_min_quantile": config.calibration.ratio_min_quantile if th.method == "holdout" else None,
            "method": th.method, "note": th.note,
            "alpha_copy": config.calibration.alpha_copy, "alpha_suspect": config.calibration.alpha_suspect,
            "expected_fpr": calibration.expected_fpr, "expected_fpr_text": fpr_text(calibration, samples),
            "confidence": calibration.confidence, "predicted_false": predicted_false(calibration, samples),
            "holdout": calibration.holdout}


def _top(scores: Scores, verdicts: list[str], rules: list[list[str]], names: list[str], ids: list[str],
         count: int = 20) -> list[dict[str, Any]]:
    order = np.argsort(-scores.s1, kind="stable")[:count]
    return [{"sample": names[i], "record_id": ids[int(scores.rows[i, 0])] if scores.rows[i, 0] >= 0 else None,
             "s1": round(float(scores.s1[i]), 6), "l2_ratio": round(float(scores.l2_ratio[i]), 6),
             "verdict": verdicts[i], "rules": rules[i], "mirror": bool(scores.flipped[i]),
             "transform": scores.transform[i] if scores.transform else "identity"} for i in order]


HISTOGRAM_BINS = 40


def similarity_histogram(samples: np.ndarray, holdout: np.ndarray, marks: list[float]) -> dict[str, Any]:
    """Counts of the samples' and the holdout's top-1 similarity in equal bins from the lowest value (or mark) to 1,
    for the audit page's and the compliance report's charts (no score of any single image is recoverable)."""
    values = [v for v in (samples, holdout) if len(v)]
    low = float(min([*(float(v.min()) for v in values), *marks, 0.9]))
    edges = np.linspace(min(low, 1.0 - 1e-6), 1.0, HISTOGRAM_BINS + 1)
    return {"edges": [round(float(e), 6) for e in edges],
            "samples": np.histogram(np.clip(samples, edges[0], 1.0), edges)[0].tolist(),
            "holdout": np.histogram(np.clip(holdout, edges[0], 1.0), edges)[0].tolist()}


def _background(values: np.ndarray, calibration: Calibration) -> tuple[dict[str, Any], list[str]]:
    th = calibration.thresholds
    above = float(np.mean(values >= th.copy)) if len(values) else 0.0
    info = {"what": "leave-one-out top-1 similarity of protected images to the other protected images (no mirror)",
            "count": len(values), "quantiles": quantiles(values), "above_copy": round(above, 6),
            "above_suspect": round(float(np.mean(values >= th.suspect)) if len(values) else 0.0, 6)}
    warnings = []
    if th.method == "default" and above > 0.01:
        warnings.append(f"{above:.1%} of protected images have another protected image at or above the default copy "
                        "threshold: on this data the default is too permissive; calibrate with --holdout DIR")
    return info, warnings


def build_summary(*, samples: Path, samples_fingerprint: str, info: PreparedInfo, config: AuditConfig, embedder: Embedder,
                  index: InnerProductIndex, reference: Reference, calibration: Calibration, scores: Scores,
                  verdicts: list[str], rules: list[list[str]], names: list[str], errors: int, holdout_s1: np.ndarray,
                  background_s1: np.ndarray, thumbnails: str,
                  timings: dict[str, float]) -> dict[str, Any]:
    counts = {v: verdicts.count(v) for v in VERDICTS} | {"error": errors}
    scored = len(verdicts)
    loo, warnings = _background(background_s1, calibration)
    if errors:
        warnings.append(f"{errors} sample file(s) could not be read and were not audited (status error in samples.parquet)")
    return {
        "schema_version": SCHEMA_VERSION, "tool_version": __version__,
        "samples": str(samples.resolve()), "samples_fingerprint": samples_fingerprint,
        "prepared": {"path": str(info.root), "fingerprint": info.fingerprint, "format": info.card.format,
                     "split": info.card.split, "resolution": info.resolution},
        "references": len(info.protected_ids), "counts": counts,
        "flagged": _share(counts["copy"] + counts["suspect"], scored), "copies": _share(counts["copy"], scored),
        "thresholds": _thresholds(calibration, config, scored),
        "embedder": {**embedder.identity(), "dim": embedder.dim, "flip": "flip" in config.embedder.transforms,
                     "transforms": list(config.embedder.transforms)},
        "index": {"kind": index.kind, "references": len(reference.embeddings), "dim": int(reference.embeddings.shape[1]),
                  "cache": reference.status, "cache_key": reference.key, "built_at": reference.built_at},
        "l2": {"size": round((reference.pixels.shape[1] / info.channels) ** 0.5),
               "k": min(config.l2.k, len(reference.pixels))},
        "similarity": {"samples": quantiles(scores.s1), "holdout": quantiles(holdout_s1),
                       "histogram": similarity_histogram(scores.s1, holdout_s1, [calibration.thresholds.suspect]),
                       "samples_above": {t: round(float(np.mean(scores.s1 > float(t))), 6)
                                         for t in ("0.90", "0.95", "0.99")}},
        "background": loo, "warnings": warnings,
        "top": _top(scores, verdicts, rules, names, info.protected_ids),
        "thumbnails": thumbnails, "timings": timings, "config": config.model_dump(mode="json"),
    }
