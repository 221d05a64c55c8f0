"""The training engine on tiny data: runs, resume, the data boundary, sampling, the ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import train
from sfbd_guard.policy.model import load_policy


@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("digits8")
    return prepare(load_policy(write_policy(tmp / "policy.yaml", digits_policy(tmp / "prepared")))).output


def _config(tmp_path: Path, data: Path, name: str = "run", **overrides: object):  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / f"{name}.yaml", tiny_pipeline(data, tmp_path / name, **overrides))
    return load_pipeline(path)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "ema.safetensors")


def test_train_writes_run_directory(tmp_path: Path, digits8: Path) -> None:
    shown: dict[str, int] = {}

    def progress(label: str, total: int):  # type: ignore[no-untyped-def]
        shown[label] = 0
        return lambda done: shown.__setitem__(label, shown[label] + done)

    outcome = train(_config(tmp_path, digits8), resume=False, progress=progress)
    from sfbd_guard.engine.trainer import SNAPSHOT_STEPS

    grids = {label: n for label, n in shown.items() if label.startswith("snapshot grid-step-")}
    grid = _config(tmp_path, digits8).grid_size
    assert list(grids.values()) == [SNAPSHOT_STEPS * grid], "a progress line while the final grid is drawn, ticked per step"
    run = outcome.run_dir
    assert outcome.step == 8 and (run / "config.resolved.yaml").is_file()
    names = sorted(p.name for p in outcome.checkpoint.iterdir())
    assert names == ["ema.safetensors", "net.safetensors", "state.safetensors"]
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [row["step"] for row in metrics] == list(range(1, 9))
    assert {"kimg", "round", "loss", "lr", "seconds_per_kimg"} <= set(metrics[0])
    assert list((run / "snapshots").glob("grid-step-*.png")), "a sample grid at the end"
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl")), "no pickles"


@pytest.mark.parametrize("network", ["ddpmpp", "diffusers-unet2d"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path: Path, digits8: Path,
                                                              monkeypatch: pytest.MonkeyPatch, network: str) -> None:
    """Bit-identical, for both networks (with dropout: its randomness is resumed too)."""
    model = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1}
    straight = train(_config(tmp_path, digits8, "straight", network=network, model=model), resume=False)
    from sfbd_guard.engine import trainer as module

    real_step = module.Trainer.train_step

    def crash_at_step_6(self, pool, phase):  # type: ignore[no-untyped-def]
        if self.state.step == 6:
            raise KeyboardInterrupt
        real_step(self, pool, phase)

    config = _config(tmp_path, digits8, "crashed", network=network, model=model)
    monkeypatch.setattr(module.Trainer, "train_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    monkeypatch.undo()
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text() == "step-000000004"
    resumed = train(config, resume=True)
    assert resumed.resumed and resumed.step == 8
    steps = [row["step"] for row in pq.read_table(resumed.run_dir / "metrics.parquet").to_pylist()]
    assert steps == list(range(1, 9)), "no duplicated or lost metric rows"
    for name, tensor in _weights(straight.run_dir).items():
        assert torch.equal(tensor, _weights(resumed.run_dir)[name]), name


def test_kill_9_then_resume(tmp_path: Path, digits8: Path) -> None:
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(digits8, tmp_path / "run", checkpoint_every=2,
                                                               schedule={"pretrain_kimg": 2.0}))
    env = {**os.environ, "GUARD_LEDGER": str(tmp_path / "ledger"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sfbd_guard.cli", "train", "--pipeline", str(pipeline), "--allow-unrecorded"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-000000006"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert latest.exists(), "no checkpoint before the kill"
    killed_at = latest.read_text()
    assert killed_at < "step-000000125", killed_at
    done = subprocess.run([sys.executable, "-m", "sfbd_guard.cli", "train", "--resume", str(tmp_path / "run"), "--allow-unrecorded"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps = [row["step"] for row in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()]
    assert steps == list(range(1, 126))  # 2000 images / 16 per step, rounded up


def test_train_refuses_raw_and_tampered_data(cli, tmp_path: Path, digits8: Path, celeba_root: Path) -> None:  # type: ignore[no-untyped-def]
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(digits8, tmp_path / "run"))
    raw = cli("train", "--pipeline", pipeline, "--data", celeba_root, "--out", tmp_path / "raw")
    assert raw.code == 2 and "not a prepared directory" in raw.err and "Traceback" not in raw.err
    import shutil

    copy = Path(shutil.copytree(digits8, tmp_path / "copy"))
    with open(copy / "clean" / "shard-00000.npy", "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x07")
    tampered = cli("train", "--pipeline", pipeline, "--data", copy, "--out", tmp_path / "tampered")
    assert tampered.code == 1 and "does not match the sha256" in tampered.err  # a failed check, not bad input
    assert not (tmp_path / "tampered").exists()


def test_bad_pipeline_values_and_flags_exit_2(cli, tmp_path: Path, digits8: Path) -> None:  # type: ignore[no-untyped-def]
    bad = write_policy(tmp_path / "bad.yaml", tiny_pipeline(digits8, tmp_path / "run", batch=0))
    result = cli("train", "--pipeline", bad)
    assert result.code == 2 and "bad.yaml: batch" in result.err
    good = write_policy(tmp_path / "good.yaml", tiny_pipeline(digits8, tmp_path / "run"))
    assert cli("train", "--pipeline", good, "--set", "optimizer.lrr=1").code == 2
    assert cli("train", "--pipeline", good, "--method", "magic").code == 2
    assert cli("train", "--pipeline", good, "--resume", tmp_path / "run").code == 2
    assert cli("train", "--resume", tmp_path / "nothing").code == 2


def test_train_ledger_event_records_the_arrays_read(cli, tmp_path: Path, digits8: Path, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(digits8, tmp_path / "run"))
    assert cli("train", "--pipeline", pipeline).code == 1, "digits8 was prepared without a ledger event"
    assert cli("train", "--pipeline", pipeline, "--allow-unrecorded").code == 0
    (inputs, outputs, summary), = duckdb.sql(
        f"SELECT inputs, outputs, summary FROM read_parquet('{_isolated_ledger}/train/*.parquet') WHERE status = 'ok'").fetchall()
    assert json.loads(summary)["unrecorded_data"] is True
    card = json.loads((digits8 / "card.json").read_text())
    assert {i["path"].split("/prepared/")[1]: i["sha256"] for i in inputs if i["role"] == "array"} == card["files"]
    assert [i["sha256"] for i in inputs if i["role"] == "prepared"] == [card["fingerprint"]]
    assert {o["role"] for o in outputs} >= {"net", "ema", "run"} and json.loads(summary)["step"] == 8


def test_sampling_is_deterministic_and_batch_independent(cli, tmp_path: Path, digits8: Path) -> None:  # type: ignore[no-untyped-def]
    run = train(_config(tmp_path, digits8), resume=False).run_dir
    first = cli("sample", "--run", run, "--n", 5, "--out", tmp_path / "a", "--steps", 4, "--batch", 5)
    assert first.code == 0, first.err
    assert cli("sample", "--run", run, "--n", 5, "--out", tmp_path / "b", "--steps", 4, "--batch", 2).code == 0
    assert cli("sample", "--run", run, "--n", 5, "--out", tmp_path / "c", "--steps", 4, "--seed", 1).code == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png", "samples.json"]
    import json

    assert json.loads((tmp_path / "a" / "samples.json").read_text())["images"] == names[:5]
    same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names[:5]]
    other = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "c" / n).read_bytes() for n in names[:5]]
    assert all(same) and not any(other)
