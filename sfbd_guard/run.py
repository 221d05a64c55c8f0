"""`guard run pipelines/<name>.yaml`: prepare → train → sample → audit → report, resumable.

Each stage is skipped when its finished output is already there and valid, so re-running after a
crash (or after the run finished) continues where it stopped:
- prepare: the prepared directory exists, was made from this exact policy file, and verifies;
- train: a run directory with checkpoints is resumed (a finished run returns at once);
- sample: `samples/done.json` names the same weights, count, steps and seed;
- audit: `audit/done.json` names the samples' marker and `audit/summary.json` reads as an audit summary;
- report: always rewritten (`report.html`, `DATASHEET.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contracts.audit_summary import read_audit_summary
from .contracts.base import load_json
from .contracts.card import read_card
from .engine.config import PipelineConfig, load_pipeline
from .errors import InputError
from .executor import ExecutorSpec
from .fileio import atomic_write_json
from .hashing import sha256_file

Say = Callable[[str], None]
_REDO = "a stage's done.json is written by guard run when the stage ends; remove it to redo that stage"


@dataclass
class RunSummary:
    run_dir: Path
    stages: dict[str, str] = field(default_factory=dict)  # stage → "done" | "skipped (...)"
    copies: int = 0
    files: dict[str, Path] = field(default_factory=dict)


def _executor(config: PipelineConfig) -> ExecutorSpec:
    """The pipeline's `executor` section as prepare and audit take it (checked: Ray installed, address)."""
    from .executor import executor_spec

    return executor_spec(config.executor.kind, config.executor.address)


def _prepare(config: PipelineConfig, ledger: Path | None, command: list[str], say: Say, sign_key: Path | None = None) -> str:
    from .curation.service import prepare_recorded
    from .policy import load_policy
    from .prepared import open_prepared

    if config.policy is None:
        raise InputError("the pipeline has no `policy`: guard run needs it to prepare the data")
    policy, data = Path(config.policy), Path(config.data)
    if (data / "card.json").is_file():
        card = read_card(data, hint="--data must be a directory written by guard prepare")
        if card.policy_sha256 != load_policy(policy).sha256:
            raise InputError(f"{data} was prepared from another version of {policy}",
                             hint="remove it (and the run trained on it) or point `data` elsewhere")
        open_prepared(data)
        return "skipped (prepared directory verified)"
    say(f"preparing {data} from {policy}")
    result = prepare_recorded(policy, data_root=None, out=data, workers=1, strict=False, overwrite=False, ledger=ledger,
                              command=[*command, "(prepare)"], executor=_executor(config), sign_key=sign_key)
    say(result.key_note)
    return "done"


def _train(config: PipelineConfig, ledger: Path | None, command: list[str], progress: Any, say: Say,
           allow_unrecorded: bool = False, sign_key: Path | None = None) -> str:
    from .engine.service import pipeline_of_run, train_recorded
    from .ledger import ledger_dir
    from .locations import project_of

    run_dir = Path(str(config.out))
    resume = (run_dir / "config.resolved.yaml").is_file()
    chosen = pipeline_of_run(run_dir, project=project_of(ledger_dir(ledger))) if resume else config
    say(f"{'resuming' if resume else 'training'} {chosen.method} in {run_dir}")
    outcome = train_recorded(chosen, resume=resume, ledger=ledger, command=[*command, "(train)"], progress=progress,
                             allow_unrecorded=allow_unrecorded, sign_key=sign_key)
    return f"done ({outcome.step} steps, {outcome.kimg:g} kimg)"


def _sample(config: PipelineConfig, ledger: Path | None, command: list[str], say: Say, sign_key: Path | None = None) -> str:
    from .engine.checkpoint import latest_checkpoint
    from .engine.service import sample_recorded

    run_dir, spec = Path(str(config.out)), config.sample
    weights = latest_checkpoint(run_dir)
    if weights is None:  # was a TypeError on `None / "ema.safetensors"`
        raise InputError(f"{run_dir}: no checkpoint yet", hint="the train stage writes it")
    marker = run_dir / "samples" / "done.json"
    wanted = {"weights": sha256_file(weights / "ema.safetensors"), "n": spec.n, "steps": spec.steps, "seed": spec.seed}
    if marker.is_file() and load_json(marker, hint=_REDO) == wanted:
        return "skipped (samples of these weights exist)"
    say(f"sampling {spec.n} images")
    sample_recorded(run_dir, ledger=ledger, command=[*command, "(sample)"], sign_key=sign_key, count=spec.n,
                    out=run_dir / "samples", steps=spec.steps, seed=spec.seed, batch=spec.batch,
                    overwrite=True)  # the run's own folder
    atomic_write_json(marker, wanted)
    return "done"


def _audit(config: PipelineConfig, ledger: Path | None, command: list[str], say: Say,
           sign_key: Path | None = None) -> tuple[str, int]:
    from .audit.config import resolve_audit_config
    from .audit.service import audit_recorded

    run_dir = Path(str(config.out))
    report, samples = run_dir / "audit", run_dir / "samples"
    marker, done = samples / "done.json", report / "done.json"
    if done.is_file() and marker.is_file():
        audited = load_json(done, hint=_REDO)
        copies = audited.get("copies")
        if not isinstance(audited.get("samples_marker"), str) or not isinstance(copies, int) or isinstance(copies, bool):
            raise InputError(f"{done}: expected samples_marker (sha256) and copies (integer), got {audited!r:.80}",
                             hint=_REDO)
        if audited["samples_marker"] == sha256_file(marker):
            read_audit_summary(report)  # the report the skipped stage stands on is there and intact
            return "skipped (this sample set is audited)", copies
    say("auditing the samples against the protected originals")
    config_path = Path(config.audit.config) if config.audit.config else None
    result = audit_recorded(samples=samples, data=Path(config.data), report=report,
                            config=resolve_audit_config(config_path, {}), config_path=config_path, ledger=ledger,
                            command=[*command, "(audit)"], executor=_executor(config), sign_key=sign_key)
    copies = int(result.counts.get("copy", 0))
    atomic_write_json(done, {"samples_marker": sha256_file(marker), "copies": copies})
    return "done", copies


def _report(config: PipelineConfig, ledger: Path) -> dict[str, Path]:
    from .compliance.datasheet import write_datasheet
    from .compliance.html import write_html
    from .compliance.tables import report_tables
    from .owner import owner_digest_key

    run_dir = Path(str(config.out))
    # guard run prepares the data, so it runs on the owner's side: the digest key prepare kept in the owner's folder
    # lets verify compare the manifest's keyed pixel digests (without it that check says ATTENTION)
    card = read_card(Path(config.data), hint="--data must be a directory written by guard prepare")
    html = write_html(run_dir / "report.html", ledger, report_tables(ledger, None),
                      digest_key=owner_digest_key(card.digest_key_id))
    sheet = write_datasheet(run_dir / "DATASHEET.md", run_dir, ledger)
    return {"report": html, "datasheet": sheet, "grid": run_dir / "samples" / "grid.png",
            "audit": run_dir / "audit" / "report.html"}


def run_pipeline(pipeline: Path, *, ledger: Path, command: list[str], progress: Any = None,
                 say: Say = print, allow_unrecorded: bool = False, sign_key: Path | None = None) -> RunSummary:
    """Run every stage of `pipeline` that is not already done; returns what happened and where to look.
    `sign_key` signs the ledger head each stage appends (ledger.py)."""
    config = load_pipeline(pipeline)
    summary = RunSummary(Path(str(config.out)))
    summary.stages["prepare"] = _prepare(config, ledger, command, say, sign_key)
    summary.stages["train"] = _train(config, ledger, command, progress, say, allow_unrecorded, sign_key)
    summary.stages["sample"] = _sample(config, ledger, command, say, sign_key)
    summary.stages["audit"], summary.copies = _audit(config, ledger, command, say, sign_key)
    summary.files = _report(config, ledger)
    summary.stages["report"] = "done"
    return summary
