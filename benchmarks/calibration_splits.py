"""Does the audit's false-positive claim hold on images it never saw? Calibrate on one half of a holdout, count the
false positives on the other half, over many seeded random splits, on two real image sets (image_sets.py).

Each set is split once (seeded) into a protected reference set and a pool of images never trained on. Every pool
image is scored once against the protected set by the audit's own scoring (auditing/checks.py `score`: the pixel
embedder, all 16 variants of `transforms`, the relative L2 ratio); each split then calibrates the thresholds on a
random half of the pool (auditing/calibrate.py `calibrated`, as `guard audit` does) and applies them to the other
half (`verdicts`). Reported per set: the stated bounds (95 % confidence) and how often the observed rate on the
unseen half exceeded them, for "copy" and for "copy or suspect"; and the precision of "copy" on sample sets where
planted copies (exact, mirrored, rotated, JPEG-like noise) make up a third.

    PYTHONPATH=. python benchmarks/calibration_splits.py --splits 200 --json benchmarks/results/calibration_splits.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sfbd_guard.auditing import calibrate as cal
from sfbd_guard.auditing.checks import Scores, score, verdicts
from sfbd_guard.auditing.config import AuditConfig
from sfbd_guard.auditing.index import InnerProductIndex
from sfbd_guard.embedding.embed import PixelEmbedder, embed_batched, l2_vectors
from sfbd_guard.hashing import pixel_sha256


@dataclass
class Scorer:
    """The audit's scoring against one protected set (what auditing/service.py `_Context` builds from originals)."""

    protected: np.ndarray
    config: AuditConfig

    def __post_init__(self) -> None:
        side = self.protected.shape[-1]
        self.embedder = PixelEmbedder(size=min(self.config.embedder.pixel_size, side), channels=self.protected.shape[1])
        self.l2 = min(self.config.l2.size, side)
        vectors = embed_batched(self.embedder, self.protected, self.config.embedder.batch)
        self.index = InnerProductIndex(vectors, self.config.search)
        self.pixels = l2_vectors(self.protected, self.l2)
        self.hashes = {pixel_sha256(p) for p in self.protected}

    def __call__(self, images: np.ndarray) -> Scores:
        return score(images, embedder=self.embedder, index=self.index, reference_pixels=self.pixels,
                     protected_sha256=self.hashes, config=self.config, l2_size=self.l2)


def subset(scores: Scores, rows: np.ndarray) -> Scores:
    return scores.take(rows)


def split_set(images: np.ndarray, protected: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(protected images, pool of unseen images): a seeded random split."""
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order[:protected]], images[order[protected:]]


def split_trials(pool: Scores, config: AuditConfig, splits: int, seed: int = 0) -> list[dict[str, float]]:
    """Per split: the stated bounds (calibrated on a random half) and the observed rates on the other half."""
    rng = np.random.default_rng(seed)
    n = len(pool.s1)
    out = []
    for _ in range(splits):
        order = rng.permutation(n)
        calibrate, test = order[: n // 2], order[n // 2 :]
        found = cal.calibrated(config, "pixel", subset(pool, calibrate), "split", {})
        verdict, _ = verdicts(subset(pool, test), found.thresholds)
        copies, flagged = sum(v == "copy" for v in verdict), sum(v != "novel" for v in verdict)
        predicted = cal.predicted_false(found, len(test)) or {"copy": len(test), "flagged": len(test)}
        out.append({"bound_copy": float(found.expected_fpr["copy"] or 1.0), "copy": copies / len(test),
                    "bound_flagged": float(found.expected_fpr["flagged"] or 1.0), "flagged": flagged / len(test),
                    "predicted_copy": predicted["copy"], "copies": copies,
                    "predicted_flagged": predicted["flagged"], "flags": flagged,
                    "copy_threshold": found.thresholds.copy,
                    "mean_claim_copy": found.holdout["mean_fpr"]["copy"]})  # what summaries stated before
    return out


def planted(protected: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Copies of protected images: exact, mirrored, rotated a quarter turn, and with mild pixel noise (std 4/255)."""
    rng = np.random.default_rng(seed)
    chosen = protected[rng.choice(len(protected), count, replace=False)]
    out = chosen.copy()
    out[1::4] = chosen[1::4, ..., ::-1]
    out[2::4] = np.rot90(chosen[2::4], 1, axes=(-2, -1))
    noisy = chosen[3::4].astype(np.float64) + rng.normal(0, 4, chosen[3::4].shape)
    out[3::4] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def copy_precision(scorer: Scorer, pool: Scores, copies: Scores, config: AuditConfig, splits: int,
                   seed: int = 0) -> list[dict[str, float]]:
    """Per split: calibrate on half the pool; samples = the other half + planted copies (a third of the samples)."""
    rng = np.random.default_rng(seed)
    n, out = len(pool.s1), []
    for _ in range(splits):
        order = rng.permutation(n)
        calibrate, test = order[: n // 2], order[n // 2 :]
        thresholds = cal.calibrated(config, "pixel", subset(pool, calibrate), "split", {}).thresholds
        planted_rows = rng.choice(len(copies.s1), len(test) // 2, replace=False)
        innocent, _ = verdicts(subset(pool, test), thresholds)
        guilty, _ = verdicts(subset(copies, planted_rows), thresholds)
        true, false = sum(v == "copy" for v in guilty), sum(v == "copy" for v in innocent)
        out.append({"precision": true / max(1, true + false), "recall": true / len(planted_rows),
                    "false_copies": false, "samples": len(test) + len(planted_rows)})
    return out


def _theory(bound: float, m: int, n: int) -> float:
    """P(the rate observed on n unseen images exceeds `bound`) for a threshold at the maximum of m (k = 1)."""
    from scipy.stats import betabinom

    return float(betabinom.sf(np.floor(bound * n), n, 1, m))


def measure(name: str, images: np.ndarray, protected: int, splits: int, config: AuditConfig) -> dict[str, Any]:
    reference, unseen = split_set(images, protected, seed=0)
    scorer = Scorer(reference, config)
    pool = scorer(unseen)
    copies = scorer(planted(reference, min(len(reference), len(unseen)), seed=1))
    trials = split_trials(pool, config, splits)
    precision = copy_precision(scorer, pool, copies, config, splits)
    rate = lambda key: float(np.mean([t[key] for t in trials]))  # noqa: E731
    return {
        "set": name, "shape": list(images.shape[1:]), "protected": len(reference), "pool": len(unseen),
        "calibration_half": len(unseen) // 2, "splits": splits,
        "copy": {"bound_median": float(np.median([t["bound_copy"] for t in trials])), "observed_mean": rate("copy"),
                 "exceeded": float(np.mean([t["copy"] > t["bound_copy"] for t in trials])),
                 "predicted_median": float(np.median([t["predicted_copy"] for t in trials])),
                 "count_exceeded": float(np.mean([t["copies"] > t["predicted_copy"] for t in trials])),
                 "exceeded_theory": _theory(trials[0]["bound_copy"], len(unseen) // 2, len(unseen) - len(unseen) // 2),
                 "old_claim": float(np.median([t["mean_claim_copy"] for t in trials])),
                 "old_claim_exceeded": float(np.mean([t["copy"] > t["mean_claim_copy"] for t in trials]))},
        "flagged": {"bound_median": float(np.median([t["bound_flagged"] for t in trials])),
                    "observed_mean": rate("flagged"),
                    "exceeded": float(np.mean([t["flagged"] > t["bound_flagged"] for t in trials])),
                    "predicted_median": float(np.median([t["predicted_flagged"] for t in trials])),
                    "count_exceeded": float(np.mean([t["flags"] > t["predicted_flagged"] for t in trials]))},
        "copy_precision": {"min": min(p["precision"] for p in precision),
                           "mean": float(np.mean([p["precision"] for p in precision])),
                           "share_at_least_0.99": float(np.mean([p["precision"] >= 0.99 for p in precision])),
                           "recall_mean": float(np.mean([p["recall"] for p in precision]))},
    }


def main() -> None:
    from image_sets import colour_tiles16, digits

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = AuditConfig()
    results = [measure("digits (scikit-learn, 8 px grey)", digits(), 1200, args.splits, config),
               measure("colour tiles (scikit-image photos, 16 px RGB)", colour_tiles16(), 1500, args.splits, config)]
    for r in results:
        print(f"{r['set']}: protected {r['protected']}, pool {r['pool']} (calibrate on {r['calibration_half']}), "
              f"{r['splits']} splits")
        for rule in ("copy", "flagged"):
            c = r[rule]
            print(f"  {rule:8s} bound (median) {c['bound_median']:.2%}  observed mean {c['observed_mean']:.2%}  "
                  f"exceeded the bound in {c['exceeded']:.1%} of splits; count > predicted "
                  f"{c['predicted_median']:.0f} of {r['pool'] - r['calibration_half']} in {c['count_exceeded']:.1%}")
        c = r["copy"]
        print(f"  copy: exceedance expected from the Beta-binomial {c['exceeded_theory']:.1%}; the old claim "
              f"(mean {c['old_claim']:.2%}) was exceeded in {c['old_claim_exceeded']:.1%} of splits")
        p = r["copy_precision"]
        print(f"  copy precision (a third planted): mean {p['mean']:.4f}, min {p['min']:.4f}, "
              f">= 0.99 in {p['share_at_least_0.99']:.0%} of splits; recall {p['recall_mean']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
