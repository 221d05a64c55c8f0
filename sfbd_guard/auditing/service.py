"""`guard audit` as library calls: `run_audit` (the work) and `audit_recorded` (the same, plus a ledger event).

    from sfbd_guard.auditing import AuditConfig, run_audit
    result = run_audit(samples=Path("out"), data=Path("prepared/celeba-64"), report=Path("audit"),
                       config=AuditConfig())
    result.counts["copy"]  # 0 → nothing copied
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts.audit_summary import AuditSummary, write_audit_summary
from ..contracts.base import dump, validate
from ..embedding.embed import Embedder, PixelEmbedder
from ..embedding.ray_embed import embedder_session
from ..errors import GuardError
from ..executor import LOCAL, ExecutorSpec
from ..fileio import check_report_dir, report_dir
from ..hashing import fingerprint, sha256_file
from ..ledger import Artifact, current_head, ledger_dir, recorded
from ..progress import ProgressFactory
from ..rundir import AUDIT_FILES, AUDIT_TABLE, REPORT, SIMILARITY
from . import calibrate as cal
from .checks import Scores, background, score, verdicts
from .config import AuditConfig
from .html import Pair, evidence_links, histogram, render
from .images import LoadedImages, load_folder
from .index import InnerProductIndex
from .originals import (
    Holdout,
    PreparedInfo,
    holdout_from_dir,
    holdout_from_rules,
    holdout_from_splits,
    holdout_splits,
    load_protected,
    read_prepared,
)
from .reference import Reference, build, l2_size
from .results import samples_table, write_parquet
from .summary import build_summary

REPORT_FILES = AUDIT_FILES  # rundir.py: the audit report folder


@dataclass(frozen=True)
class AuditResult:
    report: Path
    summary: AuditSummary  # summary.json as written
    files: dict[str, Path]  # report file name → path

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.summary.counts)


def embedder_factory(config: AuditConfig, info: PreparedInfo) -> Callable[[], Embedder]:
    """What builds the audit's embedder: picklable, so Ray actors can build their own (ray_embed.py)."""
    if config.embedder_kind == "clip":
        from ..embedding.clip import ClipEmbedder, check_weights

        check_weights(config.embedder.clip_weights)  # missing weights: exit 2 here, before any actor starts
        return partial(ClipEmbedder, weights=config.embedder.clip_weights, model=config.embedder.clip_model,
                       quick_gelu=config.embedder.quick_gelu)
    return partial(PixelEmbedder, size=min(config.embedder.pixel_size, info.resolution), channels=info.channels)


def make_embedder(config: AuditConfig, info: PreparedInfo) -> Embedder:
    return embedder_factory(config, info)()


def find_holdout(info: PreparedInfo, config: AuditConfig, data_root: Path | None,
                 holdout_dir: Path | None) -> tuple[Holdout | None, str]:
    """The calibration images and, when there are none, why."""
    spec = config.calibration
    if holdout_dir is not None:
        found = holdout_from_dir(info, holdout_dir, limit=spec.max_holdout, seed=spec.seed)
        return found, "every --holdout image is a copy of a protected record"
    if spec.holdout == "none":
        return None, "calibration.holdout is none"
    rules = spec.holdout_rules or info.card.holdout_rules()  # the policy's `action: holdout` rules by default
    if rules:
        found = holdout_from_rules(info, data_root, rules, limit=spec.max_holdout, seed=spec.seed)
        return found, "the held-out rules matched no usable record"
    if not holdout_splits(info):
        split = info.card.split
        why = "uses every split" if split == "all" else "has no other split"
        return None, (f"the policy's dataset ({info.card.format}, split {split}) {why} and the policy has no "
                      "`action: holdout` rule; excluded records are never a holdout (opt-outs)")
    found = holdout_from_splits(info, data_root, limit=spec.max_holdout, seed=spec.seed)
    return found, "the other split(s) hold no usable image"


@dataclass
class _Context:
    """What scoring any set of images needs (built once per audit)."""

    info: PreparedInfo
    config: AuditConfig
    embedder: Embedder
    reference: Reference
    index: InnerProductIndex

    def score(self, pixels: np.ndarray) -> Scores:
        return score(pixels, embedder=self.embedder, index=self.index, reference_pixels=self.reference.pixels,
                     protected_sha256=set(self.info.protected_sha256), config=self.config,
                     l2_size=l2_size(self.config, self.info.resolution))


def _pairs(ctx: _Context, loaded: LoadedImages, scores: Scores, verdict: list[str], rules: list[list[str]],
           data_root: Path | None) -> tuple[list[Pair], str]:
    """The top matched pairs by s1, with originals for flagged ones (thumbnails on), hash-verified."""
    order = np.argsort(-scores.s1, kind="stable")[: ctx.config.report.pairs]
    names = [n for n, ok in zip(loaded.names, loaded.ok, strict=True) if ok]
    flagged = [int(scores.rows[i, 0]) for i in order if verdict[i] != "novel"]
    note = "flagged matches" if ctx.config.report.thumbnails else "off (--no-thumbnails)"
    originals: dict[int, np.ndarray] = {}
    if ctx.config.report.thumbnails:
        try:
            originals = load_protected(ctx.info, data_root, flagged)
        except GuardError as err:
            note = f"unavailable: {err}"
    pairs = []
    for i in order:
        row = int(scores.rows[i, 0])
        pairs.append(Pair(names[i], loaded.pixels[i], ctx.info.protected_ids[row] if row >= 0 else None,
                          originals.get(row) if verdict[i] != "novel" else None, float(scores.s1[i]),
                          float(scores.margin[i]), float(scores.l2_ratio[i]), verdict[i], rules[i], bool(scores.flipped[i]),
                          scores.transform[i] if scores.transform else "identity"))
    return pairs, note


def _calibrate(ctx: _Context, data_root: Path | None, holdout_dir: Path | None) -> tuple[cal.Calibration, np.ndarray]:
    holdout, reason = find_holdout(ctx.info, ctx.config, data_root, holdout_dir)
    if holdout is None:
        return cal.uncalibrated(ctx.config, ctx.embedder.kind, reason), np.zeros(0, np.float32)
    held, dropped = ctx.score(holdout.pixels), dict(holdout.dropped)
    if held.hash_match.any():  # exact copies under the transforms too, as the samples' hash rule sees them
        dropped["copy_of_protected"] = dropped.get("copy_of_protected", 0) + int(held.hash_match.sum())
        if held.hash_match.all():
            return cal.uncalibrated(ctx.config, ctx.embedder.kind, "every holdout image is a copy of a protected "
                                    "record"), np.zeros(0, np.float32)
        held = held.take(~held.hash_match)
    return cal.calibrated(ctx.config, ctx.embedder.kind, held, holdout.source, dropped), held.s1


def _write(report: Path, table: Any, summary: AuditSummary, page: str, figure: Any) -> dict[str, Path]:

    from ..fileio import atomic_write_bytes

    report_dir(report, "--out")  # report.html may hold thumbnails of protected originals: owner-only
    files = {name: report / name for name in REPORT_FILES}
    write_parquet(files[AUDIT_TABLE], table)
    write_audit_summary(report, summary)
    atomic_write_bytes(files[REPORT], page.encode())
    picture = io.BytesIO()
    figure.save(picture, format="PNG")  # the similarity histogram, also as a picture of its own
    atomic_write_bytes(files[SIMILARITY], picture.getvalue())
    return files


def _context(info: PreparedInfo, config: AuditConfig, data_root: Path | None,
             progress: ProgressFactory | None, embedder: Embedder) -> _Context:
    """The reference set (built from verified originals, or cached) and its index."""
    label = f"protected originals ({embedder.kind})"
    reference = build(info, embedder, config, data_root, (lambda total: progress(label, total)) if progress else None)
    index = InnerProductIndex(reference.embeddings, config.search, reference.ivf(config.search.exact_limit))
    return _Context(info, config, embedder, reference, index)


def _report(ctx: _Context, samples: Path, report: Path, loaded: LoadedImages, scores: Scores,
            calibration: cal.Calibration, holdout_s1: np.ndarray, data_root: Path | None,
            clock: dict[str, float], ledger_head: dict[str, Any] | None = None) -> AuditResult:
    """Verdicts, then samples.parquet, summary.json and report.html."""
    mark = time.perf_counter()
    verdict, rules = verdicts(scores, calibration.thresholds)
    pairs, thumbs = _pairs(ctx, loaded, scores, verdict, rules, data_root)
    digests = [_file_sha256(samples / name) for name in loaded.names]
    table = samples_table(loaded.names, loaded.ok, loaded.sizes, digests, loaded.errors, scores, verdict, rules,
                          ctx.info.protected_ids)
    summary = build_summary(
        samples=samples, samples_fingerprint=fingerprint({n: d or "" for n, d in zip(loaded.names, digests, strict=True)}),
        info=ctx.info, config=ctx.config, embedder=ctx.embedder, index=ctx.index, reference=ctx.reference,
        calibration=calibration, scores=scores, verdicts=verdict, rules=rules, errors=len(loaded.errors),
        names=[n for n, ok in zip(loaded.names, loaded.ok, strict=True) if ok], holdout_s1=holdout_s1,
        background_s1=background(ctx.index, ctx.reference.embeddings, seed=ctx.config.calibration.seed),
        thumbnails=thumbs, timings=clock)
    summary["ledger_head"] = ledger_head  # the ledger's head when the audit began (compliance/tamper.py)
    summary["skipped"] = dict(loaded.skipped)  # files not audited and why (only a verified sample grid)
    th = calibration.thresholds
    figure = histogram({"samples": scores.s1, "holdout": holdout_s1}, {"copy": th.copy, "suspect": th.suspect})
    clock["report"] = time.perf_counter() - mark
    summary["timings"] = {k: round(v, 3) for k, v in {**clock, "total": sum(clock.values())}.items()}
    contract = validate(AuditSummary, summary, source="audit summary.json")  # a bug if it does not fit
    ok_names = [n for n, ok in zip(loaded.names, loaded.ok, strict=True) if ok]
    flagged = [(ok_names[i], verdict[i], ctx.info.protected_ids[int(scores.rows[i, 0])] if scores.rows[i, 0] >= 0 else None)
               for i in np.argsort(-scores.s1, kind="stable") if verdict[i] != "novel"]
    evidence = evidence_links(report, samples, [name for name, _, _ in flagged])
    page = render(contract, pairs, ctx.config.report.thumb_size, evidence, flagged)
    files = _write(report, table, contract, page, figure)
    return AuditResult(report, contract, files)


def run_audit(*, samples: Path, data: Path, report: Path, config: AuditConfig, data_root: Path | None = None,
              holdout_dir: Path | None = None, progress: ProgressFactory | None = None,
              executor: ExecutorSpec = LOCAL, ledger_head: dict[str, Any] | None = None) -> AuditResult:
    """Score every image under `samples` against the protected originals of `data`; write the report.

    Bad input (no images, not a prepared directory, missing weights, changed originals) raises an
    InputError (exit 2 in the CLI) or, for originals that changed, a VerificationError (exit 1); `result.counts["copy"]`
    decides exit 0 or 3.
    `executor` ray: the embeddings are computed by Ray actors (ray_embed.py), with the same results.
    """
    check_report_dir(report, "--out")  # before any work: a folder others can read is refused
    started = time.perf_counter()
    info = read_prepared(data)
    loaded = load_folder(samples, info.resolution, info.channels)
    clock = {"read_samples": time.perf_counter() - started}
    with embedder_session(embedder_factory(config, info), executor) as embedder:
        ctx = _context(info, config, data_root, progress, embedder)
        clock["reference"] = ctx.reference.seconds
        mark = time.perf_counter()
        scores = ctx.score(loaded.pixels)
        clock["score_samples"] = time.perf_counter() - mark
        mark = time.perf_counter()
        calibration, holdout_s1 = _calibrate(ctx, data_root, holdout_dir)
        clock["calibration"] = time.perf_counter() - mark
    return _report(ctx, samples, report, loaded, scores, calibration, holdout_s1, data_root, clock, ledger_head)


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def audit_recorded(*, samples: Path, data: Path, report: Path, config: AuditConfig, config_path: Path | None,
                   ledger: Path | None, command: list[str], data_root: Path | None = None,
                   holdout_dir: Path | None = None, progress: ProgressFactory | None = None,
                   executor: ExecutorSpec = LOCAL, sign_key: Path | None = None) -> AuditResult:
    """`run_audit` plus an `audit` ledger event (ok or failed): inputs, report files with sha256, summary.
    `sign_key` signs the ledger head the event makes; summary.json records the head before it."""
    where = ledger_dir(ledger)
    with recorded(where, "audit", command, sign_key) as event:
        event.inputs.append(Artifact("samples", str(samples.resolve()), None))
        if config_path is not None:
            event.inputs.append(Artifact("audit_config", str(config_path.resolve()), sha256_file(config_path)))
        result = run_audit(samples=samples, data=data, report=report, config=config, data_root=data_root,
                           holdout_dir=holdout_dir, progress=progress, executor=executor,
                           ledger_head=current_head(where).as_dict())
        summary = result.summary
        event.inputs[0] = Artifact("samples", summary.samples, summary.samples_fingerprint)
        event.inputs.append(Artifact("prepared", summary.prepared.path, summary.prepared.fingerprint))
        if holdout_dir is not None:
            event.inputs.append(Artifact("holdout", str(holdout_dir.resolve()), None))
        event.outputs.extend(Artifact(name, str(path.resolve()), sha256_file(path)) for name, path in result.files.items())
        th = summary.thresholds
        event.summary.update(  # contracts/events.py AuditEventSummary
            counts=dict(summary.counts), flagged=dump(summary.flagged),
            thresholds={"copy": th.copy_, "suspect": th.suspect, "ratio": th.ratio, "method": th.method,
                        "expected_fpr": dict(th.expected_fpr)},
            embedder=dump(summary.embedder), index=summary.index.kind, references=summary.references)
        return result


__all__ = ["AuditResult", "audit_recorded", "run_audit"]
