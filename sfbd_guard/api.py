"""The library's face: what each `guard` command does, as a typed function (docs/api.md).

    import sfbd_guard as guard

    prepared = guard.prepare("policies/digits.yaml")
    outcome = guard.train("pipelines/digits.yaml", overrides={"schedule.total_kimg": 10})
    run = guard.load_run(outcome.run_dir)
    images = run.sample(16, seed=0)                 # uint8 (16, C, H, W), the pixels guard sample writes

Every function appends its event to the compliance ledger (`ledger`, default the one `guard` uses), also a
`failed` event when it raises; errors are `sfbd_guard.errors.GuardError`s with a one-line message and a hint.
The CLI (cli.py) parses its options, calls these functions and prints their results; nothing else.
Importing this module imports no torch, pyarrow or faiss: each function imports what it needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import InputError
from .executor import executor_spec
from .exporting.layout import RECORD as EXPORT_RECORD
from .hashing import sha256_file
from .ledger import Artifact, ledger_dir, record_failure, recorded
from .locations import project_of

if TYPE_CHECKING:
    import torch

    from .auditing.model_audit import MembershipResult
    from .auditing.service import AuditResult
    from .compliance.check import Check
    from .contracts.export_record import ExportRecord
    from .curation.prepare import PrepareResult
    from .engine.config import PipelineConfig
    from .engine.methods import Method
    from .engine.service import SampleOutcome, TrainOutcome
    from .exporting.loading import ExportedModel
    from .progress import ProgressFactory
    from .stages import RunSummary

PathLike = str | Path
Executor = Literal["local", "ray"]


def _command(name: str, command: Sequence[str] | None) -> list[str]:
    """The invocation the ledger records: the CLI's argv, or the API call's name."""
    return list(command) if command is not None else [f"sfbd_guard.{name}()"]


@contextmanager
def _failures_recorded(kind: str, ledger: PathLike | None, command: list[str]) -> Iterator[None]:
    """A `failed` event for an error raised before a command's own recorded block starts (a config that does not
    load, options that do not go together); an error the block recorded already is not recorded twice."""
    try:
        yield
    except BaseException as err:

        record_failure(ledger_dir(_path(ledger)), kind, command, err)
        raise


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def prepare(policy: PathLike, *, out: PathLike | None = None, data_root: PathLike | None = None, workers: int = 1,
            strict: bool = False, overwrite: bool = False, noise_key: PathLike | None = None, ephemeral_key: bool = False,
            allow_rerelease: bool = False, sign_key: PathLike | None = None, executor: Executor = "local",
            ray_address: str | None = None, ledger: PathLike | None = None, progress: ProgressFactory | None = None,
            command: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> PrepareResult:
    """Split a dataset into licensed-clean and noised-protected partitions as `policy` (a YAML file) says, into a
    prepared directory (`out`, default the policy's `output`). `overrides` replace dotted policy keys before it is
    validated (e.g. {"noise.sigma": 0.8}); they are recorded in the card and the ledger event. `guard prepare`."""
    argv = _command("prepare", command)
    with _failures_recorded("prepare", ledger, argv):
        from .curation.service import prepare_recorded

        return prepare_recorded(Path(policy), data_root=_path(data_root), out=_path(out), workers=workers, strict=strict,
                                overwrite=overwrite, ledger=_path(ledger), command=argv, key_file=_path(noise_key),
                                ephemeral_key=ephemeral_key, allow_rerelease=allow_rerelease, progress=progress,
                                sign_key=_path(sign_key), executor=executor_spec(executor, ray_address),
                                overrides=dict(overrides or {}))


def training_config(pipeline: PathLike | None = None, *, resume: PathLike | None = None, data: PathLike | None = None,
                    out: PathLike | None = None, method: Method | None = None,
                    overrides: Mapping[str, Any] | None = None, verify_key: PathLike | None = None,
                    ledger: PathLike | None = None) -> PipelineConfig:
    """The validated configuration `train` would run: a new run of `pipeline` with dotted `overrides`
    (e.g. {"schedule.total_kimg": 10}), or the saved one of the run directory `resume`."""
    from .engine.service import pipeline_for_new_run, pipeline_of_run

    if (pipeline is None) == (resume is None):
        raise InputError("give either --pipeline (a new run) or --resume RUN_DIR (continue one)")
    if resume is not None:
        if out or method or overrides or verify_key:
            raise InputError("--resume continues a run with its saved config; other options (but --data and "
                             "--allow-unrecorded) do not apply")

        return pipeline_of_run(Path(resume), data=_path(data), project=project_of(ledger_dir(_path(ledger))))
    assert pipeline is not None
    return pipeline_for_new_run(Path(pipeline), overrides=dict(overrides or {}), data=_path(data), out=_path(out),
                                method=method, verify_key=_path(verify_key))


def train(pipeline: PathLike | PipelineConfig | None = None, *, resume: PathLike | None = None,
          data: PathLike | None = None, out: PathLike | None = None, method: Method | None = None,
          overrides: Mapping[str, Any] | None = None, verify_key: PathLike | None = None,
          allow_unrecorded: bool = False, sign_key: PathLike | None = None, ledger: PathLike | None = None,
          progress: ProgressFactory | None = None, command: Sequence[str] | None = None) -> TrainOutcome:
    """Train a diffusion model on a prepared directory: a new run of `pipeline` (a YAML file), or the run in
    `resume` continued from its last checkpoint. `pipeline` may also be the config `training_config` gave (for the
    same `resume`), which is trained as it is. `guard train`."""
    from .engine.config import PipelineConfig

    argv = _command("train", command)
    with _failures_recorded("train", ledger, argv):
        if isinstance(pipeline, PipelineConfig):
            if data or out or method or overrides or verify_key:
                raise InputError("a PipelineConfig is trained as it is: data, out, method, overrides and verify_key "
                                 "belong to training_config")
            config = pipeline
        else:
            config = training_config(pipeline, resume=resume, data=data, out=out, method=method, overrides=overrides,
                                     verify_key=verify_key, ledger=ledger)
        from .engine.service import train_recorded

        return train_recorded(config, resume=resume is not None, ledger=_path(ledger), command=argv, progress=progress,
                              allow_unrecorded=allow_unrecorded, sign_key=_path(sign_key))


def sample(run: PathLike, *, n: int, out: PathLike, checkpoint: PathLike | None = None, steps: int = 18, seed: int = 0,
           batch: int = 64, device: str = "auto", overwrite: bool = False, sign_key: PathLike | None = None,
           ledger: PathLike | None = None, progress: ProgressFactory | None = None,
           command: Sequence[str] | None = None) -> SampleOutcome:
    """Draw `n` images from a run's EMA weights into `out`: one PNG each, grid.png and samples.json. Image i
    depends only on (seed, i). `guard sample`."""
    argv = _command("sample", command)
    with _failures_recorded("sample", ledger, argv):
        from .engine.service import sample_recorded

        return sample_recorded(Path(run), ledger=_path(ledger), command=argv, sign_key=_path(sign_key), count=n,
                               out=Path(out), steps=steps, seed=seed, batch=batch, checkpoint=_path(checkpoint),
                               device=device, progress=progress, overwrite=overwrite)


def audit(samples: PathLike, data: PathLike, *, report: PathLike = "audit-report", config: PathLike | None = None,
          overrides: Mapping[str, Any] | None = None, data_root: PathLike | None = None,
          holdout: PathLike | None = None, executor: Executor = "local", ray_address: str | None = None,
          sign_key: PathLike | None = None, ledger: PathLike | None = None, progress: ProgressFactory | None = None,
          command: Sequence[str] | None = None) -> AuditResult:
    """Compare every image in `samples` with the protected originals of the prepared directory `data`; a verdict
    per sample (copy, suspect, novel) at calibrated thresholds, written to `report`. `config` is an audit YAML,
    `overrides` its dotted keys (e.g. {"search.k": 5}). `guard audit`."""
    argv = _command("audit", command)
    with _failures_recorded("audit", ledger, argv):
        from .auditing.config import resolve_audit_config
        from .auditing.service import audit_recorded

        chosen = executor_spec(executor, ray_address)
        settings = resolve_audit_config(_path(config), {k: v for k, v in (overrides or {}).items() if v is not None})
        return audit_recorded(samples=Path(samples), data=Path(data), report=Path(report), config=settings,
                              config_path=_path(config), ledger=_path(ledger), command=argv, data_root=_path(data_root),
                              holdout_dir=_path(holdout), progress=progress, executor=chosen, sign_key=_path(sign_key))


def import_weights(file: PathLike, *, out: PathLike, licence: str, source: str, ledger: PathLike | None = None,
                   command: Sequence[str] | None = None) -> Path:
    """Bring in weights trained elsewhere (safetensors only) as a root of lineages: a folder `out` to start runs from
    (`init.run`), recording the `licence` (SPDX) and `source` the user declares; shown as declared, never as verified.
    `guard import-weights`."""
    argv = _command("import-weights", command)
    with _failures_recorded("import", ledger, argv):
        from .engine.lineage import import_weights as bring_in

        target = Path(out)
        with recorded(ledger_dir(_path(ledger)), "import", argv) as event:
            event.inputs.append(Artifact("weights", str(Path(file).resolve()), sha256_file(Path(file))
                                         if Path(file).is_file() else None))
            record = bring_in(Path(file), target, licence=licence, source=source)
            event.outputs.append(Artifact("imported", str(target.resolve()), record.weights_sha256))
            event.summary.update(licence=record.licence, source=record.source, tensors=record.tensors)
        return target


def export(run: PathLike, *, out: PathLike, checkpoint: PathLike | None = None, licence: str | None = None,
           data: PathLike | None = None, push: str | None = None, public: bool = False, hub_api: Any = None,
           ledger: PathLike | None = None, command: Sequence[str] | None = None) -> ExportRecord:
    """Write `run`'s EMA model to the new folder `out` in a layout other tools load: diffusers' (`unet/`,
    `scheduler/`) for `network: diffusers-unet2d`, else our network with `load_exported`; with the model card (usage,
    licence, lineage, audit results), LICENSE and export.json, and nothing else. Only weights a train event of the
    ledger recorded are exported. `push`: also upload to that Hub model repository (private unless `public`;
    `hub_api`: an `HfApi`-like object, default huggingface_hub's). `guard export`."""
    argv = _command("export", command)
    with _failures_recorded("export", ledger, argv):
        from .exporting.hub import push_export
        from .exporting.writer import export_run

        where = ledger_dir(_path(ledger))
        target = Path(out)
        with recorded(where, "export", argv) as event:
            record = export_run(Path(run), target, ledger=where, checkpoint=_path(checkpoint), licence=licence,
                                data=_path(data))
            event.inputs.append(Artifact("weights", str(Path(run).resolve()), record.weights_sha256))
            event.outputs.append(Artifact("export", str(target.resolve()), sha256_file(target / EXPORT_RECORD)))
            event.summary.update(format=record.format, network=record.network, licence=record.licence,
                                 files=len(record.files) + 1)
            if push:
                event.summary["pushed"] = push_export(target, push, api=hub_api, private=not public)
        return record


def load_exported(folder: PathLike, *, device: str = "cpu") -> ExportedModel:
    """An export folder's model (either format), every file checked against its export.json, ready to sample:
    `load_exported(DIR).sample(16, seed=0)` draws as `guard sample` does."""
    from .exporting.loading import load_exported as load

    return load(Path(folder), device=device)


def membership(run: PathLike, *, report: PathLike = "membership-report", data: PathLike | None = None,
               control: PathLike | None = None, config: PathLike | None = None,
               overrides: Mapping[str, Any] | None = None, data_root: PathLike | None = None,
               holdout: PathLike | None = None, executor: Executor = "local", ray_address: str | None = None,
               sign_key: PathLike | None = None, ledger: PathLike | None = None,
               progress: ProgressFactory | None = None, command: Sequence[str] | None = None) -> MembershipResult:
    """Does `run`'s model remember what it never saw clean? A membership-inference test of its EMA weights: clean,
    protected and holdout images (the originals, on the data owner's side), their denoising errors with common noise,
    each group's AUC and TPR at 1 % FPR against the holdout with intervals; `control` is a clean-only run of the same
    data, tested on the same images. Written to `report`; `result.summary.verdict` is PASS or ATTENTION.
    `overrides`: the audit YAML's dotted keys (e.g. {"membership.max_images": 256}). `guard membership`."""
    argv = _command("membership", command)
    with _failures_recorded("membership", ledger, argv):
        from .auditing.config import resolve_audit_config
        from .auditing.model_audit import membership_recorded

        chosen = executor_spec(executor, ray_address)
        settings = resolve_audit_config(_path(config), {k: v for k, v in (overrides or {}).items() if v is not None})
        return membership_recorded(run=Path(run), report=Path(report), config=settings, ledger=_path(ledger),
                                   command=argv, data=_path(data), control=_path(control), data_root=_path(data_root),
                                   holdout_dir=_path(holdout), progress=progress, sign_key=_path(sign_key),
                                   executor=chosen)


def report(sql: str | None = None, *, ledger: PathLike | None = None) -> dict[str, Any]:
    """The ledger's tables as {title: pyarrow.Table}: prepares, trainings, audits; or the result of `sql` over the
    views events, prepares, trainings, samplings, audits, memberships. `guard report`."""
    from .compliance.tables import report_tables

    return report_tables(ledger_dir(_path(ledger)), sql)


def verify(run: PathLike, *, verify_key: PathLike | None = None, data: PathLike | None = None,
           digest_key: PathLike | None = None, ledger_keys: Sequence[PathLike] = (),
           ledger: PathLike | None = None, data_root: PathLike | None = None) -> list[Check]:
    """Check from files alone that the run saw only what its policy allowed; each check PASS, ATTENTION or FAIL
    (`check.passed`, `check.attention`). `guard verify`."""
    from .compliance.verify import verify_run

    return verify_run(Path(run), ledger_dir(_path(ledger)), verify_key=_path(verify_key), data=_path(data),
                      digest_key=_path(digest_key), ledger_keys=[Path(k) for k in ledger_keys],
                      data_root=_path(data_root))


def run(pipeline: PathLike, *, allow_unrecorded: bool = False, sign_key: PathLike | None = None,
        ledger: PathLike | None = None, progress: ProgressFactory | None = None, say: Any = print,
        command: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> RunSummary:
    """Prepare, train, sample, audit and report as the pipeline says, with dotted `overrides` (e.g. {"tracker":
    "mlflow"}); stages already done are skipped. `guard run`."""
    argv = _command("run", command)
    with _failures_recorded("run", ledger, argv):
        from .stages import run_pipeline

        return run_pipeline(Path(pipeline), ledger=ledger_dir(_path(ledger)), command=argv, progress=progress, say=say,
                            allow_unrecorded=allow_unrecorded, sign_key=_path(sign_key), overrides=dict(overrides or {}))


@dataclass
class LoadedRun:
    """A trained run's EMA network, ready to sample from (`load_run`)."""

    run_dir: Path
    config: PipelineConfig
    net: torch.nn.Module  # the EDM denoiser D(x; sigma), eval mode
    weights: Path  # the EMA weights file it holds
    shape: tuple[int, int, int]  # (C, H, W)

    def sample(self, n: int, *, seed: int = 0, steps: int = 18, batch: int = 64) -> torch.Tensor:
        """uint8 (n, C, H, W) images: the pixels `sample` writes as PNGs for the same seed and steps."""
        from .engine.generate import generate_uint8

        return generate_uint8(self.net, seed=seed, count=n, shape=self.shape, steps=steps, batch=batch)


def load_run(run: PathLike, *, checkpoint: PathLike | None = None, device: str = "auto") -> LoadedRun:
    """A run directory's network with its latest EMA weights (or `checkpoint`'s), for sampling in Python."""
    from .engine.service import load_ema_net, pipeline_of_run

    net, weights, shape = load_ema_net(Path(run), checkpoint=_path(checkpoint), device=device)
    return LoadedRun(Path(run), pipeline_of_run(Path(run)), net, weights, shape)
