"""The run directory's names: the one place they are spelled (tests/test_layout.py checks it).

    config.resolved.yaml   the pipeline as trained, every default filled in (engine/service.py)
    run.json               what the run consumed and made: the run record (contracts/run_record.py)
    metrics.parquet        one row per logged step, validation and round measures (engine/metrics.py)
    checkpoints/step-*/    net, EMA and state safetensors, plus attachments (engine/checkpoint.py)
    rounds/round-NN/       SFBD's denoised round sets, float shards (engine/denoise.py)
    bank/bank.npy          online SFBD's bank of denoised copies (engine/sfbd.py)
    snapshots/*.png        sample grids during training
    tensorboard/           tracker: tensorboard's event files (engine/trackers.py)
    mlruns/                tracker: mlflow's file store (the default; another mlflow.uri leaves it out)
    tracker.json           tracker: mlflow: the MLflow run a resumed run continues (contracts/tracker_record.py)
    samples/               guard run's samples: samples.json, grid.png, one PNG per image, done.json
    audit/                 guard run's audit report of those samples, and done.json
    report.html, DATASHEET.md   guard run's compliance report and datasheet

A membership report (`guard membership --out`) holds membership.parquet, membership.json, membership.html
and roc.svg. `samples/` and `audit/` have the layout of any samples folder and audit report (`guard sample --out`,
`guard audit --out`), whose file names are kept here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESOLVED = "config.resolved.yaml"
RUN_RECORD = "run.json"
METRICS = "metrics.parquet"
CHECKPOINTS = "checkpoints"
ROUNDS = "rounds"
BANK_FOLDER = "bank"
BANK = "bank.npy"  # in bank/, and attached to every checkpoint of online SFBD
SNAPSHOTS = "snapshots"
TENSORBOARD = "tensorboard"  # tracker: tensorboard's log directory
MLRUNS = "mlruns"  # tracker: mlflow's default file store
TRACKER_RECORD = "tracker.json"
SAMPLES = "samples"
AUDIT = "audit"
DONE = "done.json"  # guard run's marker that a stage's folder is finished
REPORT = "report.html"
DATASHEET = "DATASHEET.md"
# a samples folder (guard sample --out)
SAMPLES_INDEX = "samples.json"
GRID = "grid.png"
# an audit report folder (guard audit --out)
AUDIT_TABLE = "samples.parquet"  # one row per sample: its verdict and nearest protected neighbours
AUDIT_SUMMARY = "summary.json"  # contracts/audit_summary.py
SIMILARITY = "similarity.png"
AUDIT_FILES = (AUDIT_TABLE, AUDIT_SUMMARY, REPORT, SIMILARITY)
# a folder of imported weights (guard import-weights): the weights, and what the user declared about them
IMPORT_RECORD = "import.json"
IMPORT_WEIGHTS = "ema.safetensors"
# a membership report folder (guard membership --out)
MEMBERSHIP_SCORES = "membership.parquet"  # one row per image and model: its group, errors per level and score
MEMBERSHIP_SUMMARY = "membership.json"  # contracts/membership.py
MEMBERSHIP_PAGE = "membership.html"
MEMBERSHIP_ROC = "roc.svg"
MEMBERSHIP_FILES = (MEMBERSHIP_SCORES, MEMBERSHIP_SUMMARY, MEMBERSHIP_PAGE, MEMBERSHIP_ROC)
MEMBERSHIP_PARTIAL = ".partial"  # an unfinished test's errors, unit by unit (removed when it finishes)


@dataclass(frozen=True)
class RunPaths:
    """The paths of a run directory rooted at `root`."""

    root: Path

    @property
    def resolved(self) -> Path:
        return self.root / RESOLVED

    @property
    def record(self) -> Path:
        return self.root / RUN_RECORD

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def round_set(self, round_: int) -> Path:
        return self.root / ROUNDS / f"round-{round_:02d}"

    @property
    def bank(self) -> Path:
        return self.root / BANK_FOLDER / BANK

    def snapshot(self, name: str) -> Path:
        return self.root / SNAPSHOTS / f"{name}.png"

    @property
    def snapshots(self) -> Path:
        return self.root / SNAPSHOTS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def mlruns(self) -> Path:
        return self.root / MLRUNS

    @property
    def tracker_record(self) -> Path:
        return self.root / TRACKER_RECORD

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def audit(self) -> Path:
        return self.root / AUDIT

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def datasheet(self) -> Path:
        return self.root / DATASHEET
