"""What a prepared directory is made of, in words and counts, for the datasheet and the Hugging Face cards:
records per partition and licence, and the exclude rules split into opt-outs and records held out (for the
audit's calibration). Counts, licences, rule names and hashes only: nothing that helps rebuild an original."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..keys.owner import lineage_path
from ..prepared.card import Card, CardRule
from ..prepared.layout import CARD, MANIFEST
from .markdown import code, text

NO_LICENCE = "NOASSERTION"  # SPDX: no licence information for the record


def licence_counts(data: Path) -> Counter[tuple[str, str]] | None:
    """{(partition, SPDX licence): records} from the manifest, or the owner's lineage (keys/owner.py) when the policy
    kept `license` out of the manifest; None when neither has a `license` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..prepared.card import read_card

    manifest = data / MANIFEST
    try:
        if "license" not in pq.read_schema(manifest).names:  # not allow-listed: the owner's lineage has it
            lineage = lineage_path(read_card(data).fingerprint) if (data / CARD).is_file() else None
            if lineage is None or not lineage.is_file() or "license" not in pq.read_schema(lineage).names:
                return None
            manifest = lineage
        rows = pq.read_table(manifest, columns=["partition", "license"]).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{manifest}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return Counter((r["partition"], r["license"] or NO_LICENCE) for r in rows)


def trained_licences(counts: Counter[tuple[str, str]] | None) -> list[str]:
    """The licences of the records a model trains on (clean and protected), most records first."""
    if counts is None:
        return []
    per: Counter[str] = Counter()
    for (partition, licence), n in counts.items():
        if partition in ("clean", "protected"):
            per[licence] += n
    return [licence for licence, _ in per.most_common()]


def rule_words(rule: CardRule, *, cell: bool = False) -> str:
    """What a rule matches, in Markdown (its `where` clause as code, its sample as a fraction or count); `cell`:
    for a table cell."""
    where = f"records where {code(rule.where, cell=cell)}" if rule.where else "every record"
    sample = rule.sample or {}
    if sample.get("fraction") is not None:
        kept = f"a random {100 * float(sample['fraction']):g} %"
    elif sample.get("count") is not None:
        kept = f"a random {text(int(sample['count']))}"
    else:
        return where
    group = f" (whole groups by {code(sample['by'], cell=cell)})" if sample.get("by") else ""
    return f"{kept} of {where}{group}, seed {text(sample.get('seed', 0))}"


@dataclass(frozen=True)
class Exclusions:
    """The exclude rules of a card with their record counts: opt-outs (and other exclusions a person asked for)
    apart from the records held out to calibrate the audit."""

    opt_outs: dict[str, int]
    held_out: dict[str, int]

    @property
    def opted_out(self) -> int:
        return sum(self.opt_outs.values())


def exclusions(card: Card, holdout_rules: list[str]) -> Exclusions:
    """Held out: a holdout rule, or (policies from before `action: holdout`) an exclude rule the audit named in
    `calibration.holdout_rules`, or one that takes a random
    sample of every record (no `where`: it cannot be anyone's opt-out). Every other exclude rule is an opt-out."""
    opt_outs: dict[str, int] = {}
    held: dict[str, int] = {}
    for rule in card.policy.rules:
        if rule.action == "holdout":  # action holdout: never an opt-out
            held[rule.name] = card.rule_counts.get(rule.name, 0)
        if rule.action != "exclude":
            continue
        random_sample = rule.where is None and rule.sample is not None
        (held if rule.name in holdout_rules or random_sample else opt_outs)[rule.name] = card.rule_counts.get(rule.name, 0)
    return Exclusions(opt_outs, held)


def holdout_rules_of(audit_config: dict[str, Any] | None) -> list[str]:
    """`calibration.holdout_rules` of an audit's resolved config (summary.json `config`), or none."""
    calibration = (audit_config or {}).get("calibration") or {}
    rules = calibration.get("holdout_rules") or []
    return [str(r) for r in rules] if isinstance(rules, list) else []


def demoted(card: Card) -> int:
    return int((card.dedup or {}).get("demoted", 0) or 0)


def source_words(card: Card) -> str:
    """Where the data came from, in Markdown: the dataset's format and split, a built-in dataset said as such."""
    if card.root is None:
        return f"the built-in {code(card.format)} dataset (shipped with the tool), split {code(card.split)}"
    return f"a {code(card.format)} dataset, split {code(card.split)}"
