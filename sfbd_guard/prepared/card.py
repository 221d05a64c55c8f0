"""card.json, the prepared directory's card: what `guard prepare` did, its counts, and the sha256 of every file.

`read_card` is the only reader and `write_card` the only writer. The card's bytes are signed (keys/signing.py)
and compared by tests: `write_card` writes exactly the keys of the card it is given, sorted, indented.

`root` (the source dataset) and `policy_path` are relative to the card's own folder (the prepared directory)
when they and the prepared directory lie inside the folder `guard prepare` ran in (the project), else
absolute (and absolute in cards written before; locations.py): `Card.source_root` and `Card.policy_file`
resolve them. A moved project keeps its relative paths; a dataset kept elsewhere keeps its absolute root.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ..contracts.base import Contract, dump, load_json, read_contract, validate, write_contract
from ..contracts.run_record import LedgerHead
from ..errors import GuardError, InputError
from ..locations import store
from .layout import CARD

PARTITIONS = ("clean", "protected", "excluded", "error")


class CardRule(Contract):
    """One rule of the policy recorded in the card (the rest of its keys are kept as they are)."""

    name: str
    action: str
    where: str | None = None
    sample: dict[str, Any] | None = None


class CardNoise(Contract):
    sigma: float


class CardPolicy(Contract):
    """The policy as `guard prepare` applied it (policy/model.py's `Policy`, dumped); auditing/originals.py re-validates it
    as a `Policy` where it needs its rules to select records."""

    rules: list[CardRule]
    noise: CardNoise


class CardListing(Contract):
    """How an image folder's metadata file(s) met its images (absent for other formats and without metadata)."""

    metadata_files: list[str]  # relative to the dataset root
    metadata_rows: int = Field(ge=0)  # rows of the selected split
    images_without_row: int = Field(ge=0)  # images that got null metadata
    rows_without_image: int = Field(ge=0)  # error rows: a file_name naming no image, unusable or unreadable
    unreadable_rows: int = Field(ge=0)  # of those, rows of which nothing could be read


class CardIdentity(Contract):
    """The keys that make a card.json a card of this tool, of any version: what `--overwrite` checks (tolerant
    mode: a directory prepared by any version, even one this version refuses to train on, may be replaced)."""

    fingerprint: str
    files: dict[str, str]
    tool_version: str
    policy_sha256: str


class Rerelease(Contract):
    """Images this prepare released again with other noise than an earlier release (curation/register.py)."""

    allowed: bool  # --allow-rerelease was given (without it the prepare stops)
    images: int
    earlier: list[str]  # the earlier prepares' ledger event ids
    min_sigma_eff: float  # the smallest (sum sigma_i^-2)^(-1/2) over such an image's distinct draws
    sigma_eff_images: dict[str, int] = Field(default_factory=dict)  # sigma_eff (3 significant digits) -> images
    near: int = 0  # of `images`, those matched only as near copies of a released image (dedup's embedding)


class Card(CardIdentity):
    """card.json (written by curation/prepare.py `_card`)."""

    policy_name: str
    policy_path: str
    policy: CardPolicy
    format: str
    root: str | None
    split: str
    resolution: int = Field(gt=0, le=4096)
    channels: Literal[1, 3]
    color: str
    sigma: float = Field(gt=0)
    noise_generator: str | None = None  # absent in cards made before the noise was keyed
    noise_key_id: str | None = None  # absent in cards made before the noise was keyed
    noise_key_source: str | None = None  # absent in cards made before the noise was keyed
    digest_key_id: str | None = None  # names the digest subkey of the manifest's keyed digests (hashing.digest_key_id)
    noise_seed: int | None = None  # only in cards made before the noise was keyed: their noise is invertible
    counts: dict[str, int]
    rule_counts: dict[str, int]
    # records held out (action holdout; counted in `excluded` too): never stored, kept for the audit's calibration
    holdout: int | None = None  # absent in cards made before the holdout action
    manifest_sha256: str
    shard_records: int
    created_at: str
    dedup: dict[str, Any] | None = None  # absent in cards made before dedup; {"enabled": false} when turned off
    rerelease: Rerelease | None = None  # images released before with other noise (prepare --allow-rerelease)
    ledger_head: LedgerHead | None = None  # the ledger's head when prepare began (absent before the hash chain)
    listing: CardListing | None = None  # image folders with a metadata file (absent otherwise, and in older cards)
    # guard prepare --set KEY=VALUE pairs, applied to the policy file (policy_sha256) before it was validated: `policy`
    # is the policy as applied, with them (absent without --set, and in older cards)
    policy_overrides: dict[str, Any] | None = None

    @field_validator("counts")
    @classmethod
    def _every_partition(cls, counts: dict[str, int]) -> dict[str, int]:
        missing = [p for p in PARTITIONS if p not in counts]
        if missing:
            raise ValueError(f"no count for the partition {missing[0]!r}")
        return counts

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.resolution, self.resolution

    @property
    def invertible_noise(self) -> bool:
        """Made before the noise was keyed by a secret: its noise can be regenerated from public values."""
        return "noise_seed" in self.model_fields_set or self.noise_key_id is None

    def source_root(self, folder: Path) -> Path | None:
        """The source dataset's root, for the card in `folder`: `root` resolved against it (None: built-in data)."""
        return None if self.root is None else (folder / self.root).resolve()

    def policy_file(self, folder: Path) -> Path | None:
        """The policy file `guard prepare` applied, for the card in `folder` (None if the card names none)."""
        return (folder / self.policy_path).resolve() if self.policy_path else None

    def exclude_rules(self) -> list[str]:
        return [rule.name for rule in self.policy.rules if rule.action == "exclude"]

    def holdout_rules(self) -> list[str]:
        return [rule.name for rule in self.policy.rules if rule.action == "holdout"]


def card_path(path: Path, folder: Path) -> str:
    """How card.json in `folder` stores `path`: relative to `folder` when both lie inside the working directory
    (the project `guard prepare` runs in), else absolute (locations.py)."""

    return store(path, folder, project=Path.cwd())


def read_card(folder: Path, *, error: type[GuardError] = InputError, hint: str | None = None) -> Card:
    """folder/card.json as a `Card`; a missing, unreadable or invalid card is `error` naming the file and key."""
    return read_contract(Card, folder / CARD, error=error, hint=hint)


def card_from_dict(payload: dict[str, Any]) -> Card:
    """A card being written (a bug, not an input error, if it does not fit the contract)."""
    card = Card.model_validate(payload)
    if dump(card) != payload:  # pragma: no cover (the writer must write what it was given)
        raise ValueError("card.json would not round-trip through the Card contract")
    return card


def write_card(folder: Path, card: Card) -> None:
    """Write folder/card.json (the bytes keys/signing.py signs)."""
    write_contract(folder / CARD, card)


def card_problem(folder: Path) -> str | None:
    """Why folder/card.json is not a card of this tool (tolerant: `CardIdentity` only), or None if it is one."""

    path = folder / CARD
    try:
        info = path.lstat()
    except FileNotFoundError:
        return "it has no card.json"
    if not stat.S_ISREG(info.st_mode):  # a symlink, a FIFO or a folder is never read
        return "its card.json is not a card"
    try:
        payload = load_json(path)
    except GuardError as err:
        return f"its card.json does not parse ({str(err).removeprefix(f'{path}: ')})"
    try:
        validate(CardIdentity, payload, source=CARD)
    except GuardError as err:
        return f"its {err}"
    return None
