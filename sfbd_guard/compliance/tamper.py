"""Tamper evidence of the ledger: the hash chain of its events, HEAD.json, the heads that run.json and summary.json
recorded when they were written, and the Ed25519 signatures of heads (ledger.py writes all of them).

`check_chain` names an edited, removed, inserted or reordered event. What the chain alone cannot detect is said
in its words: someone who rewrites every event after the one they edited (and HEAD.json), or who drops the
newest events and HEAD.json with them, leaves a consistent chain. A head recorded in run.json or summary.json
after that point, or a head signed with a key the reviewer trusts (`guard verify --ledger-key`), catches both.
Events written before the chain existed (no `seq`) are ATTENTION: nothing shows they were not edited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contracts.events import Event
from ..errors import GuardError
from ..fileio import read_regular
from ..hashing import sha256_bytes, sha256_file
from ..ledger import HEAD_FILE, SIGNATURES, SMALL_FILE, Head, head_message
from ..locations import project_of
from ..rundir import AUDIT_SUMMARY, RunPaths
from .check import Check, run_audits

CHAIN = "ledger chain"
SIGNED = "ledger signatures"


@dataclass(frozen=True)
class Anchor:
    """A ledger head recorded outside the ledger (run.json, summary.json) when that file was written."""

    source: str
    head: Head


def name(event: Event) -> str:
    """An event as verify names it: position, kind, id and file."""
    where = Path(event.file).name if event.file else "?"
    return f"event #{event.seq} ({event.kind} {event.event_id[:12]}, {event.kind}/{where})"


def _legacy_name(event: Event) -> str:
    return f"{event.kind} event {event.event_id[:12]} ({event.kind}/{Path(event.file or '?').name})"


def _links(chained: list[Event], hashes: dict[str, str]) -> list[str]:
    """What is wrong with the links of the chained events (sorted by seq), each naming the event."""
    problems: list[str] = []
    by_seq: dict[int, list[Event]] = {}
    for event in chained:
        by_seq.setdefault(int(event.seq or 0), []).append(event)
    by_hash = {hashes[e.event_id]: e for e in chained}
    top = max(by_seq)
    for seq in range(1, top + 1):
        here = by_seq.get(seq, [])
        after = by_seq.get(seq + 1, [])
        if not here:
            nxt = after[0] if after else None
            problems.append(f"event #{seq} was removed: the chain jumps from #{seq - 1} to "
                            f"{name(nxt) if nxt else 'a later event'}")
            continue
        if len(here) > 1:
            named = {e.prev_sha256 for e in after}
            inserted = [e for e in here if hashes[e.event_id] not in named] or here[1:]
            problems += [f"{name(e)} was inserted: another event already holds position #{seq}" for e in inserted]
            continue
        event = here[0]
        expected = "" if seq == 1 else None
        previous = by_seq.get(seq - 1, [])
        if expected is None and len(previous) == 1:
            expected = hashes[previous[0].event_id]
        if expected is None or event.prev_sha256 == expected:
            continue
        other = by_hash.get(event.prev_sha256 or "")
        if other is not None and other.seq != seq - 1:
            problems.append(f"{name(event)} was reordered: it follows {name(other)} in the chain, not #{seq - 1}")
        elif seq == 1:
            problems.append(f"{name(event)} was edited: the first event of the chain names a predecessor")
        else:
            problems.append(f"{name(previous[0])} was edited, replaced or reordered: its file's sha256 is "
                            f"{expected[:16]}…, but {name(event)} recorded {str(event.prev_sha256)[:16]}…")
    return problems


def _head_file(ledger: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(read_regular(ledger / HEAD_FILE, SMALL_FILE)[:SMALL_FILE])
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def check_chain(ledger: Path, events: list[Event], anchors: list[Anchor] = ()) -> Check:  # type: ignore[assignment]
    """The hash chain of `events` (all of the ledger's, each with its file), HEAD.json and `anchors`."""
    chained = [e for e in events if e.seq is not None]
    legacy = [e for e in events if e.seq is None]
    hashes = {e.event_id: sha256_file(Path(e.file)) for e in chained if e.file}
    problems = _links(sorted(chained, key=lambda e: int(e.seq or 0)), hashes) if chained else []
    by_seq = {int(e.seq or 0): e for e in chained}
    newest = max(by_seq) if by_seq else 0
    if chained:
        first = min(e.finished_at for e in chained)
        problems += [f"{_legacy_name(e)} was inserted: it has no place in the chain (no seq) but was written after "
                     "the chain began" for e in legacy if e.finished_at > first]
    head = _head_file(ledger)
    if head is not None and chained:
        seq, sha = head.get("seq"), head.get("sha256")
        if isinstance(seq, int) and seq > newest:
            problems.append(f"the newest event(s) #{newest + 1}…#{seq} were removed: {HEAD_FILE} names #{seq}, "
                            f"the ledger ends at #{newest}")
        elif isinstance(seq, int) and seq in by_seq and hashes.get(by_seq[seq].event_id) != sha:
            problems.append(f"{name(by_seq[seq])} was edited: {HEAD_FILE} records its sha256 as {str(sha)[:16]}…")
    for anchor in anchors:
        at = by_seq.get(anchor.head.seq)
        if anchor.head.seq > newest:
            problems.append(f"{anchor.source} was written when the ledger's head was #{anchor.head.seq}, but the ledger "
                            f"ends at #{newest}: event(s) #{newest + 1}…#{anchor.head.seq} were removed")
        elif at is not None and hashes.get(at.event_id) != anchor.head.sha256:
            problems.append(f"{name(at)} is not the event {anchor.source} saw as the ledger's head (sha256 "
                            f"{anchor.head.sha256[:16]}…): it was edited or the chain rewritten from there")
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
        return Check(CHAIN, False, f"{problems[0]}{more}")
    if not chained:
        return Check(CHAIN, True, f"{len(legacy)} event(s) written before the ledger's hash chain existed: an edit, "
                     "removal or insertion among them cannot be detected", attention=True)
    anchored = sum(a.head.seq <= newest for a in anchors)
    detail = (f"{len(chained)} events linked by sha256 (#1…#{newest}); {HEAD_FILE} and {anchored} head(s) recorded "
              "in run.json, summary.json and card.json agree")
    if legacy:
        return Check(CHAIN, True, f"{detail}; {len(legacy)} older event(s) written before the chain existed cannot be "
                     "checked", attention=True)
    return Check(CHAIN, True, f"{detail}. The chain alone cannot detect someone who rewrites every event after an edit "
                 "(and HEAD.json), or drops the newest events: signed heads (--sign-key, checked with --ledger-key) do")


def _signature(path: Path) -> tuple[Head, str, Any, bytes]:
    """A signatures/<seq>.json file: the head it signs, the key id, the public key and the signature."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = json.loads(read_regular(path, SMALL_FILE)[:SMALL_FILE])
    raw = bytes.fromhex(data["public_key"])
    key = Ed25519PublicKey.from_public_bytes(raw)
    if sha256_bytes(raw) != data["public_key_sha256"] or data["algorithm"] != "ed25519":
        raise ValueError("the key id does not match the public key")
    return Head(int(data["seq"]), str(data["head"])), sha256_bytes(raw), key, bytes.fromhex(data["signature"])


def check_signatures(ledger: Path, events: list[Event], trusted: list[Path] = ()) -> Check:  # type: ignore[assignment]
    """The signed heads: each signature verifies, signs a head the ledger still has, by the key the event names;
    with `trusted` public keys (--ledger-key), by one of them, and the newest event is covered by one."""
    from cryptography.exceptions import InvalidSignature

    from ..keys.signing import key_fingerprint, load_public_key

    keys = {key_fingerprint(load_public_key(path)) for path in trusted}
    by_seq = {int(e.seq): e for e in events if e.seq is not None}
    problems: list[str] = []
    signed: dict[int, str] = {}
    for path in sorted((ledger / SIGNATURES).glob("*.json")):
        try:
            head, key_id, key, signature = _signature(path)
            key.verify(signature, head_message(head))
        except InvalidSignature:
            problems.append(f"{SIGNATURES}/{path.name} does not verify: it was forged or edited")
            continue
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"{SIGNATURES}/{path.name} is not a signature file ({type(err).__name__})")
            continue
        event = by_seq.get(head.seq)
        if event is None:
            problems.append(f"{SIGNATURES}/{path.name} signs event #{head.seq}, which the ledger no longer has (removed)")
        elif event.file is None or sha256_file(Path(event.file)) != head.sha256:
            problems.append(f"{name(event)} was edited after it was signed by key {key_id[:16]}…")
        elif event.signer != key_id:
            problems.append(f"{name(event)} names signer {str(event.signer)[:16]}…, but its head is signed by "
                            f"{key_id[:16]}…")
        elif keys and key_id not in keys:
            problems.append(f"{name(event)} is signed by key {key_id[:16]}…, which is not one of the --ledger-key keys")
        else:
            signed[head.seq] = key_id
    problems += [f"{name(e)} names signer {e.signer[:16]}… but its signature file is missing"
                 for seq, e in sorted(by_seq.items()) if e.signer and seq not in signed
                 and not any(f"#{seq} " in p for p in problems)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(SIGNED, False, problems[0] + more)
    newest = max(by_seq) if by_seq else 0
    if not signed:
        if keys:
            return Check(SIGNED, False, "no event of the ledger is signed, but --ledger-key was given: the chain's "
                         "head is not anchored by a trusted key")
        return Check(SIGNED, True, "no signed heads (record with --sign-key): the chain is not anchored to a key", attention=True)
    last = max(signed)
    whose = "a --ledger-key key" if keys else "the keys they carry (give --ledger-key to check whose keys they are)"
    after = newest - last
    detail = (f"{len(signed)} signed head(s), verified with {whose}; the newest signed head #{last} covers "
              f"every event before it")
    if after or not keys:
        tail = f"; {after} newer event(s) are not signed" if after else ""
        return Check(SIGNED, True, detail + tail, attention=True)
    return Check(SIGNED, True, detail)


def anchors_of_run(events: list[Event], run_dir: Path, project: Path) -> list[Anchor]:
    """The ledger heads recorded by the run's run.json and by its audits' summary.json files."""
    from ..contracts.audit_summary import read_audit_summary
    from ..contracts.run_record import read_run_record

    found: list[Anchor] = []
    record = read_run_record(run_dir)
    if record.ledger_head is not None:
        found.append(Anchor(f"{RunPaths(run_dir).record}", Head(record.ledger_head.seq, record.ledger_head.sha256)))
    for event in run_audits(events, run_dir, project):
        for where in event.located("outputs", AUDIT_SUMMARY, project):
            if where is None or not where.is_file():
                continue
            try:
                head = read_audit_summary(where.parent).ledger_head
            except GuardError:
                continue  # the counts check names a summary.json that cannot be read
            if head is not None:
                found.append(Anchor(str(where), Head(head.seq, head.sha256)))
    return found


def ledger_checks(ledger: Path, events: list[Event], run_dir: Path, trusted: list[Path],
                  card: tuple[Path, Any] | None = None) -> list[Check]:
    """verify's ledger checks: the chain (with the run's anchors, and `card`: the prepared directory's card.json
    and its Card) and, when the ledger holds signatures or `trusted` keys are given, the signatures."""

    anchors = anchors_of_run(events, run_dir, project_of(ledger))
    if card is not None and getattr(card[1], "ledger_head", None) is not None:
        anchors.append(Anchor(str(card[0]), Head(card[1].ledger_head.seq, card[1].ledger_head.sha256)))
    checks = [check_chain(ledger, events, anchors)]
    if trusted or any(e.signer for e in events) or any((ledger / SIGNATURES).glob("*.json")):  # a removed folder too
        checks.append(check_signatures(ledger, events, trusted))
    return checks
