"""`guard membership`: does the trained model remember what it never saw clean? (auditing/membership.py scores)

Run on the data owner's side: it reads the protected originals, as the sample audit does. Three groups of images:
- clean: records the model trained on as they are (the test's power: a model that memorises them shows it here);
- protected: records the model saw only as noisy copies (the claim under test);
- holdout: records never trained on (the policy's `action: holdout` rules, else the dataset's other splits, or
  `--holdout DIR`), the negatives of both comparisons.
Each group is capped at `membership.max_images` (a seeded subset). A control model that never trained on the
protected group (`--control RUN`, e.g. the clean-only run of the same prepared data) gets the same test on the same
images, so a difference between the groups that is there without training (selection) is not read as memorisation.

    from sfbd_guard.auditing.model_audit import run_membership
    result = run_membership(run=Path("runs/sfbd"), report=Path("membership"), config=AuditConfig())
    result.summary.verdict  # PASS or ATTENTION
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..charts import line_chart
from ..contracts.base import dump
from ..contracts.membership import GroupResult, MembershipSummary, ModelRef, Result, write_membership_summary
from ..contracts.run_record import LedgerHead
from ..errors import InputError
from ..executor import LOCAL, ExecutorSpec
from ..fileio import atomic_write_bytes, check_report_dir, report_dir
from ..hashing import seeded_subset, sha256_bytes, sha256_file
from ..ledger import Artifact, current_head, ledger_dir, recorded
from ..progress import ProgressFactory
from ..rundir import (
    MEMBERSHIP_FILES,
    MEMBERSHIP_PAGE,
    MEMBERSHIP_PARTIAL,
    MEMBERSHIP_ROC,
    MEMBERSHIP_SCORES,
    MEMBERSHIP_SUMMARY,
)
from ..templating import markup, render
from .config import AuditConfig, MembershipSpec
from .membership import Comparison, Progress, common_noise, compare, distinguishable, membership_score, power_words
from .membership_workers import Errors, error_session
from .originals import PreparedInfo, load_protected, read_prepared

PARTIAL = MEMBERSHIP_PARTIAL
RESUME_UNIT_BATCHES = 16  # batches per resumable unit (kept under .partial/ as it is made)
SCORE = "minus the mean over noise levels of the log mean-squared denoising error (common random numbers)"
CLEAN_CONTROL = ("none: every clean record trained the model, and a model trained without them (e.g. on the other half "
                 "of the clean set) is not part of a run; read the clean group's AUC as the test's power, not as a leak")


@dataclass(frozen=True)
class Group:
    name: str  # clean, protected, holdout
    record_ids: list[str]
    pixels: np.ndarray  # uint8 (n, C, H, W)


@dataclass(frozen=True)
class MembershipResult:
    report: Path
    summary: MembershipSummary
    files: dict[str, Path]


@dataclass(frozen=True)
class _Model:
    net: Any
    ref: ModelRef


def _load_model(run: Path, info: PreparedInfo, what: str, other_data: bool = False) -> _Model:
    """The run's EMA network; refused unless it was trained on this prepared directory (or `other_data`)."""
    from ..contracts.run_record import read_run_record
    from ..engine.service import load_ema_net, pipeline_of_run

    record = read_run_record(run)
    if record.data_fingerprint != info.fingerprint and not other_data:
        raise InputError(f"{what} {run}: trained on prepared data {record.data_fingerprint[:12]}, not on --data "
                         f"{info.root} ({info.fingerprint[:12]})", hint="test a model against the data it was trained on")
    net, weights, shape = load_ema_net(run, device="cpu")
    if shape != (info.channels, info.resolution, info.resolution):
        raise InputError(f"{what} {run}: makes {shape} images, the prepared data holds "
                         f"{(info.channels, info.resolution, info.resolution)}")
    method = pipeline_of_run(run).method
    return _Model(net, ModelRef(run=str(run.resolve()), checkpoint=str(weights.resolve()), sha256=sha256_file(weights),
                                method=method))


def _groups(info: PreparedInfo, config: AuditConfig, data_root: Path | None,
            holdout_dir: Path | None) -> tuple[dict[str, Group], str]:
    """The clean, protected and holdout images, each at most `max_images` (seeded subsets)."""
    from ..prepared.reader import open_prepared
    from .service import find_holdout

    spec = config.membership
    data = open_prepared(info.root)  # the clean partition as trained on (its shards verified)
    clean_ids = data.clean.record_ids
    chosen = seeded_subset(clean_ids, spec.max_images, spec.seed)
    index = {rid: i for i, rid in enumerate(clean_ids)}
    clean_rows = np.asarray([index[rid] for rid in chosen], dtype=np.int64)
    clean = Group("clean", chosen, data.clean.pixels.take(clean_rows) if len(clean_rows) else
                  np.zeros((0, info.channels, info.resolution, info.resolution), np.uint8))
    protected_chosen = seeded_subset(info.protected_ids, spec.max_images, spec.seed)
    where = {rid: i for i, rid in enumerate(info.protected_ids)}
    rows = [where[rid] for rid in protected_chosen]
    loaded = load_protected(info, data_root, rows)  # each checked against the sha256 recorded at prepare time
    protected = Group("protected", protected_chosen, np.stack([loaded[r] for r in rows]))
    found, why = find_holdout(info, config, data_root, holdout_dir)
    if found is None:
        raise InputError(f"--data {info.root}: no holdout images to compare with: {why}",
                         hint="add an `action: holdout` rule to the policy (guard prepare again), or pass --holdout DIR")
    held = found.pixels
    if len(held) > spec.max_images:
        keep = seeded_subset([str(i) for i in range(len(held))], spec.max_images, spec.seed)
        held = held[np.asarray(sorted(int(k) for k in keep))]
    if len(held) < spec.min_holdout:
        raise InputError(f"holdout ({found.source}): {len(held)} images, fewer than membership.min_holdout "
                         f"({spec.min_holdout}): too few to tell anything from chance",
                         hint="hold out more records (a larger `action: holdout` sample), or pass --holdout DIR")
    holdout = Group("holdout", [f"holdout-{i}" for i in range(len(held))], held)
    return {"clean": clean, "protected": protected, "holdout": holdout}, found.source


def _resumable(errors: Errors, pixels: np.ndarray, progress: Progress | None, folder: Path, unit: int) -> np.ndarray:
    """`errors(pixels)` a unit of rows at a time, each unit's result kept in `folder` as it is made, so a test that
    was interrupted goes on where it stopped (units are whole batches: the same numbers as in one go)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, start in enumerate(range(0, len(pixels), unit)):
        rows = pixels[start : start + unit]
        done = folder / f"{k:06d}.npy"
        part = None
        if done.is_file():
            try:
                part = np.load(done, allow_pickle=False)
            except (OSError, ValueError):
                part = None
            if part is not None and part.shape[0] != len(rows):
                part = None
            if part is not None and progress:
                progress(len(rows))
        if part is None:
            part = errors(rows, progress)
            staging = folder / f".{k:06d}.partial.npy"
            np.save(staging, part)
            staging.replace(done)
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float64)


def _errors(model: _Model, groups: dict[str, Group], spec: MembershipSpec, noise: np.ndarray,
            progress: ProgressFactory | None, label: str, executor: ExecutorSpec, partial: Path) -> dict[str, np.ndarray]:
    """Each group's denoising errors under `model`; units already computed by an interrupted test (under `partial`,
    keyed by the weights, the settings and the group's pixels) are taken as they are."""
    total = sum(len(g.pixels) for g in groups.values())
    tick = progress(f"membership: denoising errors ({label})", total) if progress else None
    settings = json.dumps([model.ref.sha256, spec.sigmas, spec.draws, spec.seed, spec.batch])
    with error_session(model.net, Path(model.ref.run), Path(model.ref.checkpoint), spec.sigmas, noise, spec.batch,
                       executor, spec.workers) as errors:
        found = {}
        for name, group in groups.items():
            key = sha256_bytes(settings.encode() + group.pixels.tobytes())[:24]
            found[name] = _resumable(errors, group.pixels, tick, partial / f"{label}-{name}-{key}",
                                     spec.batch * RESUME_UNIT_BATCHES)
        return found


def _result(c: Comparison) -> Result:
    return Result(auc=round(c.auc, 6), auc_ci95=[round(v, 6) for v in c.auc_ci95], tpr_at_1pct_fpr=round(c.tpr, 6),
                  tpr_ci95=[round(v, 6) for v in c.tpr_ci95])


def group_results(scores: dict[tuple[str, str], np.ndarray], spec: MembershipSpec, control_note: str,
                  ) -> list[GroupResult]:
    """Each trained-on group against the holdout, from the per-image scores keyed (model, group): the numbers of
    membership.json, the same whether computed at the test or recomputed from membership.parquet."""
    results = []
    for group in ("clean", "protected"):
        members, others = scores.get(("model", group), np.zeros(0)), scores[("model", "holdout")]
        if not len(members):  # a policy without clean records: no power group
            continue
        control = None
        if group == "protected" and ("control", group) in scores:
            control = (scores[("control", group)], scores[("control", "holdout")])
        main, base = compare(members, others, resamples=spec.bootstrap, seed=spec.seed, control=control)
        note = CLEAN_CONTROL if group == "clean" else control_note
        results.append(GroupResult(
            group=group, images=len(members), holdout_images=len(others), model=_result(main),
            control=_result(base) if base is not None else None,
            difference_ci95=[round(v, 6) for v in main.difference_ci95] if main.difference_ci95 else None,
            control_note=note, distinguishable=distinguishable(main, spec.margin),
            power=power_words(len(members), len(others))))
    return results


def _span(interval: list[float]) -> str:
    return f"{interval[0]:.3f}–{interval[1]:.3f}"


def _verdict(groups: list[GroupResult], margin: float) -> tuple[str, str]:
    protected = next(g for g in groups if g.group == "protected")
    if protected.distinguishable:
        how = (f"the paired 95 % interval of AUC(model) − AUC(control), {_span(protected.difference_ci95)}, lies above "
               f"{margin}" if protected.difference_ci95 else
               f"its AUC's 95 % interval, {_span(protected.model.auc_ci95)}, lies above {0.5 + margin}")
        return "ATTENTION", f"the protected images are told apart from the holdout: {how}"
    return "PASS", (f"the protected images are not told apart from the holdout beyond the margin {margin} "
                    f"(AUC {protected.model.auc:.3f}, 95 % interval {_span(protected.model.auc_ci95)})")


def holdout_words(source: str) -> str:
    """Where the holdout came from, for a reader."""
    kind, _, what = source.partition(":")
    return {"rules": f"the records of the policy's holdout rule(s) {what}", "split": f"the dataset's other split(s) {what}",
            "dir": f"the images in {what}"}.get(kind, source)


def _table(groups: dict[str, Group], errors: dict[tuple[str, str], np.ndarray]) -> Any:
    import pyarrow as pa

    rows: dict[str, list[Any]] = {"model": [], "group": [], "record_id": [], "errors": [], "score": []}
    for (model, name), values in errors.items():
        scores = membership_score(values)
        rows["model"] += [model] * len(values)
        rows["group"] += [name] * len(values)
        rows["record_id"] += groups[name].record_ids
        rows["errors"] += values.tolist()
        rows["score"] += scores.tolist()
    return pa.table(rows)


def scores_of(table: Any) -> dict[tuple[str, str], np.ndarray]:
    """membership.parquet's scores keyed (model, group), in file order."""
    found: dict[tuple[str, str], list[float]] = {}
    for model, group, score in zip(table.column("model").to_pylist(), table.column("group").to_pylist(),
                                   table.column("score").to_pylist(), strict=True):
        found.setdefault((model, group), []).append(score)
    return {key: np.asarray(values, dtype=np.float64) for key, values in found.items()}


def roc_points(members: np.ndarray, others: np.ndarray) -> list[tuple[float, float]]:
    """(FPR, TPR) of every threshold, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    points = [(0.0, 0.0)] + [(float((others >= t).mean()), float((members >= t).mean())) for t in thresholds]
    return points if points[-1] == (1.0, 1.0) else [*points, (1.0, 1.0)]


def _page(summary: MembershipSummary, scores: dict[tuple[str, str], np.ndarray]) -> tuple[str, str]:
    series: dict[str, list[tuple[float, float]]] = {}
    for (model, group) in (("model", "clean"), ("model", "protected"), ("control", "protected")):
        if (model, group) in scores and len(scores[(model, group)]):
            label = f"{group} ({'this model' if model == 'model' else 'control model'})"
            series[label] = roc_points(scores[(model, group)], scores[(model, "holdout")])
    series["chance"] = [(0.0, 0.0), (1.0, 1.0)]
    svg = line_chart(series, xlabel="false-positive rate (holdout images called members)",
                     ylabel="true-positive rate", title="membership ROC against the holdout")
    page = render("sfbd_guard.auditing", "membership.html.j2", s=summary, roc=markup(svg),
                  holdout=holdout_words(summary.holdout_source))
    return page, svg


def run_membership(*, run: Path, report: Path, config: AuditConfig, data: Path | None = None,
                   control: Path | None = None, data_root: Path | None = None, holdout_dir: Path | None = None,
                   progress: ProgressFactory | None = None, ledger_head: dict[str, Any] | None = None,
                   executor: ExecutorSpec = LOCAL, other_data: bool = False) -> MembershipResult:
    """The membership test of `run`'s EMA model (and of `control`'s on the same images); writes the report.
    `executor` ray: the denoising errors are computed by Ray actors (membership_workers.py), with the same results.
    `other_data`: test a model trained on another prepared directory against this one's groups (a benchmark's positive
    control: a model trained on the protected originals themselves); the CLI never sets it."""
    from ..engine.service import pipeline_of_run

    check_report_dir(report, "--out")
    started = time.perf_counter()
    spec = config.membership
    prepared = data if data is not None else Path(str(pipeline_of_run(run).data))
    info = read_prepared(prepared)
    model = _load_model(run, info, "--run", other_data)
    control_model = _load_model(control, info, "--control") if control is not None else None
    if control_model is not None and control_model.ref.method != "clean-only":
        raise InputError(f"--control {control}: a {control_model.ref.method} run trained on the protected copies; the "
                         "control must never have seen them", hint="pass the clean-only run of the same prepared data")
    groups, holdout_source = _groups(info, config, data_root, holdout_dir)
    noise = common_noise((info.channels, info.resolution, info.resolution), len(spec.sigmas), spec.draws, spec.seed)
    report_dir(report, "--out")  # per-image scores of protected records: owner-only, as the sample audit's report
    partial = report / PARTIAL
    errors = {("model", name): values
              for name, values in _errors(model, groups, spec, noise, progress, "model", executor, partial).items()}
    if control_model is not None:
        errors.update({("control", name): values for name, values in
                       _errors(control_model, groups, spec, noise, progress, "control", executor, partial).items()})
    table = _table(groups, errors)
    scores = scores_of(table)
    control_note = (f"the {control_model.ref.method} run {control_model.ref.run} (never saw the protected copies)"
                    if control_model else "none given (--control RUN: the clean-only run of the same data)")
    results = group_results(scores, spec, control_note)
    verdict, reason = _verdict(results, spec.margin)

    import pyarrow.parquet as pq

    files = {name: report / name for name in MEMBERSHIP_FILES}
    staging = files[MEMBERSHIP_SCORES].with_name(f".{MEMBERSHIP_SCORES}.partial")
    pq.write_table(table, staging)
    staging.replace(files[MEMBERSHIP_SCORES])
    summary = MembershipSummary(
        model=model.ref, control=control_model.ref if control_model else None, prepared=str(info.root),
        prepared_fingerprint=info.fingerprint, holdout_source=holdout_source, score=SCORE, sigmas=list(spec.sigmas),
        draws=spec.draws, seed=spec.seed, bootstrap=spec.bootstrap, margin=spec.margin, max_images=spec.max_images,
        groups=results, verdict=verdict, verdict_reason=reason,  # type: ignore[arg-type]
        scores_sha256=sha256_file(files[MEMBERSHIP_SCORES]),
        ledger_head=LedgerHead.model_validate(ledger_head) if ledger_head is not None else None,
        seconds=round(time.perf_counter() - started, 3))
    page, svg = _page(summary, scores)
    atomic_write_bytes(files[MEMBERSHIP_ROC], svg.encode())
    atomic_write_bytes(files[MEMBERSHIP_PAGE], page.encode())
    write_membership_summary(report, summary)
    shutil.rmtree(partial, ignore_errors=True)
    return MembershipResult(report, summary, files)


def recompute(report: Path) -> list[str]:
    """Every number of membership.json recomputed from membership.parquet (whose sha256 it names); the problems."""
    import pyarrow.parquet as pq

    from ..contracts.membership import read_membership_summary

    summary = read_membership_summary(report)
    path = report / MEMBERSHIP_SCORES
    if not path.is_file():
        return [f"{path}: missing"]
    if sha256_file(path) != summary.scores_sha256:
        return [f"{path}: its sha256 is not the one {MEMBERSHIP_SUMMARY} names"]
    scores = scores_of(pq.read_table(path))
    if not all(np.isfinite(values).all() for values in scores.values()):
        return [f"{path}: a score is not finite"]
    spec = MembershipSpec(sigmas=summary.sigmas, draws=summary.draws, seed=summary.seed, bootstrap=summary.bootstrap,
                          margin=summary.margin, max_images=summary.max_images)
    notes = {g.group: g.control_note for g in summary.groups}
    again = group_results(scores, spec, notes.get("protected", ""))
    problems = [f"{MEMBERSHIP_SUMMARY}: group {stated.group} says {dump(stated)}, its scores give {dump(computed)}"
                for stated, computed in zip(summary.groups, again, strict=False) if dump(stated) != dump(computed)]
    if len(again) != len(summary.groups):
        problems.append(f"{MEMBERSHIP_SUMMARY}: {len(summary.groups)} groups, its scores give {len(again)}")
    verdict, _ = _verdict(again, summary.margin)
    if verdict != summary.verdict:
        problems.append(f"{MEMBERSHIP_SUMMARY}: verdict {summary.verdict}, its scores give {verdict}")
    return problems


def membership_recorded(*, run: Path, report: Path, config: AuditConfig, ledger: Path | None, command: list[str],
                        data: Path | None = None, control: Path | None = None, data_root: Path | None = None,
                        holdout_dir: Path | None = None, progress: ProgressFactory | None = None,
                        sign_key: Path | None = None, executor: ExecutorSpec = LOCAL) -> MembershipResult:
    """`run_membership` plus a `membership` ledger event (ok or failed)."""
    where = ledger_dir(ledger)
    with recorded(where, "membership", command, sign_key) as event:
        result = run_membership(run=run, report=report, config=config, data=data, control=control,
                                data_root=data_root, holdout_dir=holdout_dir, progress=progress,
                                ledger_head=current_head(where).as_dict(), executor=executor)
        s = result.summary
        event.inputs.append(Artifact("weights", s.model.checkpoint, s.model.sha256))
        if s.control is not None:
            event.inputs.append(Artifact("control_weights", s.control.checkpoint, s.control.sha256))
        event.inputs.append(Artifact("prepared", s.prepared, s.prepared_fingerprint))
        event.outputs.extend(Artifact(name, str(path.resolve()), sha256_file(path)) for name, path in result.files.items())
        by = {g.group: g for g in s.groups}
        clean = by.get("clean")
        event.summary.update(
            verdict=s.verdict, method=s.model.method, protected_auc=by["protected"].model.auc,
            protected_auc_ci95=by["protected"].model.auc_ci95,
            clean_auc=clean.model.auc if clean else None, clean_auc_ci95=clean.model.auc_ci95 if clean else None,
            images={name: g.images for name, g in by.items()} | {"holdout": by["protected"].holdout_images},
            sigmas=s.sigmas, scores_sha256=s.scores_sha256)
        return result


__all__ = ["MembershipResult", "membership_recorded", "recompute", "run_membership"]
