"""Curation policies: which records are clean, protected (noised) or excluded.

The YAML schema is a contract (see docs/policy.md): version, name, dataset, rules, noise, output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .config import StrictModel, load_config
from .datasets.base import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from .hashing import sha256_bytes

Action = Literal["exclude", "clean", "protect"]


class DatasetSpec(StrictModel):
    format: Literal["celeba", "cifar10", "imagefolder", "digits"]  # on-disk layout of the source dataset
    root: str | None = None  # relative to the policy file; not needed for digits
    split: str = "all"  # format-specific split name, or all
    resolution: int = Field(gt=0, le=4096)  # output images are resolution × resolution
    # An image whose header declares more pixels (width × height) is an error row, never decoded.
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, le=1_000_000_000)
    # A source file larger than this is an error row (image) or an exit-2 error (list, batch), never read.
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, gt=0, le=16 * 2**30)

    @model_validator(mode="after")
    def _root_needed(self) -> DatasetSpec:
        if self.format != "digits" and not self.root:
            raise ValueError(f"format {self.format!r} needs dataset.root")
        return self


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
    action: Action  # exclude | clean | protect
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


class Policy(StrictModel):
    version: Literal[1]
    name: str = Field(min_length=1)
    dataset: DatasetSpec
    rules: list[Rule] = Field(min_length=1)
    noise: NoiseSpec
    output: str  # prepared directory, relative to the policy file

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
        names = [rule.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique, repeated: {', '.join(duplicates)}")
        return rules


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with the file it came from (paths inside it resolve against that file)."""

    policy: Policy
    path: Path
    sha256: str

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        return (self.base_dir / relative).resolve()


def load_policy(path: Path) -> LoadedPolicy:
    """Read and validate a policy file; errors name the file, the key path and the problem."""
    policy = load_config(Policy, path)
    digest = sha256_bytes(path.read_bytes())
    return LoadedPolicy(policy=policy, path=path.resolve(), sha256=digest)
