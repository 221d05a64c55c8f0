"""A run also logged to the trackers people use: `tracker: tensorboard | mlflow` in the pipeline (`--tracker`).

What a tracker receives, all of it values the run makes anyway (nothing is computed for it):
- from the rows of metrics.parquet, when the trainer has saved a checkpoint (so a resumed run sends no step twice):
  `loss/<phase>` (train, pretrain, round-N, online), `lr`, `kimg`, `kimg_per_s`, and SFBD's validation measure
  (`validation/loss`, `validation/round_psnr`);
- `privacy/epsilon` and `privacy/steps` when a private phase ends (DP-SGD);
- the snapshot grids (model samples of the EMA: `snapshots/grid` every snapshot_every steps and at the end,
  `snapshots/grid-<phase>` at the end of each round): the only images a tracker is ever given, checked here;
- the resolved config, flat (`optimizer.lr`, ...; MLflow: parameters, TensorBoard: a text), when the tracker's
  run starts;
- `audit/<verdict>` counts after guard run's audit (`log_audit`).

Both work offline: TensorBoard event files under <run>/tensorboard, MLflow's file store under <run>/mlruns (or
`mlflow.uri`). A resumed run continues the same MLflow run (its id in <run>/tracker.json) and the same TensorBoard
log directory, where the events after the checkpoint it resumes from are purged. Only rank 0 of a torchrun writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from ..contracts.tracker_record import TrackerRecord, read_tracker_record, write_tracker_record
from ..errors import InputError
from ..rundir import SNAPSHOTS, RunPaths
from .config import PipelineConfig
from .metrics import MetricsLog

INSTALL = "pip install 'sfbd_guard[trackers]'"
# the metrics columns (and tracker-only values) a tracker receives, by the name it receives them under
SCALARS = {"lr": "lr", "kimg": "kimg", "validation": "validation/loss", "round_psnr": "validation/round_psnr",
           "epsilon": "privacy/epsilon", "private_steps": "privacy/steps"}
MLFLOW_BATCH = 1000  # metrics per MLflow log_batch call (its limit); params: 100
MLFLOW_PARAM_LENGTH = 6000  # MLflow's longest parameter value


class Tracker(Protocol):
    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Numbers at an optimizer step."""

    def log_image(self, tag: str, step: int, path: Path) -> None:
        """A snapshot grid PNG of the run (`check_snapshot`: nothing else is accepted)."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """The run's settings, once, when the tracker's run starts."""

    def flush(self) -> None:
        """Send what is buffered."""

    def close(self, ok: bool = True) -> None:
        """The end of this process's part of the run (`ok`: False when it ended in an error)."""


class NoTracker:
    """`tracker: none`, and every rank of a torchrun but rank 0."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def log_image(self, tag: str, step: int, path: Path) -> None:
        pass

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


def tracked_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The tracker's numbers of one metrics row, annotation or tracker-only entry (MetricsLog.take_unsent)."""
    values: dict[str, float] = {}
    if entry.get("loss") is not None and entry.get("phase"):
        values[f"loss/{entry['phase']}"] = float(entry["loss"])
    seconds = entry.get("seconds_per_kimg")
    if seconds:
        values["kimg_per_s"] = 1 / float(seconds)
    values.update({name: float(entry[key]) for key, name in SCALARS.items() if entry.get(key) is not None})
    return {name: value for name, value in values.items() if math.isfinite(value)}  # NaN: an empty Poisson batch


def check_snapshot(run_dir: Path, path: Path) -> Path:
    """`path` if it is a snapshot grid PNG in the run's own snapshots folder (a regular file, no symlink): a tracker
    logs model samples only, never a round set, the bank or anything of the prepared data."""
    folder = RunPaths(run_dir).snapshots
    if (path.parent != folder or path.suffix != ".png" or path.is_symlink() or folder.is_symlink()
            or not path.is_file() or not path.resolve().is_relative_to(folder.resolve())):
        raise ValueError(f"{path}: a tracker logs only the run's snapshot grids ({folder}/*.png)")
    return path


def _pixels(path: Path) -> tuple[Any, str]:
    """The PNG's pixels (uint8) and their layout for TensorBoard (HW for grayscale, HWC for colour)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        gray = image.mode in ("L", "1", "I;16", "I")
        array = np.asarray(image.convert("L" if gray else "RGB"))
    return array, "HW" if gray else "HWC"


def config_params(config: PipelineConfig) -> dict[str, str]:
    """The resolved config as flat parameters: {"optimizer.lr": "0.001", ...}."""
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, str) else json.dumps(value)

    visit("", config.model_dump(mode="json"))
    return flat


class TensorBoardTracker:
    """Event files in <run>/tensorboard (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, run_dir: Path, start_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(f"tracker: tensorboard needs the tensorboard package ({INSTALL})") from None
        self.run_dir = run_dir
        folder = RunPaths(run_dir).tensorboard
        self.new = not any(folder.glob("events.out.tfevents.*"))
        # training from step S on: the events of steps after S that an earlier process wrote are hidden (purged)
        purge = None if self.new or start_step is None else start_step + 1
        self.writer = SummaryWriter(str(folder), purge_step=purge)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_image(self, tag: str, step: int, path: Path) -> None:
        pixels, layout = _pixels(check_snapshot(self.run_dir, path))
        self.writer.add_image(tag, pixels, step, dataformats=layout)

    def log_params(self, params: Mapping[str, str]) -> None:
        text = "\n".join(f"    {key}: {value}" for key, value in params.items())  # a Markdown code block
        self.writer.add_text("config", text, 0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run (MlflowClient): metrics, parameters, and the snapshot grids as artifacts under snapshots/."""

    def __init__(self, client: Any, run_id: str, run_dir: Path, new: bool) -> None:
        self.client, self.run_id, self.run_dir, self.new = client, run_id, run_dir, new
        self.buffer: list[Any] = []

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.buffer.extend(Metric(name, value, stamp, step) for name, value in values.items())
        if len(self.buffer) >= MLFLOW_BATCH:
            self.flush()

    def log_image(self, tag: str, step: int, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(check_snapshot(self.run_dir, path)), artifact_path=SNAPSHOTS)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:MLFLOW_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def flush(self) -> None:
        while self.buffer:
            chunk, self.buffer = self.buffer[:MLFLOW_BATCH], self.buffer[MLFLOW_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def close(self, ok: bool = True) -> None:
        if ok:
            self.flush()
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _path_of(uri: str) -> Path | None:
    """The local path of a file: URI (None for any other scheme)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def _inside(uri: str, folder: Path) -> bool:
    path = _path_of(uri)
    return path is not None and path.resolve().is_relative_to(folder.resolve())


def _mlflow(config: PipelineConfig, run_dir: Path) -> MlflowTracker:
    """The run's MLflow run: the one tracker.json names if the store has it, else a new one (recorded there).

    With the default store (file:<run>/mlruns), an MLflow run or experiment whose artifacts live outside this run
    directory (a copied or moved run directory: MLflow's file store keeps absolute paths) is not continued: a new
    one is made here, so a copy never writes into the original."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage reports (read when mlflow loads)
    paths = RunPaths(run_dir)
    local = config.mlflow.uri is None
    uri = paths.mlruns.resolve().as_uri() if local else str(config.mlflow.uri)
    if _path_of(uri) is not None:  # MLflow 3 keeps its file store only on request
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise InputError(f"tracker: mlflow needs the mlflow package ({INSTALL})") from None
    try:
        client = MlflowClient(tracking_uri=uri)
    except (MlflowException, ImportError, ValueError) as err:
        raise InputError(f"mlflow.uri {uri!r}: cannot open this tracking store ({str(err).splitlines()[0][:200]})",
                         hint="a server (http://HOST:PORT) or a file store (file:/absolute/path)") from None
    record = read_tracker_record(paths.tracker_record) if paths.tracker_record.is_file() else None
    run = None
    if record is not None:
        try:
            run = client.get_run(record.run_id)
        except MlflowException:
            run = None  # a store without it (removed, or another uri): a new run
        if run is not None and local and not _inside(run.info.artifact_uri, paths.mlruns):
            run = None
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        return MlflowTracker(client, run.info.run_id, run_dir, new=False)
    name = config.mlflow.experiment or config.name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and local and not _inside(experiment.artifact_location, paths.mlruns):
        name = f"{name} ({run_dir.resolve()})"
        experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_dir.name,
                            tags={"sfbd_guard.run_dir": str(run_dir.resolve()), "sfbd_guard.method": config.method})
    write_tracker_record(paths.tracker_record, TrackerRecord(kind="mlflow", uri=config.mlflow.uri or "run-local",
                                                             experiment_id=experiment_id, run_id=run.info.run_id))
    return MlflowTracker(client, run.info.run_id, run_dir, new=True)


def make_tracker(config: PipelineConfig, run_dir: Path, *, start_step: int | None) -> Tracker:
    """The run's tracker (a new run's also gets the config). `start_step`: the step training continues from (a
    TensorBoard directory hides the events after it); None to add to the run without training (guard run's audit)."""
    tracker: TensorBoardTracker | MlflowTracker
    if config.tracker == "none":
        return NoTracker()
    tracker = TensorBoardTracker(run_dir, start_step) if config.tracker == "tensorboard" else _mlflow(config, run_dir)
    if tracker.new:
        tracker.log_params(config_params(config))
    return tracker


@contextmanager
def open_tracker(config: PipelineConfig, run_dir: Path, *, start_step: int | None,
                 enabled: bool = True) -> Iterator[Tracker]:
    """`make_tracker` (a NoTracker where not `enabled`: the ranks of a torchrun but 0), closed at the end."""
    tracker = make_tracker(config, run_dir, start_step=start_step) if enabled else NoTracker()
    try:
        yield tracker
    except BaseException:
        with suppress(Exception):  # the error that ended the run is the one to report
            tracker.close(ok=False)
        raise
    tracker.close()


def log_audit(config: PipelineConfig, run_dir: Path, counts: Mapping[str, int]) -> None:
    """guard run's audit verdict counts (`audit/copy`, ...), at the run's last step, into the run's tracker."""
    if config.tracker == "none":
        return
    step = MetricsLog.resume(RunPaths(run_dir).metrics, 2**62).last_step()
    with open_tracker(config, run_dir, start_step=None) as tracker:
        tracker.log_scalars(step, {f"audit/{verdict}": float(count) for verdict, count in sorted(counts.items())})
