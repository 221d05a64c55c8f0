"""`guard verify --run DIR`: checks, from files alone, that a run saw only what the policy allowed.

1. consumed arrays: the arrays the run's ledger events say it read are exactly those of its prepared
   directory, and those still match the manifest and the card's sha256 (and the card's counts the manifest);
2. provenance: the ledger's prepare event wrote exactly this prepared directory, or (`--verify-key`) the
   data owner's signature of card.json verifies; a run trained with --allow-unrecorded fails it otherwise;
   with `--verify-key`, also a "signature" check;
3. noise: every protected record was noised with the policy's sigma; releases: no protected image was released
   before with other noise, or (ATTENTION) the sigma_eff of its draws is below the policy's sigma;
4. noise statistics: the protected pixels themselves are noisy at that sigma (prepared/noise_check.py), so arrays
   replaced by the originals and re-hashed fail;
5. no protected or excluded pixels in training: no clean array row has the digest of a protected or
   excluded record, nor (with dedup transforms) the canonical digest of one, recomputed from its pixels, and
   every clean row is the record the manifest says. The manifest's digests are keyed (curation/disclosure.py):
   with the owner's digest key (`--digest-key`) the check compares them, without it it is ATTENTION ("needs
   the owner's digest key"), never PASS;
6. opt-outs: every record an exclude rule matched is absent from all arrays;
7. duplicates: the exact part of dedup, from the manifest: no clean or protected row shares a canonical
   digest (the pixel digest where the manifest has none) with a row of a stricter partition, and no two
   protected rows share one: a rotated, flipped or inverted copy (the card's dedup transforms) is a copy;
8. audit: the latest audit of the run's samples exists and found no copy.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..contracts.events import Event, TrainSummary
from ..errors import GuardError, InputError
from ..hashing import canonical_sha256, digest_key_id, keyed_digest, sha256_file
from ..keys.digests import read_digest_key
from ..locations import project_of
from ..policy.model import DUPLICATE_RULE
from ..prepared.layout import CARD, MANIFEST, PreparedPaths
from ..prepared.manifest import ACTION_PARTITION
from ..prepared.relocate import prepared_of_run
from ..rundir import (
    AUDIT_SUMMARY,
    AUDIT_TABLE,
    MEMBERSHIP_PAGE,
    MEMBERSHIP_SCORES,
    MEMBERSHIP_SUMMARY,
    SAMPLES_INDEX,
    RunPaths,
)
from ..symmetry import GENERATORS, Variant, group
from .check import Check, inside, run_audits, trainings
from .evidence import evidence_paths
from .rows import clean_row_hashes as _clean_row_hashes
from .rows import manifest_rows as _manifest
from .views import RUN_AUDITS, connect

if TYPE_CHECKING:
    from ..prepared.reader import PreparedData


def _consumed_arrays(events: list[Event], run_dir: Path, project: Path) -> tuple[dict[str, str | None], set[str | None]] | None:
    """What the run's training events read: {array name in its prepared directory (the recorded path for an
    array outside it): sha256}, and the prepared fingerprints they recorded. Location-free: a moved project
    compares the same."""
    runs = trainings(events, run_dir, project)
    if not runs:
        return None
    consumed: dict[str, str | None] = {}
    fingerprints: set[str | None] = set()
    for event in runs:
        base = (event.located("inputs", "prepared", project) or [None])[0]
        fingerprints |= {a.sha256 for a in event.artifacts("inputs", "prepared")}
        for array, where in zip(event.artifacts("inputs", "array"), event.located("inputs", "array", project), strict=True):
            inside = base is not None and where is not None and where.is_relative_to(base)
            consumed[where.relative_to(base).as_posix() if inside and where and base else array.path] = array.sha256
    return consumed, fingerprints


def _open(data: Path) -> PreparedData | GuardError:
    """The verified prepared directory, or why it does not verify (opened once for all checks)."""
    from ..prepared.reader import open_prepared

    try:
        return open_prepared(data)
    except GuardError as err:
        return err


def check_consumed(events: list[Event], run_dir: Path, prepared: PreparedData | GuardError, project: Path) -> Check:
    consumed = _consumed_arrays(events, run_dir, project)
    if consumed is None:
        return Check("consumed arrays", False, "no finished training event for this run in the ledger")
    if isinstance(prepared, GuardError):
        return Check("consumed arrays", False, str(prepared))
    arrays, fingerprints = consumed
    if fingerprints != {prepared.fingerprint}:
        return Check("consumed arrays", False, f"the run's training events read prepared data of fingerprint(s) "
                     f"{sorted(str(v)[:16] for v in fingerprints)}, not {prepared.root}'s {prepared.fingerprint[:16]}")
    if arrays != prepared.files:
        differing = sorted(set(arrays.items()) ^ set(prepared.files.items()), key=str)
        return Check("consumed arrays", False, f"{len(differing)} array fingerprint(s) differ, e.g. {differing[0][0]}")
    where = "" if prepared.root.is_relative_to(project) else " (outside the project)"
    return Check("consumed arrays", True, f"{len(arrays)} array file(s) of {prepared.root}{where} match the ledger, "
                 "the card and the manifest")


def check_provenance(events: list[Event], ledger: Path, run_dir: Path, prepared: PreparedData | GuardError,
                     verify_key: Path | None) -> list[Check]:
    """The provenance check (and, with a key, the signature check) of the run's prepared directory."""
    from ..keys.signing import verify_card
    from ..prepared.reader import establish_provenance

    if isinstance(prepared, GuardError):
        return [Check("provenance", False, str(prepared))] + ([Check("signature", False, str(prepared))] if verify_key else [])
    checks, signer = [], None
    if verify_key is not None:
        try:
            signer = verify_card(prepared.root, verify_key)
            checks.append(Check("signature", True, f"card.json is signed by the key {verify_key} (sha256 {signer[:16]}…)"))
        except GuardError as err:
            checks.append(Check("signature", False, str(err)))
    event = establish_provenance(prepared, ledger, None).event_id
    unrecorded = any(isinstance(e.summary, TrainSummary) and e.summary.unrecorded_data
                     for e in trainings(events, run_dir, project_of(ledger)))
    if event is not None:
        detail = f"prepare event {event[:12]} of the ledger wrote this directory (fingerprint {prepared.fingerprint[:16]}…)"
        return [Check("provenance", True, detail), *checks]
    if signer is not None:
        detail = f"not prepared into this ledger, but signed by the data owner's key (sha256 {signer[:16]}…)"
        return [Check("provenance", True, detail), *checks]
    why = " (the run was trained with --allow-unrecorded)" if unrecorded else ""
    detail = (f"no prepare event in the ledger wrote {prepared.root} (fingerprint {prepared.fingerprint[:16]}…) "
              f"and no signature was verified (--verify-key){why}")
    return [Check("provenance", False, detail), *checks]


def check_noise_statistics(prepared: PreparedData | GuardError) -> Check:
    from ..prepared.reader import check_noise_statistics as statistics

    if isinstance(prepared, GuardError):
        return Check("noise statistics", False, str(prepared))
    stats = statistics(prepared)
    return Check("noise statistics", stats.passed, stats.detail(prepared.card.sigma))


def card_variants(card: Any) -> tuple[Variant, ...]:
    """The dedup transforms' group of the card (the identity alone for dedup off or a card without transforms)."""
    dedup = getattr(card, "dedup", None) or {}
    transforms = dedup.get("transforms") if dedup.get("enabled") else None
    return group(transforms if isinstance(transforms, list) and all(t in GENERATORS for t in transforms) else ())


def check_noise(prepared: PreparedData, rows: list[dict[str, Any]]) -> Check:
    card = prepared.card
    sigma = card.policy.noise.sigma
    wrong = [r["record_id"] for r in rows if r["partition"] == "protected" and r["sigma"] != sigma]
    if card.sigma != sigma or wrong:
        return Check("noise", False, f"{len(wrong)} protected record(s) not at the policy's sigma {sigma}, e.g. {wrong[:3]}")
    count = sum(r["partition"] == "protected" for r in rows)
    return Check("noise", True, f"all {count} protected records noised with sigma {sigma}")


def _clean_row_canonical(data: Path, rows: list[dict[str, Any]], variants: tuple[Variant, ...],
                         digest_key: bytes | None) -> dict[str, str]:
    """record_id → canonical digest of the pixels actually stored in its clean array row (keyed as `_clean_row_hashes`)."""
    arrays: dict[str, np.ndarray] = {}
    hashes = {}
    for row in rows:
        if row["partition"] == "clean":
            array = arrays.setdefault(row["file"], np.load(data / row["file"], mmap_mode="r"))
            sha = canonical_sha256(np.asarray(array[row["row"]:row["row"] + 1]), variants)[0]
            hashes[row["record_id"]] = keyed_digest(digest_key, sha) if digest_key is not None else sha
    return hashes


NEEDS_DIGEST_KEY = "needs the owner's digest key"


def check_clean_rows(data: Path, rows: list[dict[str, Any]], variants: tuple[Variant, ...] = (), keyed: bool = False,
                     digest_key: bytes | None = None, *, foreign_key: bool = False) -> Check:
    """No clean row holds a protected or excluded image (nor, with dedup transforms, a transformed copy of one), and
    each is the image its manifest digest names. The manifest's digests are keyed (curation/disclosure.py): without
    the owner's digest key they cannot be compared with the pixels, and the check is ATTENTION, not PASS."""
    if keyed and digest_key is None:
        clean = sum(r["partition"] == "clean" for r in rows)
        given = "the digest key given is another directory's (its key id differs from the card's digest_key_id); "
        return Check("no protected pixels", True, f"{given if foreign_key else ''}{NEEDS_DIGEST_KEY}: the manifest's "
                     "pixel digests are keyed, so the "
                     f"{clean} clean rows cannot be compared with the protected and excluded images without it "
                     "(the owner exports it with guard key export-digest; guard verify --digest-key FILE)",
                     attention=True)
    key = digest_key if keyed else None
    stored = _clean_row_hashes(data, rows, key)
    forbidden = {r["digest"]: r["record_id"] for r in rows if r["partition"] in ("protected", "excluded") and r["digest"]}
    leaks = [(rid, forbidden[h]) for rid, h in stored.items() if h in forbidden]
    if not leaks and len(variants) > 1:  # a transformed copy: by the canonical digest of the stored pixels
        forbidden = {r["canonical"]: r["record_id"] for r in rows
                     if r["partition"] in ("protected", "excluded") and r.get("canonical")}
        if forbidden:
            canonical = _clean_row_canonical(data, rows, variants, key)
            leaks = [(rid, forbidden[h]) for rid, h in canonical.items() if h in forbidden]
    if leaks:
        detail = f"clean row {leaks[0][0]} holds the pixels of {leaks[0][1]} ({len(leaks)} in all)"
        return Check("no protected pixels", False, detail)
    expected = {r["record_id"]: r["digest"] for r in rows if r["partition"] == "clean"}
    mismatched = [rid for rid, h in stored.items() if expected[rid] != h]
    if mismatched:
        also = " (or the digest key is not this directory's)" if keyed and len(mismatched) == len(stored) else ""
        detail = f"{len(mismatched)} clean row(s) differ from their manifest digest{also}, e.g. {mismatched[0]}"
        return Check("no protected pixels", False, detail)
    return Check("no protected pixels", True, f"{len(stored)} clean rows checked: none holds a protected or excluded image")


def check_opt_outs(prepared: PreparedData, rows: list[dict[str, Any]], keyed: bool = False,
                   digest_key: bytes | None = None) -> Check:
    data, card = prepared.root, prepared.card
    exclude_rules, holdout_rules = set(card.exclude_rules()), set(card.holdout_rules())
    excluded = [r for r in rows if r["rule"] in exclude_rules or r["rule"] in holdout_rules]  # neither is stored
    held = sum(r["rule"] in holdout_rules for r in excluded)
    placed = [r["record_id"] for r in excluded if r["partition"] != "excluded" or r["file"] is not None]
    pixels = not keyed or digest_key is not None  # the clean rows' pixels can be compared with the digests
    stored = set(_clean_row_hashes(data, rows, digest_key if keyed else None).values()) if pixels else set()
    in_arrays = [r["record_id"] for r in excluded if r["digest"] in stored]
    files_rows = sum(np.load(data / f, mmap_mode="r").shape[0] for f in card.files)
    listed = sum(r["file"] is not None for r in rows)
    if placed or in_arrays or files_rows != listed:
        why = placed[:1] or in_arrays[:1] or [f"{files_rows} array rows for {listed} placed records"]
        return Check("opt-outs", False, f"excluded record(s) found in the arrays: {why[0]}")
    how = "" if pixels else f" (placement and row counts; comparing their pixels with the clean rows {NEEDS_DIGEST_KEY})"
    also = f" (and {held} held-out record(s), not opt-outs)" if held else ""
    return Check("opt-outs", True, f"{len(excluded) - held} record(s) matched by exclude rules{also} are absent from "
                 f"all arrays{how}")


STRICTNESS = {"clean": 0, "protected": 1, "excluded": 2}


def _level(row: dict[str, Any], actions: dict[str, str]) -> int | None:
    """How strict the decision on `row` was: its partition's, except for a copy dedup demoted to excluded (rule
    `duplicate`), whose own rule's action (`dup_rule`) counts (an unknown or missing one counts as exclude)."""
    if row["partition"] == "excluded" and row["rule"] == DUPLICATE_RULE:
        if actions.get(row.get("dup_rule") or "") == "holdout":
            return None  # a held-out copy dedup dropped from the holdout: it decided nothing (curation/dedup.py)
        return STRICTNESS.get(ACTION_PARTITION.get(actions.get(row.get("dup_rule") or "", ""), "excluded"), 2)
    return STRICTNESS.get(row["partition"])


def _duplicate_problem(rows: list[dict[str, Any]], actions: dict[str, str], key: str) -> str | None:
    """What is wrong with the rows' duplicates by their `key` (digest or canonical: see `_manifest`), or None."""
    strictest: dict[str, tuple[int, str]] = {}
    protected: dict[str, str] = {}
    for row in rows:
        level, content = _level(row, actions), row.get(key)
        if level is None or not content:
            continue
        held = strictest.get(content)
        if held is None or level > held[0]:
            strictest[content] = (level, row["record_id"])
        if row["partition"] == "protected":
            if content in protected:
                return (f"protected rows {protected[content]} and {row['record_id']} hold the same image "
                        "(their noise averages down)")
            protected[content] = row["record_id"]
    names = {level: name for name, level in STRICTNESS.items()}
    for row in rows:
        level, content = STRICTNESS.get(row["partition"]), row.get(key)
        if level is None or level == STRICTNESS["excluded"] or not content:
            continue
        top, other = strictest[content]
        if top > level:
            what = "exact copy" if key == "digest" else "rotated, flipped or inverted exact copy"
            return f"{row['partition']} row {row['record_id']} is an {what} of {names[top]} record {other}"
    return None


def check_duplicates(card: Any, rows: list[dict[str, Any]]) -> Check:
    """No stored row is an exact copy of a row decided more strictly, and no content is stored protected twice
    (curation/dedup.py), by the pixel sha256 and by the canonical sha256 (the same for all variants of an image
    under the dedup transforms). Checked whatever the card says of dedup: a copy that leaks, leaks."""
    actions = {rule.name: rule.action for rule in card.policy.rules}
    for key in ("digest", "canonical"):
        problem = _duplicate_problem(rows, actions, key)
        if problem:
            return Check("duplicates", False, problem)
    dedup = getattr(card, "dedup", None) or {}
    setting = (f"dedup on (near: {dedup.get('embedder')} >= {dedup.get('threshold')}, {transforms_words(dedup)}; "
               f"{dedup.get('demoted', 0)} record(s) demoted)" if dedup.get("enabled") else "dedup off in the policy")
    return Check("duplicates", True, f"no stored row is an exact copy of a stricter one; {setting}")


def check_releases(card: Any) -> Check:
    """The owner's release register (curation/register.py), as the card records it: protected images released
    before with other noise can be averaged; ATTENTION when their sigma_eff is below the policy's sigma."""
    found = getattr(card, "rerelease", None)
    if found is None:
        return Check("releases", True, "no protected image was released before with other noise (the owner's "
                                       "release register, exact pixel match)")
    detail = (f"{found.images} protected image(s) were released before with other noise (prepare(s) "
              f"{', '.join(e[:12] for e in found.earlier)}; --allow-rerelease): averaged over their distinct draws, "
              f"sigma_eff = {found.min_sigma_eff:.3g}")
    if found.min_sigma_eff < card.sigma:
        return Check("releases", True, f"{detail} < the policy's sigma {card.sigma:g}", attention=True)
    return Check("releases", True, detail)


def transforms_words(dedup: dict[str, Any]) -> str:
    """The card's dedup transforms in words (cards before them said `mirror`)."""
    if "transforms" in dedup:
        names = dedup.get("transforms") or []
        return f"transforms {', '.join(map(str, names))}" if names else "no transforms"
    return f"mirror {'on' if dedup.get('mirror') else 'off'}"


def _event_name(event: Event) -> str:
    where = Path(event.file).name if event.file else "?"
    return f"{event.kind} event {event.event_id[:12]} ({event.kind}/{where})"


def _artifact_file(event: Event, role: str, project: Path) -> tuple[Path | None, str | None]:
    """The event's output `role`: where it is now, and why it cannot be read as the one the event recorded."""

    artifacts = event.artifacts("outputs", role)
    if not artifacts:
        return None, f"{_event_name(event)} records no {role}"
    where = event.located("outputs", role, project)[0]
    if where is None or not where.is_file():
        return None, f"{role} of {_event_name(event)} is missing ({artifacts[0].path})"
    if sha256_file(where) != artifacts[0].sha256:
        return None, f"{where} is not the {role} {_event_name(event)} recorded (its sha256 differs)"
    return where, None


def audit_files(event: Event, project: Path) -> tuple[Any, dict[str, int] | None, list[str]]:
    """The audit event's summary.json (an AuditSummary) and the verdict counts of its samples.parquet, both read
    from the files whose sha256 the event holds; and what is wrong (each naming the event, the field and the file)."""
    import pyarrow.parquet as pq

    from ..contracts.audit_summary import read_audit_summary

    problems: list[str] = []
    summary_path, why = _artifact_file(event, AUDIT_SUMMARY, project)
    summary = None
    if why:
        problems.append(why)
    elif summary_path is not None:
        try:
            summary = read_audit_summary(summary_path.parent)
        except GuardError as err:
            problems.append(str(err))
    table_path, why = _artifact_file(event, AUDIT_TABLE, project)
    counted = None
    if why:
        problems.append(why)
    elif table_path is not None:
        verdicts = pq.read_table(table_path, columns=["verdict"]).column("verdict").to_pylist()
        counted = {v: verdicts.count(v) for v in ("copy", "suspect", "novel")} | {"error": verdicts.count(None)}
    s: Any = event.summary
    if summary is not None and event.status == "ok":
        for key in sorted(set(s.counts) | set(summary.counts)):
            if s.counts.get(key) != summary.counts.get(key):
                problems.append(f"{_event_name(event)}: summary.counts.{key} is {s.counts.get(key)}, but {summary_path} "
                                f"says {summary.counts.get(key)}")
        pairs = (("flagged.count", s.flagged.count, summary.flagged.count), ("flagged.of", s.flagged.of, summary.flagged.of),
                 ("thresholds.copy", s.thresholds.copy_, summary.thresholds.copy_),
                 ("thresholds.suspect", s.thresholds.suspect, summary.thresholds.suspect),
                 ("thresholds.method", s.thresholds.method, summary.thresholds.method),
                 ("references", s.references, summary.references))
        problems += [f"{_event_name(event)}: summary.{field} is {mine}, but {summary_path} says {theirs}"
                     for field, mine, theirs in pairs if mine != theirs]
    if summary is not None and counted is not None:
        problems += [f"{summary_path}: counts.{key} is {summary.counts.get(key, 0)}, but {table_path} holds {n} "
                     f"{key} verdict(s)" for key, n in counted.items() if summary.counts.get(key, 0) != n]
    return summary, counted, problems


def check_counts(events: list[Event], run_dir: Path, project: Path, prepared: PreparedData | GuardError,
                 rows: list[dict[str, Any]] | None) -> Check:
    """Every count the run's events copy is the count of the artifact whose hash they hold: the prepare event's
    counts (the manifest, card.json), the training's data (run.json), the sampling's (samples.json) and the
    audits' (summary.json, samples.parquet). A mismatch names the event, the field and the file."""

    from ..contracts.run_record import read_run_record

    problems: list[str] = []
    compared = 0
    if not isinstance(prepared, GuardError) and rows is not None:
        manifest = prepared.root / MANIFEST
        partitions, rules = Counter(r["partition"] for r in rows), Counter(r["rule"] for r in rows if r["rule"])
        for event in events:
            if event.kind != "prepare" or event.status != "ok" or prepared.fingerprint not in {
                    a.sha256 for a in event.artifacts("outputs", "prepared")}:
                continue
            s: Any = event.summary
            compared += 1
            problems += [f"{_event_name(event)}: summary.counts.{k} is {s.counts.get(k, 0)}, but {manifest} holds "
                         f"{partitions.get(k, 0)}" for k in sorted(set(s.counts) | set(partitions))
                         if s.counts.get(k, 0) != partitions.get(k, 0)]
            problems += [f"{_event_name(event)}: summary.rule_counts.{k} is {s.rule_counts.get(k, 0)}, but {manifest} "
                         f"holds {rules.get(k, 0)}" for k in sorted(set(s.rule_counts) | set(rules))
                         if s.rule_counts.get(k, 0) != rules.get(k, 0)]
            card = prepared.card
            problems += [f"{_event_name(event)}: summary.{field} is {mine}, but {PreparedPaths(prepared.root).card} says {theirs}"
                         for field, mine, theirs in (("sigma", s.sigma, card.sigma),
                                                     ("policy_name", s.policy_name, card.policy_name),
                                                     ("resolution", s.resolution, card.resolution)) if mine != theirs]
    record = read_run_record(run_dir)
    for event in trainings(events, run_dir, project):
        compared += 1
        recorded = {a.sha256 for a in event.artifacts("inputs", "prepared")}
        if recorded != {record.data_fingerprint}:
            problems.append(f"{_event_name(event)}: inputs.prepared fingerprint {sorted(map(str, recorded))[0][:16]}…, but "
                            f"{RunPaths(run_dir).record} says {record.data_fingerprint[:16]}…")
    for event in events:
        if event.kind != "sample" or event.status != "ok" or not any(
                inside(w, run_dir) for w in event.located("inputs", "weights", project)):
            continue
        for folder in event.located("outputs", "samples", project):
            marker = folder / SAMPLES_INDEX if folder is not None else None
            if marker is None or not marker.is_file():
                continue
            try:
                images = json.loads(marker.read_text()).get("images")
            except (OSError, ValueError, AttributeError):
                images = None
            compared += 1
            count = getattr(event.summary, "count", None)
            if isinstance(images, list) and count != len(images):
                problems.append(f"{_event_name(event)}: summary.count is {count}, but {marker} lists {len(images)} images")
    for event in run_audits(events, run_dir, project):
        if event.status == "ok":
            compared += 1
            problems += audit_files(event, project)[2]
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
        return Check("ledger counts", False, problems[0] + more)
    return Check("ledger counts", True, f"the counts of {compared} event(s) of this run match the files whose sha256 they "
                 "hold (manifest, card.json, run.json, samples.json, summary.json, samples.parquet)")


def check_audit(events: list[Event], run_dir: Path, project: Path) -> Check:
    """The latest audit of the run's samples found no copy, by its summary.json (the file whose sha256 the audit
    event holds) and the verdicts of its samples.parquet, never by the counts copied into the event."""
    audits = sorted(run_audits(events, run_dir, project), key=lambda e: e.started_at)
    if not audits:
        return Check("audit", False, "no audit of this run's samples in the ledger")
    event = audits[-1]
    started = event.started_at
    if event.status != "ok":
        return Check("audit", False, f"the latest audit ({started:%Y-%m-%d %H:%M}) did not finish")
    summary, counted, problems = audit_files(event, project)
    if summary is None or counted is None:
        return Check("audit", False, f"the latest audit's report cannot be read as recorded: {problems[0]}")
    copies = max(summary.copy_count, counted["copy"])
    samples = summary.samples
    if copies:
        return Check("audit", False, f"the latest audit of {samples} found {copies} copy(ies) (summary.json, samples.parquet)")
    return Check("audit", True, f"the latest audit of {samples} ({started:%Y-%m-%d %H:%M}) found no copy "
                 "(summary.json, samples.parquet)")


def check_membership(events: list[Event], run_dir: Path, project: Path) -> list[Check]:
    """The latest membership test of the run's weights (guard membership), if there is one: every number of its
    membership.json recomputed from membership.parquet, both files as the event's sha256 say. Its verdict is the
    compliance report's to weigh (ATTENTION), not a failed check; no test at all adds no check."""
    from ..auditing.model_audit import recompute

    tests = sorted((e for e in events if e.kind == "membership"
                    and any(p is not None and inside(p, run_dir) for p in e.located("inputs", "weights", project))),
                   key=lambda e: e.started_at)
    if not tests:
        return []
    event = tests[-1]
    if event.status != "ok":
        return [Check("membership", False, f"the latest membership test ({event.started_at:%Y-%m-%d %H:%M}) did not finish")]
    summary = next(iter(event.located("outputs", MEMBERSHIP_SUMMARY, project)), None)
    recorded_sha = next((a.sha256 for a in event.artifacts("outputs", MEMBERSHIP_SUMMARY)), None)
    if summary is None or not summary.is_file():
        return [Check("membership", False, f"the latest membership test's {MEMBERSHIP_SUMMARY} is not where the ledger says")]
    if sha256_file(summary) != recorded_sha:
        return [Check("membership", False, f"{summary}: its sha256 is not the one the ledger's membership event holds")]
    try:
        problems = recompute(summary.parent)
    except GuardError as err:
        problems = [str(err)]
    files = (summary, summary.parent / MEMBERSHIP_SCORES, summary.parent / MEMBERSHIP_PAGE)
    if problems:
        return [Check("membership", False, problems[0], evidence=files)]
    verdict = json.loads(summary.read_text()).get("verdict")
    return [Check("membership", True, f"the latest membership test ({verdict}) recomputes from its membership.parquet: "
                  "every AUC, TPR and interval", evidence=files)]


def _with_evidence(paths: Callable[[str], tuple[Path, ...]]) -> Callable[[list[Check]], list[Check]]:
    """Name on each check the files it read (compliance/evidence.py), unless the check named them itself."""
    return lambda checks: [replace(check, evidence=check.evidence or paths(check.name)) for check in checks]


def _audit_folder(con: Any, run_dir: Path) -> Path | None:
    """The folder of the latest audit's summary.json of the run (the audit check's evidence), if recorded."""
    rows = con.execute(f"SELECT summary_file FROM audits WHERE {RUN_AUDITS} ORDER BY started_at DESC LIMIT 1",
                       [str(run_dir), str(run_dir)]).fetchall()
    return Path(rows[0][0]).parent if rows and rows[0][0] and Path(rows[0][0]).is_absolute() else None


def _originals(prepared: Path, data_root: Path | None) -> Any:
    """The protected originals of `prepared`, read from the source dataset (hash-verified), chunk by chunk, as
    (record ids, pixels); None when the source dataset is not readable here (a verifier without the owner's data)."""
    from ..auditing.originals import iter_protected, read_prepared, source_spec

    try:
        info = read_prepared(prepared)
        spec = source_spec(info, data_root)
    except GuardError:
        return None
    if spec.root is not None and not Path(spec.root).exists() and info.card.format != "digits":
        return None

    def chunks() -> Any:
        chunk = 1024
        for start, pixels in zip(range(0, len(info.protected_ids), chunk), iter_protected(info, data_root, chunk=chunk),
                                 strict=True):
            yield info.protected_ids[start : start + chunk], pixels

    return chunks


def verify_run(run_dir: Path, ledger: Path, *, verify_key: Path | None = None, data: Path | None = None,
               digest_key: Path | bytes | None = None, ledger_keys: list[Path] | None = None,
               data_root: Path | None = None) -> list[Check]:
    """Every check of the run in `run_dir` against `ledger`. Its prepared directory is `data` (--data), else
    run.json's (`relocate.prepared_of_run`: relative to the run, or found by its fingerprint in the project).
    `digest_key` (a file from guard key export-digest, or the subkey itself) lets the pixel checks compare the keyed
    digests. `data_root` (the owner's source dataset, else the root card.json records, when readable) lets the
    lineage check search the ancestors' clean images for near copies of protected originals. `ledger_keys`
    (--ledger-key): the public keys whose signatures of the ledger's heads are trusted."""
    from ..contracts.events import read_events
    from ..contracts.run_record import read_run_record
    from .tamper import ledger_checks

    run_dir = run_dir.resolve()
    if not RunPaths(run_dir).record.is_file():
        raise InputError(f"{run_dir}: not a run directory (no run.json)", hint="--run takes a directory written by guard train")
    key = read_digest_key(digest_key) if isinstance(digest_key, Path) else digest_key
    from ..keys.signing import load_public_key

    for path in [*([verify_key] if verify_key is not None else []), *(ledger_keys or [])]:
        load_public_key(path)  # a key file that cannot be read is bad input (exit 2), not a failed check
    record, project = read_run_record(run_dir), project_of(ledger)
    events = read_events(ledger)
    folder = prepared_of_run(run_dir, record.data, record.data_fingerprint, project, data)
    con = connect(ledger, events)  # an empty ledger is an input error
    prepared = _open(folder)
    evidence = _with_evidence(evidence_paths(run_dir=run_dir, prepared=folder, ledger=ledger, audit=_audit_folder(con, run_dir)))
    card = None if isinstance(prepared, GuardError) else (prepared.root / CARD, prepared.card)
    checks = [*ledger_checks(ledger, events, run_dir, ledger_keys or [], card),
              check_consumed(events, run_dir, prepared, project),
              *check_provenance(events, ledger, run_dir, prepared, verify_key)]
    from .lineage import check_lineage

    if isinstance(prepared, GuardError):  # its files are not what the card says: read nothing it names
        skipped = [Check(name, False, f"the prepared directory does not verify: {prepared}")
                   for name in ("noise", "noise statistics", "releases", "no protected pixels", "opt-outs", "duplicates")]
        return evidence([*checks, *skipped, check_counts(events, run_dir, project, prepared, None),
                         check_audit(events, run_dir, project), *check_membership(events, run_dir, project),
                         *check_lineage(record, None, False, None, events, ledger, project, verify=_verify_parent,
                                        run=run_dir)])
    rows, keyed = _manifest(prepared.root)
    foreign = key is not None and prepared.card.digest_key_id not in (None, digest_key_id(key))
    key = None if foreign else key  # another directory's digest key: the pixel checks say so (ATTENTION)
    return evidence([*checks, check_noise(prepared, rows), check_noise_statistics(prepared), check_releases(prepared.card),
                     check_clean_rows(prepared.root, rows, card_variants(prepared.card), keyed, key, foreign_key=foreign),
                     check_opt_outs(prepared, rows, keyed, key), check_duplicates(prepared.card, rows),
                     check_counts(events, run_dir, project, prepared, rows), check_audit(events, run_dir, project),
                     *check_membership(events, run_dir, project),
                     *check_lineage(record, rows, keyed, key, events, ledger, project,
                                    frozenset(prepared.card.holdout_rules()),
                                    _originals(prepared.root, data_root) if record.lineage else None, _verify_parent,
                                    run_dir)])


def _verify_parent(run: Path, ledger: Path, digest_key: bytes | None) -> list[Check]:
    return verify_run(run, ledger, digest_key=digest_key)
