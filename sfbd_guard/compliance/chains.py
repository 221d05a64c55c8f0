"""Run chains for the compliance report: prepare → train → sample → audit of one run directory, gathered from
the ledger's typed events (contracts/events.py), with `guard verify`'s checks and a verdict in plain words.

A chain is keyed by a run directory (the `run` output of its training events). An event belongs to it when
one of its artifact paths, or a path on its command line, lies inside the run directory or is its prepared
directory; that is how failed and interrupted commands, which may not have recorded every output, are found.

Verdict: FAIL when the latest audit found copies, a `guard verify` check failed (or could not run), or a stage
failed and has not completed since; ATTENTION when the audit flagged suspects, its thresholds were not
calibrated on a holdout, a stage was interrupted and not completed, there is no audit, the latest membership
test of the weights tells the protected images from never-seen ones (guard membership), the DP budget is
weak (ε above `WEAK_EPSILON`), or a verify check needs attention (protected images released again with other
noise, sigma_eff below the policy's sigma; no digest key to compare the manifest's keyed digests); PASS
otherwise. Notes (a stage that failed and completed later, the membership test's numbers, the privacy status)
are listed without changing the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..contracts.audit_summary import AuditSummary, read_audit_summary
from ..contracts.events import Event, read_events
from ..contracts.membership import MembershipSummary, read_membership_summary
from ..errors import GuardError
from ..locations import project_of, resolve
from ..prepared.card import Card, read_card
from ..rundir import AUDIT_SUMMARY, MEMBERSHIP_SUMMARY
from .check import Check
from .verify import verify_run

WEAK_EPSILON = 10.0  # above this ε, DP-SGD's guarantee is weak (a common reading of the DP literature)
STAGES = ("prepare", "train", "sample", "audit")
Level = Literal["fail", "attention", "info"]
VERDICTS = {"fail": "FAIL", "attention": "ATTENTION"}


@dataclass(frozen=True)
class Reason:
    level: Level
    text: str


@dataclass
class Chain:
    run_dir: Path
    events: list[Event] = field(default_factory=list)  # every related event, oldest first
    prepared: Path | None = None
    card: Card | None = None
    audit: AuditSummary | None = None  # the latest finished audit's summary.json
    audit_dir: Path | None = None
    membership: MembershipSummary | None = None  # the latest finished membership test of the run's weights
    checks: list[Check] = field(default_factory=list)
    verify_error: str | None = None
    reasons: list[Reason] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def verdict(self) -> str:
        levels = {r.level for r in self.reasons}
        return "FAIL" if "fail" in levels else "ATTENTION" if "attention" in levels else "PASS"

    def ok(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind and e.status == "ok"]

    def counts(self) -> dict[str, int]:
        """Records per partition of the prepared directory, with the copies dedup demoted to excluded."""
        if self.card is None:
            return {}
        counts = {k: self.card.counts.get(k, 0) for k in ("clean", "protected", "excluded", "error")}
        demoted = int((self.card.dedup or {}).get("demoted", 0) or 0)
        return {**counts, "demoted copies": demoted} if demoted else counts  # a part of excluded

    def epsilon(self) -> tuple[float, float | None] | None:
        for event in reversed(self.ok("train")):
            privacy = getattr(event.summary, "privacy", None)
            if privacy is not None and privacy.epsilon is not None:
                return float(privacy.epsilon), privacy.delta
        return None


def _paths(event: Event, project: Path) -> list[Path]:
    """Every path the event names: its artifacts (resolved against the project) and its command's arguments."""
    found = [p for column in ("inputs", "outputs") for a in getattr(event, column) if a.role != "source"
             for p in [resolve(a.path, project)] if p is not None]
    for arg in event.command[1:]:
        if arg.startswith("-") or "/" not in arg:
            continue
        where = resolve(arg, project, project=project)
        if where is not None:
            found.append(where)
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _run_dirs(events: list[Event], project: Path) -> list[Path]:
    runs: list[Path] = []
    for event in events:
        if event.kind == "train":
            for where in event.located("outputs", "run", project):
                if where is not None and where not in runs:
                    runs.append(where)
    return runs


def _prepared(chain: Chain, related: list[Event], events: list[Event], project: Path) -> None:
    fingerprints = {a.sha256 for e in related if e.kind == "train" and e.status == "ok"
                    for a in e.artifacts("inputs", "prepared")}
    for event in events:
        if event.kind == "prepare" and event.status == "ok":
            for artifact in event.artifacts("outputs", "prepared"):
                if artifact.sha256 in fingerprints:
                    chain.prepared = resolve(artifact.path, project)
    if chain.prepared is not None:
        try:
            chain.card = read_card(chain.prepared)
        except GuardError as err:
            chain.reasons.append(Reason("attention", f"the prepared directory's card could not be read: {err}"))


def _latest_audit(chain: Chain, project: Path) -> None:
    audits = chain.ok("audit")
    if not audits:
        return
    for artifact in audits[-1].artifacts("outputs", AUDIT_SUMMARY):
        where = resolve(artifact.path, project)
        if where is None:
            continue
        try:
            chain.audit, chain.audit_dir = read_audit_summary(where.parent), where.parent
        except GuardError as err:
            chain.reasons.append(Reason("fail", f"the latest audit's summary.json could not be read: {err}"))


def _latest_membership(chain: Chain, project: Path) -> None:
    tests = chain.ok("membership")
    if not tests:
        return
    for where in tests[-1].located("outputs", MEMBERSHIP_SUMMARY, project):
        if where is None:
            continue
        try:
            chain.membership = read_membership_summary(where.parent)
        except GuardError as err:
            chain.reasons.append(Reason("fail", f"the latest membership test's {MEMBERSHIP_SUMMARY} could not be read: {err}"))


def gather(ledger: Path, *, verify: bool = True, digest_key: Path | bytes | None = None) -> tuple[list[Chain], list[Event]]:
    """The run chains of `ledger`, oldest run first, each with its verdict; and the failed or interrupted events
    that belong to no chain. `digest_key` (guard key export-digest) is passed to guard verify's pixel checks."""
    events = read_events(ledger)
    project = project_of(ledger)
    chains = [Chain(run) for run in _run_dirs(events, project)]
    claimed: set[str] = set()
    for chain in chains:
        related = [e for e in events if any(_inside(p, chain.run_dir) for p in _paths(e, project))]
        drawn = [p for e in related if e.kind == "sample" for p in e.located("outputs", "samples", project) if p is not None]
        _prepared(chain, related, events, project)
        ids = {e.event_id for e in related}
        chain.events = [e for e in events if e.event_id in ids or any(
            any(_inside(p, folder) for folder in drawn) for p in _paths(e, project)) or (
            e.kind == "prepare" and chain.prepared is not None and chain.prepared in _paths(e, project))]
        claimed |= {e.event_id for e in chain.events}
        _latest_audit(chain, project)
        _latest_membership(chain, project)
        if verify:
            try:
                chain.checks = verify_run(chain.run_dir, ledger, digest_key=digest_key)
            except GuardError as err:
                chain.verify_error = str(err)
        chain.reasons += judge(chain, verified=verify)
    orphans = [e for e in events if e.status != "ok" and e.event_id not in claimed]
    return chains, orphans


def message(event: Event, project: Path | None = None) -> str:
    """What an event says in one line: its error, or a summary of what it did. With `project`, an audit's counts
    are those of its summary.json and samples.parquet (the files whose sha256 it holds), or say why they are not."""
    s: Any = event.summary
    if event.status != "ok":
        return str(s.error or f"{event.kind} {event.status} (no message recorded)")
    if event.kind == "prepare":
        counts = s.counts or {}
        return (f"policy {s.policy_name}: {counts.get('clean', 0)} clean, {counts.get('protected', 0)} protected "
                f"(σ {s.sigma:g}), {counts.get('excluded', 0)} excluded")
    if event.kind == "train":
        dp = f", DP ε {s.privacy.epsilon:.3g}" if s.privacy is not None and s.privacy.epsilon is not None else ""
        return f"{s.method}: {s.step} steps, {s.kimg:g} kimg{' (resumed)' if s.resumed else ''}{dp}"
    if event.kind == "sample":
        return f"{s.count} images"
    if event.kind == "audit":
        counts = s.counts or {}
        if project is not None:
            from .verify import audit_files

            summary, _, problems = audit_files(event, project)
            if problems or summary is None:
                return f"the audit's counts do not match its files: {problems[0] if problems else 'unreadable'}"
            counts = summary.counts
        return (f"{counts.get('copy', 0)} copy, {counts.get('suspect', 0)} suspect, {counts.get('novel', 0)} novel "
                f"({'calibrated on a holdout' if s.thresholds.method == 'holdout' else 'uncalibrated thresholds'})")
    if event.kind == "membership":
        clean = f", clean AUC {s.clean_auc:.3f} (the test's power)" if s.clean_auc is not None else ""
        return f"{s.verdict}: protected AUC {s.protected_auc:.3f} against the holdout{clean}"
    return event.kind


def _stages(chain: Chain) -> list[Reason]:
    reasons = []
    for kind in STAGES:
        attempts = [e for e in chain.events if e.kind == kind]
        for i, event in enumerate(attempts):
            if event.status == "ok":
                continue
            when = f"{event.started_at:%Y-%m-%d %H:%M} UTC"
            later = [e for e in attempts[i + 1:] if e.status == "ok"]
            what = "failed" if event.status == "failed" else "was interrupted"
            if later:
                reasons.append(Reason("info", f"{kind} {what} on {when} ({message(event)}); it completed later"))
            else:
                level: Level = "fail" if event.status == "failed" else "attention"
                reasons.append(Reason(level, f"a stage failed: {kind} {what} on {when} and has not completed since: "
                                             f"{message(event)}" if level == "fail" else
                                      f"{kind} {what} on {when} and has not completed since"))
    return reasons


def _audit(chain: Chain) -> list[Reason]:
    summary = chain.audit
    if summary is None:
        return [Reason("attention", "no finished audit of this run's samples: nothing shows the model does not "
                                    "reproduce protected images (run guard audit)")]
    counts, of = summary.counts, summary.flagged.of
    reasons = []
    if counts.get("copy", 0):
        reasons.append(Reason("fail", f"copies found: the latest audit found {counts['copy']} of {of} generated "
                                      "images to be copies of protected originals"))
    if counts.get("suspect", 0):
        reasons.append(Reason("attention", f"suspects: {counts['suspect']} of {of} generated images are close to a "
                                           "protected original (see the audit page for the rule that fired)"))
    if summary.thresholds.method != "holdout":
        reasons.append(Reason("attention", "uncalibrated thresholds: the audit had no holdout of real unseen images, "
                                           "so its false-positive and miss rates on this data are unknown"))
    return reasons


def membership_words(summary: MembershipSummary) -> str:
    """The membership test in a sentence: the protected group against the holdout, and the clean group as its power."""
    groups = {g.group: g for g in summary.groups}
    protected, clean = groups["protected"], groups.get("clean")

    def auc(result: Any) -> str:
        return f"AUC {result.auc:.3f} (95 % interval {result.auc_ci95[0]:.3f}–{result.auc_ci95[1]:.3f})"

    control = (f"; the clean-only control gives {auc(protected.control)}" if protected.control is not None else
               "; no clean-only control was tested")
    power = (f"; the clean images the model trained on give {auc(clean.model)}, the test's power" if clean is not None
             else "; no clean group to show the test's power")
    return (f"membership test of the weights ({summary.verdict}): protected images against {protected.holdout_images} "
            f"never-seen images, {auc(protected.model)} over {protected.images} images{control}{power}")


def _membership(chain: Chain) -> list[Reason]:
    summary = chain.membership
    if summary is None:
        return [Reason("info", "no membership test of the model's weights (guard membership): only its samples "
                               "were audited")]
    words = membership_words(summary)
    if summary.verdict == "ATTENTION":
        return [Reason("attention", f"the model tells the protected images from never-seen ones: {words}")]
    return [Reason("info", words)]


def _privacy(chain: Chain) -> list[Reason]:
    found = chain.epsilon()
    if found is None:
        sigma = f" (σ = {chain.card.sigma:g})" if chain.card is not None else ""
        return [Reason("info", "no differential-privacy guarantee: protected images were seen only as noised "
                               f"copies{sigma}, which is obfuscation, not DP")]
    epsilon, delta = found
    at = f" at δ = {delta:.3g}" if delta is not None else ""
    if epsilon > WEAK_EPSILON:
        return [Reason("attention", f"DP budget: ε = {epsilon:.3g}{at} is above {WEAK_EPSILON:g}, a weak guarantee")]
    return [Reason("info", f"DP budget: DP-SGD with ε = {epsilon:.3g}{at} on the stages that read protected data")]


def judge(chain: Chain, *, verified: bool = True) -> list[Reason]:
    """The reasons behind the chain's verdict (see the module docstring)."""
    reasons = _audit(chain)
    if chain.verify_error is not None:
        reasons.append(Reason("fail", f"guard verify could not run: {chain.verify_error}"))
    reasons += [Reason("fail", f"a verify check failed: {c.name}: {c.detail}") for c in chain.checks
                if not c.passed and c.name != "audit"]  # the audit check repeats the audit reasons above
    reasons += [Reason("attention", f"{c.name}: {c.detail}") for c in chain.checks if c.passed and c.attention]
    if not verified:
        reasons.append(Reason("info", "guard verify was not run for this report"))
    reasons += _stages(chain)
    reasons += _membership(chain)
    reasons += _privacy(chain)
    order = {"fail": 0, "attention": 1, "info": 2}
    return sorted(reasons, key=lambda r: order[r.level])
