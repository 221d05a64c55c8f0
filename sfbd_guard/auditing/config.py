"""Audit settings (`audits/<name>.yaml`), validated, with command-line overrides on top.

Thresholds used when no holdout exists are documented here and in docs/audit.md. They are
per embedder because similarity scales are backbone-specific (0.9 means different things for
normalised pixels and for CLIP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import StrictModel, read_yaml_mapping, set_dotted, validate_mapping
from ..policy.model import TRANSFORMS, Transform, old_transforms_flag, ordered_transforms

# Used only when no holdout is available (calibration.method = "default"): copy / suspect on the top-1
# cosine similarity, and suspect when the relative L2 ratio is at or below `ratio` (Carlini et al.'s
# adaptive distance d1 / (0.5 * mean d_1..d_k) <= 1, i.e. d1 / mean <= 0.5) AND the top-1 similarity is at
# least `ratio_min_similarity`. The ratio alone is scale-free: an image far from every protected image (noise,
# another domain) can still have one neighbour twice as close as the others, so the ratio rule only speaks for
# images that are already close in the embedding. 0.8 is below `suspect` (the ratio rule still adds recall
# between 0.8 and 0.9) and far above what unrelated images reach (pixel correlation of noise with a digit ~0).
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "pixel": {"copy": 0.97, "suspect": 0.90, "ratio": 0.5, "ratio_min_similarity": 0.8},
    "clip": {"copy": 0.95, "suspect": 0.90, "ratio": 0.5, "ratio_min_similarity": 0.8},
}
CACHE_ENV = "GUARD_AUDIT_CACHE"


class EmbedderSpec(StrictModel):
    kind: Literal["auto", "pixel", "clip"] = "auto"  # auto: clip when clip_weights is set, else pixel
    pixel_size: int = Field(default=32, ge=4, le=512)  # side of the pixel embedding (capped at the resolution)
    # also search each sample's variants under these exact transforms (symmetry.py: flip = mirror, rotate = quarter
    # turns, invert = 255 - x, and their combinations: 16 variants by default); each reference keeps its best score
    transforms: list[Transform] = Field(default_factory=lambda: list(TRANSFORMS))
    clip_model: str = "ViT-B-32"  # open_clip architecture for a weights FILE (a directory brings its config)
    clip_weights: str | None = None  # local weights file or open_clip directory; relative to the YAML file
    quick_gelu: bool = False  # OpenAI CLIP weights need QuickGELU; a file path cannot tell open_clip
    batch: int = Field(default=64, ge=1)  # images per embedding batch

    @model_validator(mode="before")
    @classmethod
    def _old_flip(cls, data: Any) -> Any:
        """`flip` (before transforms): true is the default (now also rotations and inversion); false is
        `transforms: []`, as it was."""
        return old_transforms_flag(data, "flip")

    @field_validator("transforms")
    @classmethod
    def _unique_transforms(cls, transforms: list[str]) -> list[str]:
        return ordered_transforms(transforms)


class SearchSpec(StrictModel):
    k: int = Field(default=10, ge=2, le=1000)  # neighbours per sample kept in the report
    exact_limit: int = Field(default=1_000_000, ge=1)  # above this many references an IVF index proposes candidates
    candidates: int = Field(default=256, ge=1)  # approximate candidates per query, re-ranked exactly
    nprobe: int = Field(default=32, ge=1)  # IVF lists visited per query
    batch: int = Field(default=4096, ge=1)  # queries per FAISS call (BLAS is used from 20 queries on)
    threads: int = Field(default=0, ge=0)  # FAISS threads; 0 keeps the library default
    # references per index shard: the exact search holds one shard at a time (from the index cache, when on)
    shard_size: int = Field(default=1_000_000, ge=1)


class L2Spec(StrictModel):
    size: int = Field(default=32, ge=4, le=512)  # side of the [0, 1] images compared by RMS L2 (capped)
    k: int = Field(default=50, ge=2)  # the ratio divides by the mean distance to this many nearest


class CalibrationSpec(StrictModel):
    holdout: Literal["auto", "none"] = "auto"  # auto: the splits the policy did not select; none: defaults
    # the policy's `action: holdout` rules to calibrate on; empty = all of them (exclude rules are refused: opt-outs)
    holdout_rules: list[str] = Field(default_factory=list)
    alpha_copy: float = Field(default=0.001, gt=0, lt=1)  # false-positive rate of copy on real unseen images
    alpha_suspect: float = Field(default=0.01, gt=0, lt=1)  # the same for suspect (per rule)
    # with a holdout, the L2-ratio rule applies only to images whose top-1 similarity reaches this quantile of
    # the holdout's (0.5: closer to the protected set than half of the real images the model never saw)
    ratio_min_quantile: float = Field(default=0.5, ge=0, le=1)
    max_holdout: int = Field(default=5000, ge=1)  # at most this many holdout images (seeded subset)
    seed: int = 0  # seeds the holdout subset

    @model_validator(mode="after")
    def _ordered(self) -> CalibrationSpec:
        if self.alpha_copy > self.alpha_suspect:
            raise ValueError("alpha_copy must not exceed alpha_suspect (a copy is also suspect)")
        return self


class ThresholdSpec(StrictModel):
    copy_similarity: float | None = Field(default=None, ge=-1, le=1)  # without a holdout; None = embedder default
    suspect_similarity: float | None = Field(default=None, ge=-1, le=1)  # without a holdout; None = embedder default
    suspect_ratio: float | None = Field(default=None, ge=0, le=1)  # without a holdout; None = the default 0.5
    # without a holdout: the L2-ratio rule needs at least this top-1 similarity; None = the default 0.8
    ratio_min_similarity: float | None = Field(default=None, ge=-1, le=1)


class ReportSpec(StrictModel):
    thumbnails: bool = True  # pictures of flagged matches (the only originals the audit writes)
    pairs: int = Field(default=48, ge=0)  # matched pairs shown in report.html
    thumb_size: int = Field(default=96, ge=16, le=512)  # pixels per thumbnail side


class CacheSpec(StrictModel):
    # Keep the reference index on disk between runs. OFF by default: for the pixel embedder an entry is
    # an exact copy of every protected original at <= 32 px (pixels.npy), so turning it on writes
    # protected-derived data outside the prepared directory (owner-only, 0700/0600).
    enabled: bool = False
    dir: str | None = None  # where, when enabled: default $GUARD_AUDIT_CACHE, else ~/.cache/sfbd_guard/audit-index


class MembershipSpec(StrictModel):
    """`guard membership`: the membership-inference test of a trained model (auditing/membership.py)."""

    sigmas: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4, 0.8], min_length=1, max_length=16)
    draws: int = Field(default=4, ge=1, le=64)  # noise images per level, the same for every image and model
    max_images: int = Field(default=512, ge=8)  # per group (clean, protected, holdout): a seeded subset above it
    bootstrap: int = Field(default=1000, ge=100, le=100_000)  # resamples of each interval
    # the flag: the protected group is told from the holdout when the AUC's 95 % interval lies above 0.5 + margin
    # (with a control model: when the paired interval of AUC(model) - AUC(control) lies above margin)
    margin: float = Field(default=0.02, ge=0, lt=0.5)
    min_holdout: int = Field(default=20, ge=2)  # fewer holdout images: refused (no test)
    batch: int = Field(default=256, ge=1)
    workers: int | None = Field(default=None, ge=1)  # Ray actors with --executor ray (default: one per cluster CPU)
    seed: int = 0  # the common noise, the subsets and the bootstrap

    @field_validator("sigmas")
    @classmethod
    def _positive(cls, sigmas: list[float]) -> list[float]:
        if any(not 0 < s <= 80 for s in sigmas):
            raise ValueError("every sigma must be in (0, 80]")
        return sigmas

    @model_validator(mode="after")
    def _enough_holdout(self) -> MembershipSpec:
        if self.max_images < self.min_holdout:
            raise ValueError(f"membership.max_images ({self.max_images}) caps the holdout below membership.min_holdout "
                             f"({self.min_holdout})")
        return self


class AuditConfig(StrictModel):
    version: Literal[1] = 1
    name: str = "default"
    embedder: EmbedderSpec = EmbedderSpec()
    search: SearchSpec = SearchSpec()
    l2: L2Spec = L2Spec()
    calibration: CalibrationSpec = CalibrationSpec()
    thresholds: ThresholdSpec = ThresholdSpec()
    report: ReportSpec = ReportSpec()
    cache: CacheSpec = CacheSpec()
    membership: MembershipSpec = MembershipSpec()

    @property
    def embedder_kind(self) -> Literal["pixel", "clip"]:
        if self.embedder.kind == "auto":
            return "clip" if self.embedder.clip_weights else "pixel"
        return self.embedder.kind

    def cache_dir(self) -> Path | None:
        if not self.cache.enabled:
            return None
        if self.cache.dir:
            return Path(self.cache.dir).expanduser()
        env = os.environ.get(CACHE_ENV)
        return Path(env).expanduser() if env else Path.home() / ".cache" / "sfbd_guard" / "audit-index"


def resolve_audit_config(path: Path | None, overrides: dict[str, Any]) -> AuditConfig:
    """The YAML (if any) with dotted `overrides` applied; relative paths in the YAML resolve against it."""
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    for section, key in (("embedder", "clip_weights"), ("cache", "dir")):
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if path is not None and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            data[section][key] = str((path.parent / value).resolve())
    for key, value in overrides.items():
        if value is not None:
            set_dotted(data, key, value)
    return validate_mapping(AuditConfig, data, source=str(path) if path else "audit settings")
