"""Hugging Face cards: `guard report --model-card DIR --run RUN` and `--dataset-card DIR` write DIR/README.md with
YAML metadata (huggingface_hub `ModelCard` / `DatasetCard`), so the Hub and the tools that read cards see the
licences, the training data's composition, the opt-outs honoured, the audit's outcome and the DP budget.

A card holds counts, licences, rule names and hashes only: no `where` clause (it may name who opted out), no
noise key id, no path outside the card's own words; nothing that helps rebuild a protected original.
huggingface_hub is imported inside the functions (`guard --help` stays fast).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..contracts.events import TrainSummary, read_events
from ..contracts.run_record import RunRecord, read_run_record
from ..engine.methods import METHODS
from ..errors import InputError
from ..fileio import atomic_write_bytes, owner_only_dirs
from ..ledger import current_head
from ..locations import project_of
from ..prepared.card import Card, read_card
from ..prepared.relocate import prepared_of_run
from ..rundir import RunPaths
from .chains import Chain, gather, membership_words
from .composition import Exclusions, demoted, exclusions, holdout_rules_of, licence_counts, source_words, trained_licences
from .lineage import AncestorPrivacy, ancestor_privacy
from .markdown import code, row, text

TAGS = ["sfbd-guard", "diffusion", "protected-data"]


def hub_licence(licences: list[str]) -> tuple[str, str | None]:
    """The card's `license`: the one licence of all the records trained on (SPDX ids lower-cased, as the Hub
    writes them), else `other` with a name saying the data is mixed."""
    known = [lic for lic in licences if lic != "NOASSERTION"]
    if len(licences) == 1 and known:
        return known[0].lower(), None
    return "other", "mixed-training-data-licences" if known else "unknown-training-data-licence"


def _licence_words(licences: list[str]) -> str:
    if not licences:
        return "The dataset records no per-record licence."
    return "The training data's licences: " + ", ".join(map(text, licences)) + "."


def _size_category(count: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return name
    return "1M<n<10M" if count < 10_000_000 else "n>10M"


def _composition(card: Card, counts: Counter[tuple[str, str]] | None) -> str:
    if counts is None:
        rows = "\n".join(row(p, "dataset licence (no per-record `license` column)", card.counts.get(p, 0))
                         for p in ("clean", "protected", "excluded"))
    else:
        rows = "\n".join(row(text(p), text(lic), n) for (p, lic), n in sorted(counts.items()))
    return ("| partition | licence (SPDX) | records |\n|---|---|---|\n" + rows + "\n\n"
            "clean: trained on as they are; protected: seen only as noised copies (σ = "
            f"{card.sigma:g}); excluded: never stored (opt-outs, held-out records, demoted copies).")


def _exclusions(found: Exclusions, card: Card) -> str:
    opt = (", ".join(f"{code(name)}: {n} record(s)" for name, n in found.opt_outs.items())
           if found.opt_outs else "the policy has no opt-out rule")
    held = ", ".join(f"{code(name)}: {n}" for name, n in found.held_out.items()) or "none"
    return (f"- Opt-outs honoured: {opt}. Exclude rules run before every other rule; `guard verify` proves the "
            "excluded pixels are in no array.\n"
            f"- Held out for the audit's calibration (not opt-outs): {held}.\n"
            f"- Copies demoted to excluded by duplicate merging: {demoted(card)}.")


def _chain(ledger: Path, run_dir: Path) -> Chain:
    """The run's chain in `ledger`; a ledger with no finished training of the run (a copy of another project's
    ledger, or the wrong --ledger) cannot describe the model: an input error, not a card of unknowns."""
    chains, _ = gather(ledger, verify=False)
    chain = next((c for c in chains if c.run_dir == run_dir and c.ok("train")), None)
    if chain is None:
        raise InputError(f"ledger {ledger} records no finished training of {run_dir}: it cannot say how the model was "
                         "trained or audited", hint="pass the ledger the run was trained into (--ledger DIR)")
    return chain


def _audit_words(chain: Chain) -> tuple[str, dict[str, Any]]:
    summary = chain.audit
    if summary is None:
        return "No finished audit of this model's samples is recorded.", {"audited": False}
    counts = summary.counts
    how = ("thresholds calibrated on held-out real images" if summary.thresholds.method == "holdout"
           else "uncalibrated default thresholds (false-positive rate unknown)")
    words = (f"Latest memorization audit of {summary.flagged.of} generated images against the protected originals: "
            f"{counts.get('copy', 0)} copy, {counts.get('suspect', 0)} suspect, {counts.get('novel', 0)} novel "
            f"({text(summary.embedder.kind)} embedder, {how}).")
    return words, {"audited": True, "copies": counts.get("copy", 0), "suspects": counts.get("suspect", 0),
                  "samples": summary.flagged.of, "thresholds": summary.thresholds.method}


def _lineage_words(record: RunRecord) -> str:
    if not record.lineage:
        return "Trained from random weights (no init)."
    lines = ["Started from the weights of (parent first; guard verify checks the chain):", ""]
    for link in record.lineage:
        if link.declared is not None:
            lines.append(f"- {code(Path(link.run).name)}: imported weights (sha256 {code(link.weights_sha256[:16] + '…')}), "
                         f"licence {text(link.declared.get('licence', '?'))} and source {text(link.declared.get('source', '?'))} "
                         "as declared by the user, not verified")
        else:
            data, weights = (link.data_fingerprint or "?")[:16] + "…", link.weights_sha256[:16] + "…"
            lines.append(f"- {code(Path(link.run).name)}: method {code(link.method or '?')}, trained on prepared data "
                         f"{code(data)}, weights sha256 {code(weights)}")
    return "\n".join(lines)


def _composed_words(dp: tuple[float, float | None] | None, ancestors: list[AncestorPrivacy]) -> str:
    """ε over the chain: an ancestor that trained on this owner's protected data adds its ε (basic composition), or
    voids the guarantee if it trained on that data without DP."""
    def read_protected(a: AncestorPrivacy) -> bool:  # a clean-only ancestor saw no protected record: nothing to compose
        specs = METHODS.get(a.link.method or "", ())  # type: ignore[call-overload]
        return any(spec.reads_protected for spec in specs)

    same = [a for a in ancestors if a.same_owner and read_protected(a)]
    if not same:
        return ""
    without = [a for a in same if a.epsilon is None]
    if without:
        return (f" {len(without)} ancestor(s) trained on this owner's data without DP (e.g. "
                f"{code(Path(without[0].link.run).name)}): no DP guarantee holds over the chain.")
    if dp is None:
        return " Ancestors trained on this owner's data with DP, but this run without it: no guarantee over the chain."
    epsilon = dp[0] + sum(a.epsilon or 0.0 for a in same)
    delta = (dp[1] or 0.0) + sum(a.delta or 0.0 for a in same)
    return (f" Composed over the chain (basic composition over {len(same) + 1} generations that trained on this owner's "
            f"data with DP-SGD): ε = {epsilon:.3g}, δ = {delta:.3g}.")


def _membership_words(chain: Chain) -> str:
    if chain.membership is None:
        return "No membership test of the weights is recorded (guard membership)."
    words = membership_words(chain.membership)
    return text(words[0].upper() + words[1:]) + "."


def _membership_meta(chain: Chain) -> dict[str, Any] | None:
    summary = chain.membership
    if summary is None:
        return None
    return {"verdict": summary.verdict, **{f"{g.group}_auc": g.model.auc for g in summary.groups},
            **{f"{g.group}_auc_ci95": g.model.auc_ci95 for g in summary.groups}}


def _run_usage(run_name: str) -> str:
    run_name = run_name if re.fullmatch(r"[A-Za-z0-9._-]+", run_name) else "RUN"  # inside code blocks: nothing to escape
    return f"""```bash
guard sample --run runs/{run_name} --n 16 --out samples   # EDM's Heun sampler, 18 steps: PNGs and a grid
```

```python
import sfbd_guard

images = sfbd_guard.load_run("runs/{run_name}").sample(16, seed=0)  # uint8 (16, C, H, W)
```

`guard export --run runs/{run_name} --out DIR` writes the model in a layout other tools load (docs/export.md)."""


def model_card_text(run_dir: Path, ledger: Path, data: Path | None = None, *, usage: str | None = None,
                    licence: str | None = None, library: str = "sfbd_guard") -> str:
    """The Hub model card of `run_dir`. `usage`: the card's usage section (default: guard sample and load_run);
    `licence`: the model's licence (default: the training data's one licence, else "other"); `library`: the Hub's
    `library_name` (`diffusers` for a diffusers export)."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = run_dir.resolve()
    if not RunPaths(run_dir).record.is_file():
        raise InputError(f"{run_dir}: not a run directory (no run.json)", hint="--run takes a directory written by guard train")
    record = read_run_record(run_dir)
    folder = prepared_of_run(run_dir, record.data, record.data_fingerprint, project_of(ledger), data)
    card = read_card(folder, hint="the run's prepared directory (run.json `data`, or --data) must be written by guard prepare")
    chain = _chain(ledger, run_dir)
    counts = licence_counts(folder)
    licences = trained_licences(counts)
    licence, licence_name = (licence, None) if licence else hub_licence(licences)
    found = exclusions(card, holdout_rules_of(chain.audit.config if chain.audit else None))
    trained = chain.ok("train")[-1].summary
    method = trained.method if isinstance(trained, TrainSummary) else "unknown"
    audit, audit_meta = _audit_words(chain)
    dp = chain.epsilon()
    privacy = (f"DP-SGD on the stages that read protected data: ε = {dp[0]:.3g}" + (f", δ = {dp[1]:.3g}." if dp[1] else ".")
               if dp else "No differential-privacy guarantee: protected images were seen only as noised copies "
                          f"(σ = {card.sigma:g}), which is obfuscation, not DP.")
    ancestors = ancestor_privacy(record, read_events(ledger), project_of(ledger), card.digest_key_id)
    privacy += _composed_words(dp, ancestors)
    meta = ModelCardData(
        license=licence, datasets=[card.policy_name], tags=[*TAGS, method], pipeline_tag="unconditional-image-generation",
        library_name=library, license_name=licence_name,
        sfbd_guard={"data_fingerprint": card.fingerprint, "method": method, "training_licences": licences or ["NOASSERTION"],
                    "records": {k: card.counts.get(k, 0) for k in ("clean", "protected", "excluded")},
                    "opt_outs_honoured": found.opted_out, "audit": audit_meta,
                    "membership": _membership_meta(chain),
                    "lineage": [{"run": Path(link.run).name, "method": link.method, "weights_sha256": link.weights_sha256,
                                 "data_fingerprint": link.data_fingerprint, "declared": link.declared}
                                for link in record.lineage],
                    "dp": {"epsilon": dp[0], "delta": dp[1]} if dp else None,
                    "ledger_head": current_head(ledger).as_dict()})  # the ledger this card was written from
    body = f"""
# {text(run_dir.name)}

An image diffusion model trained with sfbd_guard (method {code(method)}, {card.resolution}×{card.resolution},
{card.channels} channel(s)) on the prepared dataset {code(card.policy_name)} (fingerprint {code(card.fingerprint[:16] + "…")}),
made from {source_words(card)}.

## Usage

{usage or _run_usage(run_dir.name)}

## Training data composition

{_composition(card, counts)}

## Opt-outs and held-out records

{_exclusions(found, card)}

## Memorization audit

{audit}

{_membership_words(chain)}

## Lineage

{_lineage_words(record)}

## Privacy

{privacy}

## Licence

{_licence_words(licences)}
The model's own licence is the owner's to set (`license` above says {code(licence)}; `guard export --licence`).
"""
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n{body}"))


def dataset_card_text(data: Path) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    data = data.resolve()
    card = read_card(data, hint="--dataset-card describes a directory written by guard prepare")
    counts = licence_counts(data)
    licences = trained_licences(counts)
    found = exclusions(card, [])
    stored = card.counts.get("clean", 0) + card.counts.get("protected", 0)
    meta = DatasetCardData(
        license=[lic.lower() for lic in licences if lic != "NOASSERTION"] or "other", pretty_name=card.policy_name,
        size_categories=_size_category(stored), task_categories=["unconditional-image-generation"], tags=TAGS,
        sfbd_guard={"fingerprint": card.fingerprint, "policy_sha256": card.policy_sha256, "sigma": card.sigma,
                    "records": {k: card.counts.get(k, 0) for k in ("clean", "protected", "excluded", "error")},
                    "opt_outs_honoured": found.opted_out})
    rules = "\n".join(row(text(rule.name), text(rule.action), card.rule_counts.get(rule.name, 0)) for rule in card.policy.rules)
    body = f"""
# {text(card.policy_name)}

A dataset prepared by sfbd_guard from {source_words(card)}: {card.resolution}×{card.resolution} images,
{card.channels} channel(s). Clean records are stored as they are; protected records only with Gaussian noise of
σ = {card.sigma:g} on the [-1, 1] scale, from a key only the data owner holds; excluded records are not stored.

## Composition

{_composition(card, counts)}

## Policy

Policy {code(card.policy_name)} (sha256 {code(card.policy_sha256[:16] + "…")}), applied on {text(card.created_at)}:

| rule | action | records |
|---|---|---|
{rules}

## Opt-outs

{_exclusions(found, card)}

## Integrity

The directory's fingerprint is {code(card.fingerprint)}; card.json lists the sha256 of every file.
"""
    return str(DatasetCard(f"---\n{meta.to_yaml()}\n---\n{body}"))


def write_model_card(folder: Path, run_dir: Path, ledger: Path, data: Path | None = None) -> Path:
    owner_only_dirs(folder)  # a new folder is owner-only, as every report's
    path = folder / "README.md"
    atomic_write_bytes(path, model_card_text(run_dir, ledger, data).encode())
    return path


def write_dataset_card(folder: Path, ledger: Path, *, run: Path | None = None, data: Path | None = None) -> Path:
    """The card of `data`, else of `run`'s prepared directory."""
    if data is None:
        if run is None:
            raise InputError("--dataset-card needs --data DIR or --run DIR")
        record = read_run_record(run.resolve())
        data = prepared_of_run(run.resolve(), record.data, record.data_fingerprint, project_of(ledger), None)
    owner_only_dirs(folder)  # a new folder is owner-only, as every report's
    path = folder / "README.md"
    atomic_write_bytes(path, dataset_card_text(data).encode())
    return path
