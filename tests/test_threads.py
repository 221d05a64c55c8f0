"""Threads sized to the CPUs a process may use, and passive OpenMP waiting, chosen before torch loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sfbd_guard.threads import cgroup_quota, choose_threads


def _info(env_extra: dict[str, str], *, cpus: str | None = None, args: tuple[str, ...] = ()) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    env.update(env_extra)
    prefix = ["taskset", "-c", cpus] if cpus is not None else []
    done = subprocess.run([*prefix, sys.executable, "-m", "sfbd_guard.cli", "info", *args], env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2 or cgroup_quota() is not None,
                    reason="needs taskset, 2 CPUs and no cgroup CPU quota")
def test_a_spawned_guard_reports_threads_for_its_affinity_and_environment() -> None:
    assert "1 thread(s) per process, OMP_WAIT_POLICY=PASSIVE (auto; affinity 1 CPU(s)" in _info({}, cpus="0")
    assert "2 thread(s) per process, OMP_WAIT_POLICY=PASSIVE (auto; affinity 2 CPU(s)" in _info({}, cpus="0,1")
    assert "1 thread(s) per process" in _info({"LOCAL_WORLD_SIZE": "2"}, cpus="0,1"), "two torchrun ranks share 2 CPUs"
    kept = _info({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, cpus="0")
    assert "3 thread(s) per process, OMP_WAIT_POLICY=ACTIVE (OMP_NUM_THREADS" in kept, "the user's settings win"
    assert "4 thread(s) per process, OMP_WAIT_POLICY=PASSIVE (--threads" in _info({"OMP_NUM_THREADS": "3"}, args=("--threads", "4"))


def test_a_training_process_runs_with_the_chosen_threads(tmp_path: Path) -> None:
    """The environment is set before torch is imported, so torch's intra-op pool has that size."""
    code = ("import sys; from sfbd_guard.threads import configure; c = configure(None); import torch, os; "
            "print(c.threads, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    prefix = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    out = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and out[2] == "PASSIVE"
    if prefix:
        assert out[0] == "1"


def test_cgroup_quotas_v1_and_v2(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "v2.cgroup").write_text("0::/job\n")
    assert cgroup_quota(v2, tmp_path / "v2.cgroup") == 1.5
    (v2 / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2, tmp_path / "v2.cgroup") is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "v1.cgroup").write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert cgroup_quota(v1, tmp_path / "v1.cgroup") == 3.0
    assert choose_threads(environ={}, cpus=8, quota=3.0).threads == 3, "a container's quota caps the threads"
    assert choose_threads(environ={}, cpus=8, quota=0.5).threads == 1, "at least one thread"


def test_the_run_record_and_the_train_event_carry_the_threads(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from helpers import digits_policy, read_events, tiny_pipeline, write_policy
    from sfbd_guard.contracts.run_record import read_run_record

    write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.9))
    assert cli("prepare", "--policy", tmp_path / "policy.yaml").code == 0
    write_policy(tmp_path / "pipe.yaml", tiny_pipeline(tmp_path / "prepared", tmp_path / "run"))
    result = cli("train", "--pipeline", tmp_path / "pipe.yaml", "--threads", "1")
    assert result.code == 0, result.err
    threads = read_run_record(tmp_path / "run").threads
    assert threads is not None and threads["torch_threads"] == 1 and "(--threads" in str(threads["choice"])
    import json
    import os

    train = [e for e in read_events(Path(os.environ["GUARD_LEDGER"])).to_pylist() if e["kind"] == "train"][-1]
    assert json.loads(train["summary"])["threads"]["torch_threads"] == 1


def test_the_order_of_the_choices() -> None:
    """--threads, then the user's OMP_NUM_THREADS, then the pipeline's `threads`, then the CPUs."""
    assert choose_threads(3, environ={"OMP_NUM_THREADS": "2"}, cpus=8, preferred=1).source == "--threads"
    chosen = choose_threads(None, environ={"OMP_NUM_THREADS": "2"}, cpus=8, preferred=1)
    assert (chosen.threads, chosen.source) == (2, "OMP_NUM_THREADS")
    chosen = choose_threads(None, environ={}, cpus=8, preferred=1)
    assert (chosen.threads, chosen.source) == (1, "pipeline threads")
    assert choose_threads(None, environ={}, cpus=8, quota=16.0).threads == 8, "the affinity caps a larger quota"
