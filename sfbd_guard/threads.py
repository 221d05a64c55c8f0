"""CPU threads for the torch and OpenMP work of a `guard` command, chosen before torch is imported.

Two things make a torch job that shares its machine slow: OpenMP threads that spin while they wait for
a core another process holds (the default wait policy), and more threads than the CPUs the process may
use (a `taskset` mask, a container's CPU quota, several `torchrun` ranks on one host). So, unless the
user said otherwise:

- `OMP_WAIT_POLICY=PASSIVE`: waiting threads sleep instead of spinning;
- intra-op threads = the CPUs this process may use (its affinity mask, capped by a cgroup CPU quota,
  rounded down, at least 1) divided by the local world size under torchrun.

`--threads N` wins over everything, then an `OMP_NUM_THREADS` the user set, then the automatic choice;
an `OMP_WAIT_POLICY` the user set is kept. The choice is written to the run record.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CHOICE_VAR = "GUARD_THREADS_CHOICE"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # intra-op threads (OMP_NUM_THREADS, torch.set_num_threads)
    wait_policy: str  # OMP_WAIT_POLICY in force (PASSIVE unless the user set one)
    source: str  # why: OMP_NUM_THREADS, --threads, or auto
    cpus: int  # CPUs in the affinity mask
    quota: float | None  # cgroup CPU quota in CPUs, if any
    local_world_size: int  # processes of this run on this host (torchrun)

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return (f"{self.threads} thread(s) per process, OMP_WAIT_POLICY={self.wait_policy} ({self.source}; "
                f"affinity {self.cpus} CPU(s), cgroup quota {quota}, local world size {self.local_world_size})")


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cgroup_paths(root: Path, membership: Path) -> list[tuple[Path, str]]:
    """(folder, 'v1'|'v2') candidates for this process's CPU controller, most specific first."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    found: list[tuple[Path, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":  # cgroup v2 unified hierarchy
            found += [(root / relative, "v2"), (root, "v2")]
        elif "cpu" in controllers.split(","):
            for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                found += [(root / name / relative, "v1"), (root / name, "v1")]
    return found


def cgroup_quota(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cpu.max, or cfs_quota/cfs_period), None if unlimited."""
    for folder, version in _cgroup_paths(root, membership):
        try:
            if version == "v2":
                quota_text, period_text = (folder / "cpu.max").read_text().split()[:2]
                if quota_text == "max":
                    return None
                return int(quota_text) / int(period_text)
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
        except (OSError, ValueError):
            continue
    return None


def choose_threads(explicit: int | None = None, environ: Mapping[str, str] | None = None,
                   cpus: int | None = None, quota: float | None = None, *, preferred: int | None = None) -> ThreadChoice:
    """The thread count and wait policy for this process; nothing is changed (see `apply`).

    Order: `explicit` (--threads), the user's OMP_NUM_THREADS, `preferred` (a pipeline's `threads`), automatic."""
    env = os.environ if environ is None else environ
    cpus = affinity_cpus() if cpus is None else cpus
    quota = cgroup_quota() if quota is None else quota
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    wait_policy = env.get("OMP_WAIT_POLICY") or "PASSIVE"
    budget = float(cpus) if quota is None else min(float(cpus), quota)
    automatic = max(1, math.floor(budget / local))
    if explicit is not None and explicit >= 1:
        return ThreadChoice(explicit, wait_policy, "--threads", cpus, quota, local)
    preset = env.get("OMP_NUM_THREADS", "").strip()
    if preset:
        try:
            return ThreadChoice(max(1, int(preset.split(",")[0])), wait_policy, "OMP_NUM_THREADS", cpus, quota, local)
        except ValueError:
            pass
    if preferred is not None and preferred >= 1:
        return ThreadChoice(preferred, wait_policy, "pipeline threads", cpus, quota, local)
    return ThreadChoice(automatic, wait_policy, "auto", cpus, quota, local)


def apply(choice: ThreadChoice, environ: MutableMapping[str, str] | None = None) -> None:
    """Set what OpenMP and torch read when they start (call before torch is imported; if torch is already
    loaded, as in a test process, its intra-op thread count is set directly)."""

    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", choice.wait_policy)
    env["OMP_NUM_THREADS"] = str(choice.threads)
    env["MKL_NUM_THREADS"] = str(choice.threads)
    env[CHOICE_VAR] = choice.describe()  # why, for the run record of this process (and its children)
    torch = sys.modules.get("torch")
    if torch is not None and environ is None:
        torch.set_num_threads(choice.threads)


def in_force() -> dict[str, object]:
    """What this process runs with, for the run record: torch's intra-op threads, the wait policy and why."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "choice": os.environ.get(CHOICE_VAR)}


def configure(explicit: int | None = None, preferred: int | None = None) -> ThreadChoice:
    """Choose and apply the threads of this process; returns the choice for the run record.

    `GUARD_THREADS=off` leaves OpenMP and torch to their own defaults (for comparisons)."""
    choice = choose_threads(explicit, preferred=preferred)
    if os.environ.get("GUARD_THREADS", "").strip().lower() == "off" and explicit is None:
        return ThreadChoice(0, os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"), "off", choice.cpus, choice.quota,
                            choice.local_world_size)
    apply(choice)
    return choice
