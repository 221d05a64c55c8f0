"""Multi-process paths on the CPU with the gloo backend: batch inference order and a 2-process DDP run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import digits_policy, tiny_pipeline, write_policy
from sfbd_guard.curation.service import prepare_recorded
from sfbd_guard.engine.runtime import Runtime, gather_rows, rank_slice


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, total: int, results: dict) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(torch.device("cpu"), rank, world)
    index = rank_slice(total, rt)
    local = index.float().unsqueeze(1) * 10 + rank / 10  # row i holds 10 i (+ which rank computed it)
    gathered = gather_rows(local, index, total, rt)
    results[rank] = gathered.squeeze(1).tolist()
    dist.destroy_process_group()


@pytest.mark.parametrize("total", [7, 8])
def test_batch_inference_splits_across_ranks_and_gathers_in_record_order(total: int) -> None:
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, _free_port(), total, results), nprocs=2)
    expected = [10 * i + (i % 2) / 10 for i in range(total)]
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)


def test_two_process_ddp_training_run(tmp_path: Path) -> None:
    prepared = prepare_recorded(write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared")), data_root=None,
                                out=None, workers=1, strict=False, overwrite=False, ledger=tmp_path / "ledger", command=["test"]).output
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(prepared, tmp_path / "run"))
    env = {**os.environ, "GUARD_LEDGER": str(tmp_path / "ledger"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sfbd_guard.cli", "train", "--pipeline", str(pipeline)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [row["step"] for row in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()]
    assert steps == list(range(1, 9))  # global batch 16 = 2 × 8, the same schedule as one process
    events = duckdb.sql(f"SELECT summary FROM read_parquet('{tmp_path}/ledger/train/*.parquet')").fetchall()
    assert len(events) == 1 and '"world_size": 2' in events[0][0]
    assert "trained clean-only" in done.stdout and done.stdout.count("trained clean-only") == 1
