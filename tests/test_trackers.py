"""`tracker: tensorboard | mlflow`: tiny runs, read back from the files the trackers wrote (TensorBoard's event files
through its EventAccumulator, MLflow's local file store through MlflowClient): losses per phase, learning rate,
kimg/s, snapshot grids, the privacy spent, guard run's audit counts, and a resumed run continuing the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import digits_policy, guard, tiny_pipeline, write_chain, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import pipeline_of_run, train
from sfbd_guard.engine.trackers import log_audit, make_tracker
from sfbd_guard.errors import InputError
from sfbd_guard.policy.model import load_policy

# 2 clean pretraining steps, then two private SFBD rounds of 3 steps (DP-SGD): every kind of value a tracker gets
SCHEDULE = {"pretrain_kimg": 0.032, "rounds": 2, "round_kimg": 0.048}
PRIVACY = {"epsilon": 8.0, "accountant": "rdp", "physical_batch": 8}
PHASES = {"loss/pretrain": [1, 2], "loss/round-1": [3, 4, 5], "loss/round-2": [6, 7, 8]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _mlflow_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reading side's client (the tool sets it for itself)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits-trackers")
    return prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared", drop=0.75)))).output


def _config(tmp_path: Path, data: Path, name: str, **overrides: Any):  # type: ignore[no-untyped-def]
    pipeline = tiny_pipeline(data, tmp_path / name, **overrides)
    pipeline["model"]["model_channels"] = 8
    pipeline.setdefault("denoise", {"steps": 3, "grid": "fitted", "batch": 1024})
    return load_pipeline(write_policy(tmp_path / f"{name}.yaml", pipeline))


def _private_sfbd(tmp_path: Path, data: Path, tracker: str):  # type: ignore[no-untyped-def]
    return train(_config(tmp_path, data, tracker, method="sfbd", schedule=SCHEDULE, privacy=PRIVACY, tracker=tracker,
                         snapshot_every=4, checkpoint_every=2), resume=False)


def _events(run: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _mlflow(run: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    record = json.loads((run / "tracker.json").read_text())
    return MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri()), record["run_id"]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return pq.read_table(run / "metrics.parquet").to_pylist()


def _pixels(data: bytes | Path) -> Any:
    import io

    import numpy as np

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return np.asarray(image.convert("L"))


def test_tensorboard_event_files_hold_the_run(tmp_path: Path, digits: Path) -> None:
    outcome = _private_sfbd(tmp_path, digits, "tensorboard")
    events, rows = _events(outcome.run_dir), _metrics(outcome.run_dir)
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag, steps in PHASES.items():  # one curve per phase, the losses of metrics.parquet
        assert scalars[tag] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["step"] in steps]
    assert scalars["lr"] == [(r["step"], pytest.approx(r["lr"], rel=1e-6)) for r in rows]
    assert scalars["kimg_per_s"] == [(r["step"], pytest.approx(1 / r["seconds_per_kimg"], rel=1e-6)) for r in rows]
    assert [step for step, _ in scalars["kimg"]] == list(range(1, 9))
    # the budget spent, when each private round ends; the last is the run's epsilon
    assert [step for step, _ in scalars["privacy/epsilon"]] == [5, 8]
    assert scalars["privacy/epsilon"][-1][1] == pytest.approx(outcome.privacy["epsilon"], rel=1e-6)
    assert [value for _, value in scalars["privacy/steps"]] == [3, 6]
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert images == {"snapshots/grid": [4, 8, 8], "snapshots/grid-round-1": [5], "snapshots/grid-round-2": [8]}
    shown = _pixels(events.Images("snapshots/grid-round-1")[0].encoded_image_string)
    assert (shown == _pixels(outcome.run_dir / "snapshots" / "grid-round-1.png")).all(), "the grid itself"
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_file_store_holds_the_run(tmp_path: Path, digits: Path) -> None:
    outcome = _private_sfbd(tmp_path, digits, "mlflow")
    client, run_id = _mlflow(outcome.run_dir)
    rows = _metrics(outcome.run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == outcome.run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "tiny", "the pipeline's name"
    for tag, steps in PHASES.items():
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, tag)]
        assert history == [(r["step"], pytest.approx(r["loss"])) for r in rows if r["step"] in steps]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run_id, "kimg_per_s")] == list(range(1, 9))
    epsilon = client.get_metric_history(run_id, "privacy/epsilon")
    assert [m.step for m in epsilon] == [5, 8] and epsilon[-1].value == pytest.approx(outcome.privacy["epsilon"])
    params = run.data.params
    assert params["method"] == "sfbd" and params["privacy.epsilon"] == "8.0" and params["schedule.rounds"] == "2"
    logged = {a.path for a in client.list_artifacts(run_id, "snapshots")}
    grids = sorted((outcome.run_dir / "snapshots").glob("*.png"))
    assert logged == {f"snapshots/{p.name}" for p in grids} and len(grids) == 4
    for path in grids:
        copy = Path(client.download_artifacts(run_id, f"snapshots/{path.name}", str(tmp_path / "down")))
        assert copy.read_bytes() == path.read_bytes()

    log_audit(pipeline_of_run(outcome.run_dir), outcome.run_dir, {"copy": 1, "suspect": 2, "novel": 5})
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "audit/copy")] == [(8, 1.0)]
    assert client.get_run(run_id).data.metrics["audit/novel"] == 5.0, "the same MLflow run"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    (outcome.run_dir / "tracker.json").write_text('{"kind": "mlflow", "run_id": 7}')
    with pytest.raises(InputError, match=r"tracker\.json: uri: required key is missing"):
        make_tracker(pipeline_of_run(outcome.run_dir), outcome.run_dir, start_step=None)


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_a_resumed_run_continues_the_same_tracker_run(tmp_path: Path, digits: Path, kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after step 6 (checkpoint at 4, a grid drawn at 5): the resumed run logs steps 5-8 once, in the same
    MLflow run; TensorBoard hides what the killed process logged after the checkpoint."""
    from sfbd_guard.engine import trainer

    config = _config(tmp_path, digits, "run", tracker=kind, snapshot_every=5)
    real = trainer.Trainer.train_step

    def crash(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.state.step == 6:
            raise KeyboardInterrupt
        real(self, mixture, phase)

    monkeypatch.setattr(trainer.Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    monkeypatch.setattr(trainer.Trainer, "train_step", real)
    run = Path(str(config.out))
    first = json.loads((run / "tracker.json").read_text())["run_id"] if kind == "mlflow" else None
    train(pipeline_of_run(run), resume=True)
    if kind == "tensorboard":
        events = _events(run)
        assert [e.step for e in events.Scalars("lr")] == list(range(1, 9))
        assert [e.step for e in events.Images("snapshots/grid")] == [5, 8], "the killed process's grid is purged"
    else:
        client, run_id = _mlflow(run)
        assert run_id == first and client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "lr")] == list(range(1, 9))
        assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_guard_run_tracker_flag_logs_the_audit_counts(tmp_path: Path) -> None:
    """`guard run --tracker mlflow`: training and then the audit's verdict counts, in one MLflow run."""
    pipeline = write_chain(tmp_path)
    assert guard("run", pipeline, "--tracker", "mlflow", "--ledger", tmp_path / "ledger") == 0
    run = tmp_path / "runs" / "chain"
    client, run_id = _mlflow(run)
    counts = json.loads((run / "audit" / "summary.json").read_text())["counts"]
    metrics = client.get_run(run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("audit/")} == {f"audit/{k}": v for k, v in counts.items()}
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == list(range(1, 9))


def test_train_tracker_flag_sets_the_pipeline_key(cli, tmp_path: Path, digits: Path,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import service

    seen = {}

    def capture(config, **kwargs):  # type: ignore[no-untyped-def]
        seen["tracker"] = config.tracker
        return service.TrainOutcome(tmp_path, config, None, 0, 0.0, False, 0.0)

    monkeypatch.setattr(service, "train_recorded", capture)
    path = write_policy(tmp_path / "p.yaml", tiny_pipeline(digits, tmp_path / "run"))
    done = cli("train", "--pipeline", path, "--tracker", "tensorboard")
    assert done.code == 0, done.err
    assert seen == {"tracker": "tensorboard"}
    assert load_pipeline(path).tracker == "none", "off unless asked for"
    assert cli("train", "--pipeline", path, "--tracker", "wandb").code == 2
