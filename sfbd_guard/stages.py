"""`guard run pipelines/<name>.yaml`: prepare → train → sample → audit → report, resumable.

Every stage has one contract: `done()` says why its finished output can stand (or None: run it), `run()`
does the work and says what it did. A stage is skipped when its output is already there and valid, so
re-running after a crash (or after the run finished) continues where it stopped:
- prepare: the prepared directory exists, was made from this exact policy file, and verifies;
- train: never skipped here: a run directory with a resolved config is resumed, a finished run returns at once;
- sample: `samples/done.json` names the same weights, count, steps and seed;
- audit: `audit/done.json` names the samples' marker and `audit/summary.json` reads as an audit summary;
- report: always rewritten (`report.html`, `DATASHEET.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .contracts.audit_summary import read_audit_summary
from .contracts.base import load_json
from .engine.config import PipelineConfig, load_pipeline
from .errors import InputError
from .executor import ExecutorSpec, executor_spec
from .fileio import atomic_write_json
from .hashing import sha256_file
from .keys.owner import owner_digest_key
from .locations import project_of
from .prepared.card import read_card
from .prepared.layout import PreparedPaths
from .rundir import DONE, GRID, REPORT, RunPaths

Say = Callable[[str], None]
_REDO = "a stage's done.json is written by guard run when the stage ends; remove it to redo that stage"


@dataclass
class RunSummary:
    run_dir: Path
    stages: dict[str, str] = field(default_factory=dict)  # stage → "done ..." | "skipped (...)"
    copies: int = 0
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What every stage of one `guard run` shares."""

    config: PipelineConfig
    ledger: Path
    command: list[str]
    say: Say
    progress: Any = None
    allow_unrecorded: bool = False
    sign_key: Path | None = None

    @property
    def run(self) -> RunPaths:
        return RunPaths(Path(str(self.config.out)))

    @property
    def data(self) -> Path:
        return Path(self.config.data)

    def executor(self) -> ExecutorSpec:
        """The pipeline's `executor` section as prepare and audit take it (checked: Ray installed, address)."""

        return executor_spec(self.config.executor.kind, self.config.executor.address)

    def invocation(self, stage: str) -> list[str]:
        return [*self.command, f"({stage})"]


class Stage(Protocol):
    name: str

    def done(self, ctx: Context) -> str | None:
        """Why the stage's finished output can stand ("skipped (...)"), or None when the stage must run."""

    def run(self, ctx: Context, summary: RunSummary) -> str:
        """Do the stage's work; what it did ("done ...")."""


class Prepare:
    name = "prepare"

    def done(self, ctx: Context) -> str | None:
        from .policy.model import load_policy
        from .prepared.reader import open_prepared

        if ctx.config.policy is None:
            raise InputError("the pipeline has no `policy`: guard run needs it to prepare the data")
        if not PreparedPaths(ctx.data).card.is_file():
            return None
        card = read_card(ctx.data, hint="--data must be a directory written by guard prepare")
        policy = Path(ctx.config.policy)
        if card.policy_sha256 != load_policy(policy).sha256:
            raise InputError(f"{ctx.data} was prepared from another version of {policy}",
                             hint="remove it (and the run trained on it) or point `data` elsewhere")
        if card.policy_overrides:  # guard run applies the policy file as it is
            raise InputError(f"{ctx.data} was prepared from {policy} with --set {card.policy_overrides}",
                             hint="remove it (and the run trained on it), put the values in the policy file, or "
                                  "point `data` elsewhere")
        open_prepared(ctx.data)
        return "skipped (prepared directory verified)"

    def run(self, ctx: Context, summary: RunSummary) -> str:
        from .curation.service import prepare_recorded

        policy = Path(str(ctx.config.policy))
        ctx.say(f"preparing {ctx.data} from {policy}")
        result = prepare_recorded(policy, data_root=None, out=ctx.data, workers=1, strict=False, overwrite=False,
                                  ledger=ctx.ledger, command=ctx.invocation(self.name), executor=ctx.executor(),
                                  sign_key=ctx.sign_key)
        ctx.say(result.key_note)
        return "done"


class Train:
    name = "train"

    def done(self, ctx: Context) -> str | None:
        return None  # a finished run is resumed and returns at once: training knows where it stopped

    def run(self, ctx: Context, summary: RunSummary) -> str:
        from .engine.service import pipeline_of_run, train_recorded

        resume = ctx.run.resolved.is_file()
        chosen = pipeline_of_run(ctx.run.root, project=project_of(ctx.ledger)) if resume else ctx.config
        ctx.say(f"{'resuming' if resume else 'training'} {chosen.method} in {ctx.run.root}")
        if chosen.tracker != ctx.config.tracker:
            ctx.say(f"note: the run continues with the tracker it started with ({chosen.tracker})")
        outcome = train_recorded(chosen, resume=resume, ledger=ctx.ledger, command=ctx.invocation(self.name),
                                 progress=ctx.progress, allow_unrecorded=ctx.allow_unrecorded, sign_key=ctx.sign_key)
        return f"done ({outcome.step} steps, {outcome.kimg:g} kimg)"


class Sample:
    name = "sample"

    def _wanted(self, ctx: Context) -> dict[str, Any]:
        from .engine.checkpoint import latest_checkpoint

        weights = latest_checkpoint(ctx.run.root)
        if weights is None:  # the train stage ended before its first checkpoint
            raise InputError(f"{ctx.run.root}: no checkpoint yet", hint="the train stage writes it")
        spec = ctx.config.sample
        return {"weights": sha256_file(weights / "ema.safetensors"), "n": spec.n, "steps": spec.steps, "seed": spec.seed}

    def done(self, ctx: Context) -> str | None:
        marker = ctx.run.samples / DONE
        if marker.is_file() and load_json(marker, hint=_REDO) == self._wanted(ctx):
            return "skipped (samples of these weights exist)"
        return None

    def run(self, ctx: Context, summary: RunSummary) -> str:
        from .engine.service import sample_recorded

        wanted, spec = self._wanted(ctx), ctx.config.sample
        ctx.say(f"sampling {spec.n} images")
        sample_recorded(ctx.run.root, ledger=ctx.ledger, command=ctx.invocation(self.name), sign_key=ctx.sign_key,
                        count=spec.n, out=ctx.run.samples, steps=spec.steps, seed=spec.seed, batch=spec.batch,
                        overwrite=True)  # the run's own folder
        atomic_write_json(ctx.run.samples / DONE, wanted)
        return "done"


class Audit:
    name = "audit"

    def done(self, ctx: Context) -> str | None:
        marker, done = ctx.run.samples / DONE, ctx.run.audit / DONE
        if not (done.is_file() and marker.is_file()):
            return None
        audited = load_json(done, hint=_REDO)
        copies = audited.get("copies")
        if not isinstance(audited.get("samples_marker"), str) or not isinstance(copies, int) or isinstance(copies, bool):
            raise InputError(f"{done}: expected samples_marker (sha256) and copies (integer), got {audited!r:.80}",
                             hint=_REDO)
        if audited["samples_marker"] != sha256_file(marker):
            return None
        read_audit_summary(ctx.run.audit)  # the report the skipped stage stands on is there and intact
        return "skipped (this sample set is audited)"

    def run(self, ctx: Context, summary: RunSummary) -> str:
        from .auditing.config import resolve_audit_config
        from .auditing.service import audit_recorded
        from .engine.service import pipeline_of_run
        from .engine.trackers import log_audit

        ctx.say("auditing the samples against the protected originals")
        config_path = Path(ctx.config.audit.config) if ctx.config.audit.config else None
        result = audit_recorded(samples=ctx.run.samples, data=ctx.data, report=ctx.run.audit,
                                config=resolve_audit_config(config_path, {}), config_path=config_path, ledger=ctx.ledger,
                                command=ctx.invocation(self.name), executor=ctx.executor(), sign_key=ctx.sign_key)
        atomic_write_json(ctx.run.audit / DONE, {"samples_marker": sha256_file(ctx.run.samples / DONE),
                                                 "copies": int(result.counts.get("copy", 0))})
        log_audit(pipeline_of_run(ctx.run.root), ctx.run.root, result.counts)  # into the run's tracker, if it has one
        return "done"


class Report:
    name = "report"

    def done(self, ctx: Context) -> str | None:
        return None  # always rewritten: the ledger has grown

    def run(self, ctx: Context, summary: RunSummary) -> str:
        from .compliance.datasheet import write_datasheet
        from .compliance.html import write_html
        from .compliance.tables import report_tables

        # guard run prepares the data, so it runs on the owner's side: the digest key prepare kept in the owner's
        # folder lets verify compare the manifest's keyed pixel digests (without it that check says ATTENTION)
        card = read_card(ctx.data, hint="--data must be a directory written by guard prepare")
        html = write_html(ctx.run.report, ctx.ledger, report_tables(ctx.ledger, None),
                          digest_key=owner_digest_key(card.digest_key_id))
        sheet = write_datasheet(ctx.run.datasheet, ctx.run.root, ctx.ledger)
        summary.files = {"report": html, "datasheet": sheet, "grid": ctx.run.samples / GRID,
                         "audit": ctx.run.audit / REPORT}
        return "done"


STAGES: tuple[Stage, ...] = (Prepare(), Train(), Sample(), Audit(), Report())


def run_pipeline(pipeline: Path, *, ledger: Path, command: list[str], progress: Any = None,
                 say: Say = print, allow_unrecorded: bool = False, sign_key: Path | None = None,
                 overrides: dict[str, Any] | None = None) -> RunSummary:
    """Run every stage of `pipeline` that is not already done; returns what happened and where to look.
    `sign_key` signs the ledger head each stage appends (ledger.py); `overrides` ({'a.b': value}) replace keys of
    the pipeline (a resumed training keeps its saved config)."""
    ctx = Context(load_pipeline(pipeline, overrides), ledger, command, say, progress, allow_unrecorded, sign_key)
    summary = RunSummary(ctx.run.root)
    for stage in STAGES:
        summary.stages[stage.name] = stage.done(ctx) or stage.run(ctx, summary)
    audited = ctx.run.audit / DONE
    summary.copies = int(load_json(audited, hint=_REDO)["copies"]) if audited.is_file() else 0
    return summary
