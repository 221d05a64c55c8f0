"""Training that shares its machine: wall time of 1, 2 and 3 `guard train` jobs at once, per job over solo.

Each job trains clean-only on the same prepared digits (8 px) for `--kimg` kimg, a whole `guard train`
command (process start, imports, training, checkpoints). Settings (`--settings`):

- `old`: OpenMP and torch at their defaults (`GUARD_THREADS=off`: threads = cores, libgomp spin-waiting),
  as `guard` ran before it chose its threads;
- `auto`: `guard`'s automatic choice: OMP_WAIT_POLICY=PASSIVE and threads = the CPUs the process may use
  (the digits pipeline's `threads: 1` removed);
- `pipeline`: the shipped digits pipeline as it is (`threads: 1`, passive waiting).

Run it on an otherwise idle machine (another job would be a fourth sharer).

Example:
    PYTHONPATH=. python benchmarks/sharing.py --kimg 4 --json benchmarks/results/sharing.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _guard(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sfbd_guard.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


EXTRA_SETS = {"old": [], "auto": ["--set", "threads=null"], "pipeline": []}


def _env(setting: str, ledger: Path) -> dict[str, str]:
    unset = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GUARD_THREADS", "GUARD_THREADS_CHOICE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["GUARD_LEDGER"] = str(ledger)
    env["PYTHONPATH"] = str(ROOT)
    if setting == "old":
        env["GUARD_THREADS"] = "off"
    return env


def run_jobs(count: int, setting: str, work: Path, kimg: float) -> list[float]:
    """Start `count` training jobs at once; their wall times in seconds."""
    env = _env(setting, work / "ledger")
    jobs, started = [], []
    for i in range(count):
        out = work / f"run-{setting}-{count}-{i}-{time.monotonic_ns()}"
        args = ["train", "--pipeline", "pipelines/digits.yaml", "--data", str(work / "prepared"), "--out", str(out),
                "--method", "clean-only", "--set", f"schedule.pretrain_kimg={kimg}",
                "--set", f"schedule.total_kimg={kimg}", "--set", "schedule.rounds=0",
                "--set", "snapshot_every=100000", "--set", "checkpoint_every=100000", *EXTRA_SETS[setting]]
        started.append(time.perf_counter())
        jobs.append(_guard(args, env))
    walls = []
    for job, start in zip(jobs, started, strict=True):
        _, err = job.communicate()
        if job.returncode != 0:
            raise SystemExit(f"a job failed: {err.decode()[-500:]}")
        walls.append(time.perf_counter() - start)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kimg", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2, help="solo runs per setting (the best is the reference)")
    parser.add_argument("--settings", default="pipeline,auto,old", help="comma-separated: pipeline, auto, old")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, object] = {"kimg": args.kimg, "cpus": len(os.sched_getaffinity(0)), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy = work / "policy.yaml"
        policy.write_text((ROOT / "policies" / "digits.yaml").read_text().replace("../prepared/digits-8", str(work / "prepared")))
        done = subprocess.run([sys.executable, "-m", "sfbd_guard.cli", "prepare", "--policy", str(policy)],
                              env=_env("auto", work / "ledger"), cwd=ROOT, capture_output=True, check=False)
        if done.returncode != 0:
            raise SystemExit(done.stderr.decode())
        for setting in args.settings.split(","):
            solo = min(min(run_jobs(1, setting, work, args.kimg)) for _ in range(args.repeats))
            row: dict[str, object] = {"solo_s": round(solo, 2)}
            for count in (2, 3):
                walls = run_jobs(count, setting, work, args.kimg)
                row[f"{count}_jobs_s"] = [round(w, 2) for w in walls]
                row[f"{count}_jobs_over_solo"] = round(max(walls) / solo, 2)
            results["settings"][setting] = row  # type: ignore[index]
            print(setting, json.dumps(row), flush=True)
    settings: dict[str, dict[str, object]] = results["settings"]  # type: ignore[assignment]
    if "old" in settings:  # the yardstick of the issue: today's solo run
        for row in settings.values():
            for count in (2, 3):
                row[f"{count}_jobs_over_old_solo"] = round(max(row[f"{count}_jobs_s"]) / settings["old"]["solo_s"], 2)  # type: ignore[arg-type, operator]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
