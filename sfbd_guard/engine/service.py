"""`guard train` and `guard sample` as library calls that also record their ledger events."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import dump_yaml, load_config
from ..contracts.base import dump
from ..contracts.run_record import LedgerHead, LineageLink, RunRecord, read_run_record, write_run_record
from ..errors import InputError, VerificationError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..hashing import sha256_file
from ..ledger import Artifact, current_head, ledger_dir, recorded
from ..locations import project_of, store
from ..prepared.reader import PreparedData, open_prepared, require_noisy, require_provenance
from ..prepared.relocate import prepared_of_run
from ..progress import ProgressFactory
from ..rundir import GRID, RESOLVED, SAMPLES_INDEX, RunPaths
from ..threads import in_force
from .config import PipelineConfig, load_pipeline
from .methods import stages_of


@dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    config: PipelineConfig
    checkpoint: Path | None
    step: int
    kimg: float
    resumed: bool
    seconds: float
    privacy: dict[str, Any] | None = None  # DP-SGD: epsilon, delta, noise multiplier, sample rate, steps, ...


def pipeline_for_new_run(pipeline: Path, *, overrides: dict[str, Any], data: Path | None, out: Path | None,
                         method: str | None, verify_key: Path | None = None) -> PipelineConfig:
    """The pipeline with CLI flags applied (flags win over keys)."""
    extra = dict(overrides)
    if method:
        extra["method"] = method
    config = load_pipeline(pipeline, extra)
    updates: dict[str, Any] = {}
    if data:
        updates["data"] = str(data.resolve())
    if out:
        updates["out"] = str(out.resolve())
    if verify_key:
        updates["verify_key"] = str(verify_key.resolve())
    return config.model_copy(update=updates)


def pipeline_of_run(run_dir: Path, *, data: Path | None = None, project: Path | None = None) -> PipelineConfig:
    """The saved config of the run in `run_dir`, continuing in `run_dir` itself.

    `out` always becomes `run_dir`: a copied (or moved) run directory continues where it is, never in
    the directory its saved config was first written for. `data` (--data) replaces the saved prepared
    directory; with `project` (the ledger's parent; training), a saved one that is not there is looked up
    as verify does (`relocate.prepared_of_run`: run.json's path, then the fingerprint; else an error
    naming --data). Training then checks that its fingerprint is the one the run began on.
    """
    path = run_dir / RESOLVED
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run directory (no {RESOLVED})",
                         hint="--resume takes a directory written by guard train")
    config = load_config(PipelineConfig, path)
    updates = {"out": str(run_dir.resolve())}
    if data is not None:
        updates["data"] = str(data.resolve())
    elif project is not None and not Path(config.data).exists():  # a moved or copied project
        record = read_run_record(run_dir)
        updates["data"] = str(prepared_of_run(run_dir.resolve(), record.data, record.data_fingerprint, project))
    return config.model_copy(update=updates)


def _start_run_dir(config: PipelineConfig, data: PreparedData, project: Path | None,
                   ledger_head: dict[str, Any] | None = None, lineage: list[LineageLink] | None = None) -> Path:
    run_dir = Path(str(config.out))
    if RunPaths(run_dir).checkpoints.exists():
        raise InputError(f"run directory {run_dir} already has checkpoints",
                         hint=f"continue it with --resume {run_dir}, or pass --out for a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / RESOLVED, dump_yaml(config).encode())
    stored = store(data.root, run_dir, project=project) if project is not None else str(data.root)
    write_run_record(run_dir, RunRecord(
        data=stored, data_fingerprint=data.fingerprint, files=dict(data.files), image_shape=list(data.image_shape),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"), threads=in_force(),
        ledger_head=LedgerHead.model_validate(ledger_head) if ledger_head is not None else None,
        lineage=lineage or []))
    return run_dir


def check_trainable(config: PipelineConfig, data: PreparedData) -> None:
    """Refuse a run that would have nothing to train on: no clean records where the schedule trains on them alone."""
    if len(data.clean.record_ids):
        return
    stages = stages_of(config.method)
    if stages == ("train",) and config.method == "clean-only":
        raise InputError(f"{data.root}: no clean records, and method clean-only trains on nothing else")
    if "pretrain" in stages and config.schedule.pretrain_kimg > 0:
        hint = ("start from a model with init (guard train --init RUN) and set schedule.pretrain_kimg: 0"
                if config.init is None else "set schedule.pretrain_kimg: 0: the rounds start from the init's weights")
        raise InputError(f"{data.root}: no clean records to pretrain {config.method} on "
                         f"(schedule.pretrain_kimg {config.schedule.pretrain_kimg:g})", hint=hint)


def _check_same_data(run_dir: Path, data: PreparedData) -> None:
    if read_run_record(run_dir).data_fingerprint != data.fingerprint:
        raise VerificationError(f"{data.root}: its fingerprint differs from the one this run started with",
                                hint="a run resumes only on the exact prepared data it began on")


def _record_new_locations(run_dir: Path, config: PipelineConfig) -> None:
    """A run continued in a copy of its directory (or on its moved prepared directory): its saved config names
    them from now on."""
    saved = load_config(PipelineConfig, run_dir / RESOLVED)
    if (saved.out, saved.data) != (config.out, config.data):
        atomic_write_bytes(run_dir / RESOLVED, dump_yaml(config).encode())


def _resume(trainer: Any, run_dir: Path) -> bool:
    """`trainer.resume()`, with a checkpoint that does not fit the run reported as an input error naming it."""
    from .checkpoint import latest_checkpoint

    try:
        return bool(trainer.resume())
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        where = latest_checkpoint(run_dir)
        text = str(err).strip().splitlines()
        raise InputError(f"{where / 'state.safetensors' if where else run_dir}: the checkpoint does not fit this run "
                         f"({type(err).__name__}: {text[0] if text else ''})") from None


def train(config: PipelineConfig, *, resume: bool, progress: ProgressFactory | None = None,
          on_start: Callable[[PreparedData], None] | None = None, project: Path | None = None,
          ledger_head: dict[str, Any] | None = None) -> TrainOutcome:
    """Verify the prepared data, then train (or continue) the run described by `config`.

    With `project` (the ledger's parent), run.json names the prepared directory relative to the run directory
    when both lie inside it (locations.py); without, by its absolute path. `ledger_head` (ledger.current_head)
    is recorded in a new run's run.json: the ledger's head when the run began."""

    from .lineage import lineage_of, start_from
    from .privacy import plan_privacy
    from .privacy import summary as privacy_summary
    from .runtime import start_runtime
    from .schedule import run_schedule
    from .trackers import open_tracker
    from .trainer import Trainer

    started = time.perf_counter()
    data = open_prepared(Path(config.data))
    if on_start:
        on_start(data)
    check_trainable(config, data)
    lineage = lineage_of(config.init, data.image_shape) if config.init is not None and not resume else []
    with start_runtime(config.device, config.precision) as runtime:
        run_dir = Path(str(config.out))
        # refuse an unreachable epsilon before anything is written; the trainer uses this plan
        privacy_plan = plan_privacy(config, data, runtime.world_size) if config.privacy is not None else None
        if resume:
            _check_same_data(run_dir, data)
            if runtime.is_main:
                _record_new_locations(run_dir, config)
        elif runtime.is_main:
            _start_run_dir(config, data, project, ledger_head, lineage)
        runtime.barrier()
        trainer = Trainer(config, data, run_dir, runtime, progress, privacy_plan)
        resumed = _resume(trainer, run_dir) if resume else False
        if resume and not resumed:  # killed before its first checkpoint: it starts again, from its init if it has one
            lineage = read_run_record(run_dir).lineage
        if lineage and not resumed:  # a run from another run's weights (engine/lineage.py)
            start_from(Path(lineage[0].weights), trainer.net, trainer.ema.module, lineage[0].weights_sha256)
        with open_tracker(config, run_dir, start_step=trainer.state.step, enabled=runtime.is_main) as tracker:
            trainer.tracker = tracker  # tracker: tensorboard | mlflow (trackers.py)
            checkpoint = run_schedule(trainer)
        return TrainOutcome(run_dir, config, checkpoint if runtime.is_main else None, trainer.state.step,
                            trainer.state.nimg / 1000, resumed, time.perf_counter() - started,
                            privacy_summary(trainer.privacy.account) if trainer.privacy else None)


def check_trusted(data: PreparedData, config: PipelineConfig, ledger: Path, *, allow_unrecorded: bool) -> dict[str, Any]:
    """Refuse data whose provenance is unknown or whose protected arrays are not noisy copies.

    Provenance: the ledger's prepare event that wrote this fingerprint, or the owner's signature when the
    pipeline names a `verify_key` (a bad or missing signature is then refused even with a ledger event).
    Returns what the run's ledger event records about it.
    """
    provenance = require_provenance(data, ledger, Path(config.verify_key) if config.verify_key else None,
                                    allow_unrecorded=allow_unrecorded)
    stats = require_noisy(data)
    return {"prepare_event": provenance.event_id, "verify_key_sha256": provenance.signer,
            "unrecorded_data": not provenance.established,
            "noise_check": {"images": stats.images, "min_ratio": round(stats.min_ratio, 4),
                            "median_ratio": round(stats.median_ratio, 4), "tau": round(stats.tau, 4)}}


def train_recorded(config: PipelineConfig, *, resume: bool, ledger: Path | None, command: list[str],
                   progress: ProgressFactory | None = None, allow_unrecorded: bool = False,
                   sign_key: Path | None = None) -> TrainOutcome:
    """`train` plus a `train` ledger event (on rank 0): the arrays it read and the checkpoint it wrote.

    Before anything is written, the prepared directory must be trusted (`check_trusted`)."""

    where = ledger_dir(ledger)
    if int(os.environ.get("RANK", "0")) != 0:
        def check_only(data: PreparedData) -> None:
            check_trusted(data, config, where, allow_unrecorded=allow_unrecorded)

        return train(config, resume=resume, progress=None, on_start=check_only)
    with recorded(where, "train", command, sign_key) as event:
        event.inputs.append(Artifact("prepared", str(Path(config.data).resolve()), None))

        def note_data(data: PreparedData) -> None:
            event.inputs[0] = Artifact("prepared", str(data.root.resolve()), data.fingerprint)
            event.inputs.extend(Artifact("array", f"{data.root}/{name}", digest) for name, digest in sorted(data.files.items()))
            event.summary.update(check_trusted(data, config, where, allow_unrecorded=allow_unrecorded))

        outcome = train(config, resume=resume, progress=progress, on_start=note_data, project=project_of(where),
                        ledger_head=current_head(where).as_dict())
        if outcome.checkpoint is not None:
            for name in ("net.safetensors", "ema.safetensors"):
                weights = outcome.checkpoint / name
                event.outputs.append(Artifact(name.split(".")[0], str(weights.resolve()), sha256_file(weights)))
        event.outputs.append(Artifact("run", str(outcome.run_dir.resolve()), None))
        event.summary.update(method=config.method, name=config.name, resumed=outcome.resumed, step=outcome.step,
                             kimg=outcome.kimg, seconds=round(outcome.seconds, 3), device=config.device,
                             world_size=int(os.environ.get("WORLD_SIZE", "1")), threads=in_force())
        if outcome.privacy is not None:
            event.summary["privacy"] = outcome.privacy
        lineage = read_run_record(outcome.run_dir).lineage
        if lineage:
            parent = lineage[0]
            event.inputs.append(Artifact("init_weights", parent.weights, parent.weights_sha256))
            event.summary["lineage"] = [dump(link) for link in lineage]
        return outcome


@dataclass(frozen=True)
class SampleOutcome:
    out: Path
    files: list[Path]
    grid: Path
    checkpoint: Path
    seconds: float


def load_ema_net(run_dir: Path, *, checkpoint: Path | None = None,
                 device: str = "auto") -> tuple[Any, Path, tuple[int, int, int]]:
    """A run's network with its EMA weights (the latest checkpoint's, or `checkpoint`'s), in eval mode;
    also the weights file and the run's image shape (C, H, W)."""
    from .checkpoint import ema_weights_file, load_weights
    from .runtime import resolve_device
    from .trainer import build_net

    config = pipeline_of_run(run_dir)
    shape = read_run_record(run_dir).shape
    weights = ema_weights_file(run_dir, checkpoint)
    net = build_net(config, shape).to(resolve_device(device)).eval()
    load_weights(weights, net)
    return net, weights, shape


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_SAMPLE_NAME = re.compile(r"[0-9]{6,}\.png")  # the names guard sample gives its images


def _previous_samples(out: Path) -> set[str]:
    """The image names a previous guard sample listed in out/samples.json (its own files only; none if unreadable)."""
    from ..fileio import read_regular

    try:
        listed = json.loads(read_regular(out / SAMPLES_INDEX, 1 << 26)).get("images", [])
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(listed, list):
        return set()
    return {name for name in listed if isinstance(name, str) and _SAMPLE_NAME.fullmatch(name)}


def sample_folder(out: Path, overwrite: bool) -> set[str]:
    """Check `out` before any sampling: a folder holding images (or a previous sample set) is refused unless
    `overwrite`, so nobody's pictures are replaced, nor mixed into what guard audit reads. Returns the images of
    a previous guard sample there, which `sample` removes when the new set does not rewrite them."""
    if not out.exists() and not out.is_symlink():
        return set()
    if not out.is_dir():
        raise InputError(f"--out {out}: not a folder")
    if not overwrite:
        for folder, _, names in os.walk(out):
            found = [n for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES) or n == SAMPLES_INDEX]
            if found:
                raise InputError(f"--out {out}: holds images ({Path(folder, found[0]).relative_to(out)}); they would "
                                 "be overwritten or audited with the samples: choose an empty folder, or add --overwrite")
        return set()
    return _previous_samples(out)


def sample(run_dir: Path, *, count: int, out: Path, steps: int = 18, seed: int = 0, batch: int = 64,
           checkpoint: Path | None = None, device: str = "auto", progress: ProgressFactory | None = None,
           overwrite: bool = False) -> SampleOutcome:
    """Draw `count` images from a run's EMA weights; one PNG each plus grid.png. Same seed, same images.

    A folder that holds images is refused unless `overwrite`; with it, images of a previous guard sample that
    the new set does not rewrite are removed (the audit reads every image of the folder)."""

    import torch

    from .generate import generate
    from .images import save_grid, save_pngs

    previous = sample_folder(out, overwrite)
    started = time.perf_counter()
    net, weights, shape = load_ema_net(run_dir, checkpoint=checkpoint, device=device)
    target = next(net.parameters()).device
    digits, files, grid_images = max(6, len(str(count - 1))), [], []
    tick = progress("sampling", count) if progress else None
    for start, images in generate(net, seed=seed, count=count, shape=shape, steps=steps, batch=batch, device=target):
        files += save_pngs(images, out, start, digits)
        grid_images.append(images[: max(0, 256 - start)].cpu())
        if tick:
            tick(len(images))
    grid = save_grid(torch.cat(grid_images)[:256], out / GRID)
    for name in previous - {f.name for f in files}:
        (out / name).unlink(missing_ok=True)
    atomic_write_json(out / SAMPLES_INDEX, {  # what the folder holds: the audit reads the samples from it
        "images": [f.name for f in files], "grid": grid.name, "seed": seed, "steps": steps,
        "weights": str(weights), "weights_sha256": sha256_file(weights)})
    return SampleOutcome(out, files, grid, weights, time.perf_counter() - started)


def sample_recorded(run_dir: Path, *, ledger: Path | None, command: list[str], sign_key: Path | None = None,
                    **options: Any) -> SampleOutcome:
    with recorded(ledger_dir(ledger), "sample", command, sign_key) as event:
        outcome = sample(run_dir, **options)
        event.inputs.append(Artifact("weights", str(outcome.checkpoint.resolve()), sha256_file(outcome.checkpoint)))
        event.outputs.append(Artifact("samples", str(outcome.out.resolve()), None))
        event.summary.update(count=len(outcome.files), seconds=round(outcome.seconds, 3),
                             **{k: v for k, v in options.items() if k in ("steps", "seed", "batch")})
        return outcome
