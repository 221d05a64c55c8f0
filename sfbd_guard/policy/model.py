"""Curation policies: which records are clean, protected (noised) or excluded.

The YAML schema is a contract (see docs/policy.md): version, name, dataset, rules, noise, output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import StrictModel, read_yaml_mapping, set_dotted, validate_mapping
from ..datasets.base import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, SourceSpec
from ..hashing import sha256_bytes

# exclude: opt-outs (never stored, never read again, not even by the audit); holdout: never trained on, kept where it
# is for the audit's calibration and later model tests (decided after exclude, before clean and protect)
Action = Literal["exclude", "holdout", "clean", "protect"]


class DatasetSpec(StrictModel):
    # on-disk layout of the source dataset
    format: Literal["celeba", "cifar10", "imagefolder", "digits", "webdataset", "parquet"]
    root: str | None = None  # relative to the policy file; not needed for digits
    split: str = "all"  # format-specific split name, or all
    resolution: int = Field(gt=0, le=4096)  # output images are resolution × resolution
    # An image whose header declares more pixels (width × height) is an error row, never decoded.
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, le=1_000_000_000)
    # A source file larger than this is an error row (image) or an exit-2 error (list, batch), never read.
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, gt=0, le=16 * 2**30)
    # webdataset: tar shards as a brace pattern relative to the root (shards/{00000..00099}.tar); default: root's *.tar
    shards: str | None = Field(default=None, min_length=1, max_length=1000)
    # parquet: the column holding the images (Hugging Face {bytes, path} struct, or binary)
    image_column: str | None = Field(default=None, min_length=1, max_length=200)
    # 1: store grey images (the luma of the decoded RGB: scans of grey content stored as RGB or grey files);
    # 3: RGB. Default: the format's own (digits 1, the others 3)
    channels: Literal[1, 3] | None = None

    @field_validator("shards")
    @classmethod
    def _shards_inside(cls, value: str | None) -> str | None:
        if value is not None:
            from ..datasets.webdataset import shard_paths

            shard_paths(value)  # ValueError: absolute, `..`, not .tar, bad braces, too many shards
        return value

    @model_validator(mode="after")
    def _root_needed(self) -> DatasetSpec:
        if self.format != "digits" and not self.root:
            raise ValueError(f"format {self.format!r} needs dataset.root")
        if self.shards is not None and self.format != "webdataset":
            raise ValueError(f"shards: only for format webdataset, not {self.format!r}")
        if self.image_column is not None and self.format != "parquet":
            raise ValueError(f"image_column: only for format parquet, not {self.format!r}")
        if self.channels == 3 and self.format == "digits":
            raise ValueError("channels: 3 is not available for format 'digits' (grey, 1 channel)")
        return self

    def source_spec(self, root: Path | None) -> SourceSpec:
        """What a reader needs to read this dataset from `root` (already resolved; None for digits)."""
        return SourceSpec(format=self.format, root=root, split=self.split, resolution=self.resolution,
                          max_pixels=self.max_pixels, max_file_bytes=self.max_file_bytes, shards=self.shards,
                          image_column=self.image_column or "image", channels=self.channels)


class SampleSpec(StrictModel):
    fraction: float | None = Field(default=None, gt=0, le=1)  # keep round(fraction × units), at least one
    count: int | None = Field(default=None, ge=1)  # or keep this many units
    seed: int = 0  # seeds the deterministic choice of units
    by: str | None = None  # a metadata column: its groups are kept or dropped whole

    @model_validator(mode="after")
    def _one_of(self) -> SampleSpec:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of fraction or count")
        return self


class Rule(StrictModel):
    name: str = Field(min_length=1)  # recorded in the manifest as the deciding rule
    action: Action  # exclude | holdout | clean | protect
    where: str | None = None  # DuckDB SQL boolean expression over the metadata; omitted = every record
    sample: SampleSpec | None = None  # keep a deterministic subset of what `where` matches


class NoiseSpec(StrictModel):
    sigma: float = Field(gt=0)  # std of the Gaussian noise on the [-1, 1] pixel scale
    key_file: str | None = None  # secret key made by `guard keygen`, relative to the policy file; none = a fresh key

    @model_validator(mode="before")
    @classmethod
    def _no_public_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError("seed is no longer accepted: a public seed lets anyone holding the prepared directory "
                             "rebuild every protected original; remove it (each run draws a fresh secret key) or set "
                             "key_file to a key made by `guard keygen` for byte-identical re-runs")
        return data


PIXEL_THRESHOLD = 0.99  # default near-duplicate cosine of the pixel embedder (benchmarks/dedup_recall.py, docs/policy.md)
FINE_MARGIN = 0.02  # default fine_threshold = threshold - this (pixel; benchmarks/README.md, docs/policy.md)
CLIP_THRESHOLD = 0.95  # default near-duplicate cosine of the clip embedder (docs/policy.md: not measured here, no weights)
DUPLICATE_RULE = "duplicate"  # the rule a record demoted by dedup carries in the manifest
Transform = Literal["flip", "rotate", "invert"]
TRANSFORMS: tuple[Transform, ...] = ("flip", "rotate", "invert")  # symmetry.GENERATORS, all by default


def old_transforms_flag(data: Any, old: str) -> Any:
    """A config section's `transforms` from its boolean `old` name (`mirror` in a policy's dedup, `flip` in an
    audit's embedder): true is the default (all transforms), false is `transforms: []`; both given is an error."""
    if isinstance(data, dict) and old in data:
        if "transforms" in data:
            raise ValueError(f"give transforms only ({old} is its old name: {old}: true is transforms: "
                             f"[flip, rotate, invert], {old}: false is transforms: [])")
        data = dict(data)
        flag = data.pop(old)
        if not isinstance(flag, bool):
            raise ValueError(f"{old} (the old name of transforms) must be true or false")
        if not flag:
            data["transforms"] = []
    return data


def ordered_transforms(transforms: list[str]) -> list[str]:
    """Each transform once, in one order whatever the file's (ValueError for a repeat)."""
    if len(set(transforms)) != len(transforms):
        raise ValueError("each transform once")
    return [name for name in TRANSFORMS if name in transforms]


class DedupSpec(StrictModel):
    """Near-duplicate and exact-copy merging (curation/dedup.py): each cluster takes its strictest action."""

    enabled: bool = True
    embedder: Literal["pixel", "clip"] = "pixel"  # pixel: weight-free z-scored grey pixels (cosine = correlation)
    size: int = Field(default=8, ge=4, le=64)  # side of the pixel embedding (capped at the resolution)
    threshold: float | None = Field(default=None, gt=0, le=1)  # cosine at or above which two records join; none = default
    # pixel: each near pair is compared again at twice the size (16 px at size 8, best variant) and joins only if
    # that cosine reaches fine_threshold too; none = threshold - FINE_MARGIN; -1 = no second look (not computed)
    fine_threshold: float | None = Field(default=None, ge=-1, le=1)
    # copies hidden by these exact transforms count as copies (symmetry.py): flip (mirror), rotate (quarter turns;
    # with flip, all eight rotations and flips), invert (255 - x); exact: by a canonical digest; pixel: searched
    # against every variant; clip: each record embedded as the normalised sum of its variants' features
    transforms: list[Transform] = Field(default_factory=lambda: list(TRANSFORMS))
    clip_weights: str | None = None  # clip: local open_clip weights file or directory, relative to the policy file
    clip_model: str = "ViT-B-32"  # clip: the architecture of a weights file (a directory brings its own config)
    quick_gelu: bool = False  # clip: OpenAI CLIP weights need QuickGELU
    batch: int = Field(default=64, ge=1, le=4096)  # clip: images per embedding batch

    @model_validator(mode="before")
    @classmethod
    def _old_mirror(cls, data: Any) -> Any:
        """`mirror` (before transforms): true is the default (now also rotations and inversion); false is
        `transforms: []` (untransformed images only), as it was."""
        return old_transforms_flag(data, "mirror")

    @field_validator("transforms")
    @classmethod
    def _unique_transforms(cls, transforms: list[str]) -> list[str]:
        return ordered_transforms(transforms)

    @property
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return CLIP_THRESHOLD if self.embedder == "clip" else PIXEL_THRESHOLD

    @property
    def effective_fine_threshold(self) -> float:
        """pixel: the cosine a near pair must also reach at the finer size (-1: no such check)."""
        if self.fine_threshold is not None:
            return self.fine_threshold
        return round(self.effective_threshold - FINE_MARGIN, 6)

    @model_validator(mode="after")
    def _clip_needs_weights(self) -> DedupSpec:
        if self.enabled and self.embedder == "clip" and not self.clip_weights:
            raise ValueError("embedder clip needs clip_weights (a local open_clip weights file or directory; weights "
                             "are never downloaded), or use embedder pixel")
        return self


class ManifestSpec(StrictModel):
    """What the prepared directory's manifest may tell the trainer (curation/disclosure.py)."""

    metadata: list[str] = Field(default_factory=list)  # dataset metadata columns kept for clean and protected rows


class Policy(StrictModel):
    version: Literal[1]
    name: str = Field(min_length=1)
    dataset: DatasetSpec
    rules: list[Rule] = Field(min_length=1)
    noise: NoiseSpec
    output: str  # prepared directory, relative to the policy file
    dedup: DedupSpec = DedupSpec()  # on unless `dedup: {enabled: false}`
    manifest: ManifestSpec = ManifestSpec()  # metadata columns the trainer's manifest keeps (default none)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
        names = [rule.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique, repeated: {', '.join(duplicates)}")
        return rules

    @model_validator(mode="after")
    def _duplicate_reserved(self) -> Policy:
        if self.dedup.enabled and any(rule.name == DUPLICATE_RULE for rule in self.rules):
            raise ValueError(f"rule name {DUPLICATE_RULE!r} is reserved for records demoted by dedup; rename the rule")
        return self


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with the file it came from (paths inside it resolve against that file). `sha256` is the
    file's; `overrides` are the dotted keys (`guard prepare --set`) applied to it before it was validated."""

    policy: Policy
    path: Path
    sha256: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        return (self.base_dir / relative).resolve()


def load_policy(path: Path, overrides: Mapping[str, Any] | None = None) -> LoadedPolicy:
    """Read and validate a policy file, with dotted `overrides` ({'noise.sigma': 0.8}) replacing its keys first;
    errors name the file, the key path and the problem."""
    data = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    policy = validate_mapping(Policy, data, source=str(path))
    digest = sha256_bytes(path.read_bytes())
    return LoadedPolicy(policy=policy, path=path.resolve(), sha256=digest, overrides=dict(overrides or {}))
