"""Anonymous memory and step time of `guard train` as the prepared directory grows (issue #14).

For each N: a synthetic CIFAR-10 layout of N 32 px records (`datasets.synthetic.write_cifar10`), prepared by
`guard prepare` (10% clean, the rest protected: honest noisy copies, so the noise statistics pass), then a few
steps of `sfbd` (with a round switch, so a round set is denoised and written) and of `online-sfbd` (bank filled
and refreshed) on a tiny network, each `guard train` in its own process. The parent samples the child's
/proc/<pid>/status every 20 ms: peak RssAnon (anonymous memory: what grows if data is loaded into the process)
and peak VmRSS (which also counts the page cache pages the process has mapped: the memory-mapped shards).
Step time: the median of metrics.parquet's seconds per step.

The goal: RssAnon at 100k protected records within 150 MB of the same run at 1k.

    PYTHONPATH=. python benchmarks/scale_train.py --records 1000 10000 --json out/scale_train.json

`measure(n, folder)` is the library entry point (benchmarks/scale_data.py calls it per N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

SIGMA = 0.5
TINY_MODEL = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}
# kimg of each phase: 4 pretraining steps of 32, then 2 SFBD rounds / an online phase of a few steps
SCHEDULES: dict[str, dict[str, Any]] = {
    "sfbd": {"pretrain_kimg": 0.128, "rounds": 2, "round_kimg": 0.128},
    "online-sfbd": {"pretrain_kimg": 0.128, "total_kimg": 0.384, "refresh_every": 2, "refresh_size": 256},
    # no denoising: the data path alone (mapped partitions, noise check, batches of clean and noisy copies)
    "ambient": {"total_kimg": 0.384},
}


def _status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM of a process, in kB, and its PPid (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM", "PPid"):
            values[key] = int(rest.split()[0])
    return values


def run_sampled(command: list[str], env: dict[str, str], interval: float = 0.02) -> dict[str, Any]:
    """Run `command`, sampling its /proc status; peak values in MB and the wall time."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _status(process.pid).items():
                peaks[key] = max(peaks[key], value)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output[-3000:]}")
    return {"peak_rss_anon_mb": round(peaks["RssAnon"] / 1024, 1), "peak_rss_file_mb": round(peaks["RssFile"] / 1024, 1),
            "peak_vm_rss_mb": round(peaks["VmRSS"] / 1024, 1), "seconds": round(time.perf_counter() - started, 2)}


def _guard(*args: object) -> list[str]:
    return [sys.executable, "-m", "sfbd_guard.cli", *(str(a) for a in args)]


def _env(ledger: Path) -> dict[str, str]:
    return {**os.environ, "GUARD_LEDGER": str(ledger), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "HF_HUB_OFFLINE": "1"}


def prepare_records(n: int, folder: Path) -> Path:
    """A prepared directory of about `n` 32 px records (10% clean), via the synthetic CIFAR-10 layout."""
    from fixtures.synthetic import write_cifar10

    prepared = folder / "prepared"
    if (prepared / "card.json").is_file():
        return prepared
    root = write_cifar10(folder / "cifar", -(-n // 5))
    key = folder / "noise.key"
    if not key.exists():
        subprocess.run(_guard("keygen", key), check=True, env=_env(folder / "ledger"), capture_output=True)
    policy = {"version": 1, "name": f"scale-{n}",
              "dataset": {"format": "cifar10", "root": str(root), "split": "train", "resolution": 32},
              "rules": [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.1, "seed": 0}},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": SIGMA, "key_file": str(key)}, "output": str(prepared)}
    (folder / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    subprocess.run(_guard("prepare", "--policy", folder / "policy.yaml", "--workers", 2), check=True,
                   env=_env(folder / "ledger"), capture_output=True)
    return prepared


def _pipeline(prepared: Path, out: Path, method: str) -> dict[str, Any]:
    return {"version": 1, "name": f"scale-{method}", "data": str(prepared), "method": method, "model": TINY_MODEL,
            "optimizer": {"lr": 2e-3, "warmup_kimg": 0.1}, "batch": 32, "schedule": SCHEDULES[method],
            "ema": {"halflife_kimg": 0.05}, "seed": 0, "device": "cpu", "checkpoint_every": 1000,
            "snapshot_every": 100000, "grid_size": 4, "denoise": {"steps": 2, "batch": 128}, "out": str(out)}


def measure(n: int, folder: Path, methods: tuple[str, ...] = ("sfbd", "online-sfbd")) -> dict[str, Any]:
    """Prepare N records under `folder`, then train each method in a child process; its peaks and step time."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = prepare_records(n, folder)
    counts = json.loads((prepared / "card.json").read_text())["counts"]
    result: dict[str, Any] = {"records": n, "counts": counts, "prepare_seconds": round(time.perf_counter() - started, 1)}
    for method in methods:
        out = folder / f"run-{method}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the prepared directory is kept)
        pipeline = folder / f"{method}.yaml"
        pipeline.write_text(yaml.safe_dump(_pipeline(prepared, out, method), sort_keys=False))
        peaks = run_sampled(_guard("train", "--pipeline", pipeline, "--out", out, "--threads", 1),
                            _env(folder / "ledger"))
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
        steps = [row["seconds_per_kimg"] * 32 / 1000 for row in rows]
        result[method] = {**peaks, "steps": len(rows), "median_step_seconds": round(statistics.median(steps), 4)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--work", type=Path, default=Path("out/scale_train"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for n in args.records:
        results.append(measure(n, args.work / f"n{n}"))
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            for method in SCHEDULES:
                growth = r[method]["peak_rss_anon_mb"] - base[method]["peak_rss_anon_mb"]
                print(f"{method}: RssAnon at {r['records']} records is {growth:+.1f} MB vs {base['records']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
