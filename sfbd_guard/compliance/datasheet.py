"""`guard report --datasheet FILE.md --run DIR`: a training-data summary of one run, in the spirit of
datasheets for datasets (Gebru et al.) and the EU AI Act training-content summary template
(general information, data sources, data processing). Filled from files and the ledger alone."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..contracts.audit_summary import read_audit_summary
from ..contracts.run_record import read_run_record
from ..errors import GuardError, InputError
from ..fileio import atomic_write_bytes, owner_only_dirs
from ..locations import project_of
from ..prepared.card import Card, read_card
from ..prepared.relocate import prepared_of_run
from ..rundir import RunPaths
from ..version import __version__
from .composition import Exclusions, exclusions, holdout_rules_of, licence_counts, rule_words, source_words
from .markdown import code, row, text
from .verify import transforms_words
from .views import RUN_AUDITS, connect


def _licenses(data: Path) -> str:
    counts = licence_counts(data)
    if counts is None:
        return "The dataset has no per-record `license` column; its licence is the dataset's own (check its terms)."
    lines = "\n".join(row(text(p), text(lic), n) for (p, lic), n in sorted(counts.items()))
    return f"| partition | licence (SPDX) | records |\n|---|---|---|\n{lines}"


def _rules(card: Card) -> str:
    lines = [row(text(rule.name), text(rule.action), rule_words(rule, cell=True), card.rule_counts.get(rule.name, 0))
             for rule in card.policy.rules]
    return "| rule | action | matches | records |\n|---|---|---|---|\n" + "\n".join(lines)


def _exclusions(card: Card, found: Exclusions) -> str:
    """Opt-outs honoured, then (apart) the records held out to calibrate the audit."""
    if found.opt_outs:
        names = ", ".join(f"{code(name)} ({n})" for name, n in found.opt_outs.items())
        text = (f"Opt-out rules: {names}. Exclude rules apply before any other rule, so an opt-out can never be "
                f"overridden: {found.opted_out} record(s) excluded.")
    else:
        text = ("The policy has no opt-out rule (no exclude rule); the records it holds out are listed below."
                if found.held_out else "The policy has no opt-out rule (no exclude rule).")
    text += (" Excluded records exist in the prepared directory only as opaque manifest rows (rule and keyed pixel "
             "digest; their names and metadata stay with the data owner); `guard verify --digest-key` proves their "
             "pixels are absent from every array. Machine-readable TDM reservations (robots, TDMRep, C2PA/IPTC) are honoured "
             "to the extent the policy's `where` clauses encode them: TODO (describe the signals collected and when).")
    if found.held_out:
        names = ", ".join(f"{code(name)} ({n})" for name, n in found.held_out.items())
        text += (f"\n\n### Records held out (not opt-outs)\nHeld out from training so the memorization audit can "
                 f"calibrate its thresholds on real images the model never saw: {names}.")
    return text


def _dedup(card: Card) -> str:
    """Copies merged by `guard prepare` (curation/dedup.py), and the demotions by cause."""
    dedup = card.dedup
    if not dedup:
        return "Copies: this directory was prepared before duplicate merging existed (copies were not checked)."
    if not dedup.get("enabled"):
        return ("Copies: duplicate merging was turned off in the policy (`dedup: {enabled: false}`): a copy of a "
                "protected or opted-out image in another partition was not caught.")
    lines = [row(text(cause), text(kinds.get('exact', 0)), text(kinds.get('near', 0)))
             for cause, kinds in sorted(dedup.get("demotions", {}).items())]
    table = ("\n\n| demoted record | exact copies | near copies |\n|---|---|---|\n" + "\n".join(lines)) if lines else ""
    fine = dedup.get("fine")
    finer = f" and ≥ {text(fine.get('threshold'))} at {text(fine.get('size'))} px" if isinstance(fine, dict) else ""
    return (f"Copies: exact (pixel sha256, up to the transforms) and near ({text(dedup.get('embedder'))} embedder, cosine ≥ "
            f"{text(dedup.get('threshold'))}{finer}, {text(transforms_words(dedup))}) copies were merged, each cluster taking "
            f"its strictest action; {text(dedup.get('merged', 0))} record(s) in {text(dedup.get('clusters', 0))} cluster(s) "
            f"({100 * float(dedup.get('merged_share', 0)):.2f} %), {text(dedup.get('demoted', 0))} demoted to excluded "
            f"(rule `duplicate`).{table}")


def _releases(card: Card) -> str:
    """The owner's release register, as the card records it (curation/register.py)."""
    found = card.rerelease
    if found is None:
        return ("Releases: no protected image of this directory had been released before with other noise (another "
                "key, σ, resolution or record id), by the data owner's release register (exact pixel match).")
    verdict = "ATTENTION: " if found.min_sigma_eff < card.sigma else ""
    return (f"Releases: {verdict}{found.images} protected image(s) had been released before with other noise "
            f"(prepare(s) {', '.join(code(e[:12]) for e in found.earlier)}; released again with --allow-rerelease). "
            f"Averaged over its distinct draws an image's noise is σ_eff = (Σ σᵢ⁻²)^(−1/2); the smallest here is "
            f"{found.min_sigma_eff:.3g}, against the policy's σ = {card.sigma:g}.{_sigma_eff_table(found.sigma_eff_images)}")


def _sigma_eff_table(images: dict[str, int]) -> str:
    if not images:
        return ""
    rows = "\n".join(f"  {row(text(value), count)}" for value, count in images.items())
    return f"\n\n  | σ_eff | images |\n  |---|---|\n{rows}"


def _latest_audit(con: Any, run_dir: Path) -> tuple[str, list[str]]:
    """The latest finished audit in words, and the rules it held out for calibration. The counts are summary.json's
    (guard verify checks that the event's copies of them match it), never taken from the event alone."""
    rows = con.execute(
        "SELECT started_at, copy, suspect, novel, threshold_method, copy_threshold, summary_file FROM audits "
        f"WHERE status = 'ok' AND {RUN_AUDITS} ORDER BY started_at DESC LIMIT 1", [str(run_dir), str(run_dir)]).fetchall()
    if not rows:
        return "No audit of this run's samples is recorded yet (`guard audit`).", []
    started, copy, suspect, novel, method, threshold, summary_file = rows[0]
    held: list[str] = []
    fpr = "not known (no holdout: documented default thresholds)"
    if summary_file and Path(summary_file).is_absolute():
        try:
            summary = read_audit_summary(Path(summary_file).parent)
            held, fpr = holdout_rules_of(summary.config), text(summary.thresholds.expected_fpr_text)
            copy, suspect, novel = (summary.counts.get(k, 0) for k in ("copy", "suspect", "novel"))
        except GuardError:
            fpr = "not known (the audit's summary.json could not be read)"
            copy = suspect = novel = "unknown"
    how = "calibrated on held-out real images" if method == "holdout" else "uncalibrated documented defaults"
    return (f"Latest audit ({started:%Y-%m-%d %H:%M} UTC): {copy} copy, {suspect} suspect, {novel} novel. "
            f"Copy threshold {'n/a' if threshold is None else f'{threshold:.4f}'} ({how}); {fpr}.", held)


def _trainings(con: Any, run_dir: Path) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = con.execute(
        "SELECT started_at, method, steps, kimg, epsilon, delta, data_fingerprint FROM trainings "
        "WHERE status = 'ok' AND run = ? ORDER BY started_at", [str(run_dir)]).fetchall()
    return rows


def datasheet(run_dir: Path, ledger: Path, data: Path | None = None) -> str:
    """The datasheet of the run in `run_dir`; its prepared directory is `data` (--data), else run.json's
    (`relocate.prepared_of_run`: relative to the run, or found by its fingerprint in the project)."""
    run_dir = run_dir.resolve()
    if not RunPaths(run_dir).record.is_file():
        raise InputError(f"{run_dir}: not a run directory (no run.json)")
    run = read_run_record(run_dir)
    data = prepared_of_run(run_dir, run.data, run.data_fingerprint, project_of(ledger), data)
    card = read_card(data, hint="the run's prepared directory (run.json `data`, or --data) must be one written by guard prepare")
    con = connect(ledger)
    trainings = _trainings(con, run_dir)
    if not trainings:  # a copied or wrong ledger: no datasheet of unknowns
        raise InputError(f"ledger {ledger} records no finished training of {run_dir}: it cannot say how the model was "
                         "trained or audited", hint="pass the ledger the run was trained into (--ledger DIR)")
    method = code(trainings[-1][1])
    eps = trainings[-1][4] if trainings else None
    privacy = (f"DP-SGD with ε = {eps:.3g}, δ = {trainings[-1][5]:.3g} on the private stages." if eps else
               "No differential-privacy guarantee: the noised partition is obfuscation against memorization and "
               "reproduction, not DP (as a Gaussian mechanism on whole images its ε is in the hundreds).")
    counts = card.counts
    audit, held = _latest_audit(con, run_dir)
    root = card.source_root(data)
    where = f" at {code(root)}" if root is not None else ""
    return f"""# Training-data summary: run {code(run_dir.name)}

Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by sfbd_guard {__version__} from the prepared
directory, the run directory and the compliance ledger. Narrative answers marked TODO need a person.

## 1. General information
- Model: diffusion model trained with method {method} ({len(trainings)} recorded training session(s)).
- Modality: images, {card.resolution}×{card.resolution}, {card.channels} channel(s) ({text(card.color)}).
- Training data size: {counts['clean']} clean images and {counts['protected']} protected images seen only as
  noised copies; {counts['excluded']} records excluded; {counts['error']} unreadable.
- Purpose and intended use: TODO.

## 2. Data sources
- Source dataset: {source_words(card)}{where}.
- Policy: {code(card.policy_name)} (sha256 {code(card.policy_sha256)}), applied by `guard prepare` on {text(card.created_at)}.

{_rules(card)}

### Licences
{_licenses(data)}

### Opt-outs and reservations honoured
{_exclusions(card, exclusions(card, held))}

### Copies
{_dedup(card)}

## 3. Data processing
- Protected records: stored only as y = x/127.5 − 1 + σ·ε with σ = {card.sigma} (one fixed draw per record,
  from a generator keyed by the data owner's secret, which never left them); the originals never entered the
  prepared directory.
- {_releases(card)}
- What the trainer could see: the prepared directory {code(data)} (fingerprint {code(run.data_fingerprint)}),
  nothing else; its array files were verified against their sha256 before training.
- Synthetic data: SFBD's denoised copies of protected records are synthetic data derived from them
  (the model's own reconstructions), used for training.
- Privacy: {privacy}
- Memorization audit: {audit}
- Removal of illegal content, personal-data handling: TODO.
"""


def write_datasheet(path: Path, run_dir: Path, ledger: Path, data: Path | None = None) -> Path:
    text = datasheet(run_dir, ledger, data)
    owner_only_dirs(path.parent)  # new folders are owner-only (the file is 0600)
    atomic_write_bytes(path, text.encode())
    return path
