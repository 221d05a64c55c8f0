"""guard verify's lineage check: a run started from another run's weights (`init`) is only as clean as its ancestors.

For each generation of run.json's lineage (parent first):
- the weights file it names is there and has the recorded sha256;
- the ancestor's run directory is there, its own run.json lists the rest of the chain, and this ledger records
  its training (a chain whose ancestor's ledger is missing cannot be checked: FAIL, with the reason);
- no clean image it trained on is a record this run's policy protects or excludes: the ancestor's clean rows are
  digested with *this* owner's digest key and compared with this manifest's keyed digests; and, on the owner's
  side (the source dataset readable: guard verify --data-root), no clean image of it is a near copy of a protected
  original (dedup's pixel embedding, cosine >= 0.99; excluded records are opt-outs, never read: digests only).
  Digests of images at another resolution never match, and without the key or the originals nothing can be
  compared: each is said (ATTENTION), never passed in silence;
- the parent verifies (guard verify of the parent, which checks its own ancestors in turn), but for the checks of
  its own samples and model (its audit, its membership test), which say nothing of what this run inherits.
Imported weights (guard import-weights) are a root of the chain: shown as declared, not verified (ATTENTION).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..contracts.events import Event
from ..contracts.run_record import LineageLink, RunRecord, read_run_record
from ..errors import GuardError
from ..hashing import sha256_file
from ..prepared.relocate import prepared_of_run
from .check import Check, trainings
from .rows import clean_row_hashes, manifest_rows

Verdict = Literal["PASS", "ATTENTION", "FAIL"]
Originals = Callable[[], Iterator[tuple[list[str], np.ndarray]]]  # (record ids, uint8 pixels) chunks, hash-verified
Verify = Callable[[Path, Path, bytes | None], list[Check]]  # guard verify of a run against a ledger, with a digest key
NEAR_SIZE = 16  # side of the pixel embedding of the near search (dedup's, capped at the resolution)
NEAR_THRESHOLD = 0.99  # cosine at which two images are near copies (dedup's pixel threshold)


@dataclass(frozen=True)
class LinkResult:
    link: LineageLink
    verdict: Verdict
    reasons: list[str]

    def words(self) -> str:
        return f"{Path(self.link.run).name} ({self.verdict}: {'; '.join(self.reasons)})"


def _clean_pixels(folder: Path, rows: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """The record ids and uint8 pixels of a prepared directory's clean rows."""
    clean = [r for r in rows if r["partition"] == "clean"]
    arrays: dict[str, np.ndarray] = {}
    pixels = [np.asarray(arrays.setdefault(r["file"], np.load(folder / r["file"], mmap_mode="r"))[r["row"]]) for r in clean]
    return [r["record_id"] for r in clean], (np.stack(pixels) if pixels else np.zeros((0, 1, 1, 1), np.uint8))


def _near(ids: list[str], pixels: np.ndarray, originals: Originals) -> tuple[Verdict, str]:
    """The ancestor's clean images against this policy's protected originals, by dedup's pixel embedding."""
    from ..curation.dedup import embed
    from ..embedding.knn import knn

    if not len(pixels):
        return "PASS", "it trained on no clean image"
    size = min(NEAR_SIZE, pixels.shape[-1])
    theirs = embed(pixels, size)
    found: list[tuple[str, str, float]] = []
    for record_ids, chunk in originals():
        mine = embed(chunk, min(size, chunk.shape[-1]))
        if mine.shape[1] != theirs.shape[1]:
            return "ATTENTION", "its clean images are at another resolution: near copies not searched"
        rows, scores = knn(mine, [theirs], 1)  # each original's nearest clean image of the ancestor
        found += [(ids[int(rows[i, 0])], record_ids[i], float(scores[i, 0])) for i in range(len(mine))
                  if rows[i, 0] >= 0 and scores[i, 0] >= NEAR_THRESHOLD]
    if found:
        theirs_id, mine_id, score = max(found, key=lambda f: f[2])
        return "FAIL", (f"{len(found)} of this policy's protected originals have a near copy among its clean images "
                        f"(pixel cosine >= {NEAR_THRESHOLD}), e.g. {mine_id} ~ its {theirs_id} ({score:.4f})")
    return "PASS", f"no near copy of a protected original among its {len(ids)} clean images"


def _overlap(link: LineageLink, ancestor: RunRecord, run: Path, project: Path, forbidden: dict[str, str],
             resolution: tuple[int, int, int], key: bytes | None, keyed: bool,
             originals: Originals | None) -> list[tuple[Verdict, str]]:
    """Does the ancestor's clean data hold a record this policy protects or excludes? Exact: keyed digests (needs the
    owner's digest key); near: pixel embeddings against the protected originals (needs the source dataset; excluded
    records are opt-outs, never read, so they are compared by digest only)."""
    try:
        folder = prepared_of_run(run, ancestor.data, ancestor.data_fingerprint, project)
        rows, _ = manifest_rows(folder)
    except (GuardError, OSError) as err:
        return [("FAIL", f"its prepared data cannot be read: {err}")]
    found: list[tuple[Verdict, str]] = []
    if keyed and key is None:
        found.append(("ATTENTION", "its clean images not compared with this policy's records by digest: needs the "
                                   "owner's digest key"))
    elif ancestor.shape != resolution:
        found.append(("ATTENTION", f"its clean images ({ancestor.shape}) not compared by digest with this policy's "
                                   f"records ({resolution}): exact digests never match at another resolution"))
    else:
        stored = clean_row_hashes(folder, rows, key if keyed else None)
        leaks = [(rid, forbidden[h]) for rid, h in stored.items() if h in forbidden]
        if leaks:
            return [("FAIL", f"it trained on {len(leaks)} clean image(s) that this policy protects or excludes, e.g. "
                             f"its {leaks[0][0]} is {leaks[0][1]}")]
        found.append(("PASS", f"none of its {len(stored)} clean images is a record this policy protects or excludes"))
    if originals is None:
        found.append(("ATTENTION", "near copies of protected originals not searched: the owner's source dataset is not "
                                   "readable here (guard verify --data-root DIR, on the owner's side)"))
    else:
        try:
            found.append(_near(*_clean_pixels(folder, rows), originals))
        except (GuardError, OSError) as err:
            found.append(("ATTENTION", f"near copies not searched: {err}"))
    return found


ORDER: dict[Verdict, int] = {"PASS": 0, "ATTENTION": 1, "FAIL": 2}
# an ancestor's checks of its own samples and model (its audit, its membership test) say nothing of what this run
# inherits from it: the data it trained on, the noise, the opt-outs and the ledger do
SAMPLE_CHECKS = frozenset({"audit", "membership"})


def _check_link(depth: int, record: RunRecord, rows: list[dict[str, Any]] | None, forbidden: dict[str, str],
                keyed: bool, key: bytes | None, events: list[Event], ledger: Path, project: Path,
                originals: Originals | None, verify: Verify) -> LinkResult:
    link = record.lineage[depth]
    found: list[tuple[Verdict, str]] = []
    weights = Path(link.weights)
    if link.declared is not None:
        found.append(("ATTENTION", f"imported weights, declared {link.declared}, not verified"))
    if not weights.is_file():
        found.append(("FAIL", f"its weights {weights} are missing"))
    elif sha256_file(weights) != link.weights_sha256:
        found.append(("FAIL", f"its weights {weights} are not the file the lineage records (sha256 differs)"))
    if link.declared is None:
        run = Path(link.run)
        try:
            ancestor = read_run_record(run)
        except GuardError as err:
            return LinkResult(link, "FAIL", [*(why for _, why in found), f"its run cannot be checked: {err}"])
        if ancestor.lineage != record.lineage[depth + 1:]:
            found.append(("FAIL", "its own run.json lists other ancestors than this lineage"))
        if not trainings(events, run, project):
            found.append(("FAIL", f"this ledger records no finished training of {run}: its chain cannot be checked "
                                  "(verify with the ledger it was trained into)"))
        if rows is not None:
            found += _overlap(link, ancestor, run, project, forbidden, record.shape, key, keyed, originals)
        if depth == 0 and all(level != "FAIL" for level, _ in found):  # the parent verifies, and so its ancestors
            failed = [c for c in verify(run, ledger, key) if not c.passed and c.name not in SAMPLE_CHECKS]
            if failed:
                found.append(("FAIL", f"guard verify of it fails {failed[0].name}: {failed[0].detail}"))
    verdict: Verdict = max((level for level, _ in found), key=ORDER.__getitem__, default="PASS")
    return LinkResult(link, verdict, [why for _, why in found] or ["checked"])


def recorded_lineage(events: list[Event], run: Path, project: Path) -> list[list[dict[str, Any]]]:
    """The lineage each finished training of `run` recorded in the ledger (its train events' summaries)."""
    return [[link.model_dump(mode="json") for link in getattr(event.summary, "lineage", None) or []]
            for event in trainings(events, run, project)]


def check_lineage(record: RunRecord, rows: list[dict[str, Any]] | None, keyed: bool, key: bytes | None,
                  events: list[Event], ledger: Path, project: Path, holdout_rules: frozenset[str] = frozenset(),
                  originals: Originals | None = None, verify: Verify | None = None,
                  run: Path | None = None) -> list[Check]:
    """The lineage check of a run (none for a run from random weights); `rows` is this run's manifest (None when its
    prepared directory does not verify: the overlap is then not checked). Records of `holdout_rules` are neither
    protected nor excluded (an ancestor may have trained on them). `verify(run, ledger, digest key)` is guard verify
    of the parent (compliance/verify.py passes its own)."""
    if run is not None:  # run.json's lineage is the one its trainings recorded: an edit that hides an ancestor shows
        mine = [link.model_dump(mode="json") for link in record.lineage]
        differing = [found for found in recorded_lineage(events, run, project) if found != mine]
        if differing:
            told = f"{len(differing[0])} generation(s)" if differing[0] else "random weights (no init)"
            return [Check("lineage", False, f"run.json's lineage ({len(mine)} generation(s)) is not the one the ledger's "
                                            f"train event recorded ({told}): run.json was edited")]
    if not record.lineage:
        return []
    assert verify is not None, "the parent is verified by guard verify's own checks"
    forbidden = {r["digest"]: r["record_id"] for r in rows or [] if r["digest"] and (
        r["partition"] == "protected" or (r["partition"] == "excluded" and r["rule"] not in holdout_rules))}
    results = [_check_link(depth, record, rows, forbidden, keyed, key, events, ledger, project, originals, verify)
               for depth in range(len(record.lineage))]
    verdicts = {r.verdict for r in results}
    detail = f"{len(results)} generation(s), parent first: " + "; ".join(r.words() for r in results)
    return [Check("lineage", "FAIL" not in verdicts, detail, attention="ATTENTION" in verdicts,
                  items=tuple(r.words() for r in results))]


@dataclass(frozen=True)
class AncestorPrivacy:
    link: LineageLink
    same_owner: bool  # trained on data prepared with this owner's key
    epsilon: float | None  # its DP-SGD epsilon (None: trained without DP)
    delta: float | None


def ancestor_privacy(record: RunRecord, events: list[Event], project: Path, digest_key_id: str | None) -> list[AncestorPrivacy]:
    """Each ancestor run's DP guarantee (from its latest finished training in the ledger) and whether it trained on
    data of the owner whose directory has `digest_key_id`."""
    from ..prepared.card import read_card

    found = []
    for link in record.lineage:
        if link.declared is not None:
            continue
        run = Path(link.run)
        same = False
        try:
            ancestor = read_run_record(run)
            card = read_card(prepared_of_run(run, ancestor.data, ancestor.data_fingerprint, project))
            same = digest_key_id is not None and card.digest_key_id == digest_key_id
        except (GuardError, OSError):
            same = False
        latest = trainings(events, run, project)[-1:]
        privacy = getattr(latest[0].summary, "privacy", None) if latest else None
        epsilon, delta = (privacy.epsilon, privacy.delta) if privacy is not None else (None, None)
        found.append(AncestorPrivacy(link, same, epsilon, delta))
    return found
