"""`--executor ray` against `--executor local` on one machine, and the audit's peak memory with its reference in shards.

Synthetic records the size of the digits (8×8 PNG, RGB), `--records` of them in Parquet files of 10,000 rows
(each file one part), prepared with a policy that keeps 10 % clean and protects the rest. Each measurement
is a separate process (start-up, imports, for Ray its start: everything a user waits for):

- prepare: `prepare(..., workers=W)` (local pool) and `prepare(..., executor=ray)` on a Ray started with W
  CPUs: records per second, and their ratio (the issue's goal: ray / local ≥ 0.8);
- audit: `run_audit` of `--samples` generated images against every protected record (pixel embedder,
  no calibration holdout), local and ray: seconds, ratio;
- audit memory: the audit from the index cache, its reference in 1 shard and in 8 (`search.shard_size`),
  peak RSS (ru_maxrss) of the audit process, for the run that builds the cache and the one that reads it.

The data lives under `--work` (default /tmp/scale-out) and is deleted at the end unless `--keep`.

Example:
    PYTHONPATH=. python benchmarks/scale_out.py --records 200000 --json benchmarks/results/scale_out.json
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PER_FILE = 10_000


def write_data(root: Path, records: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("key", pa.string())])
    for start in range(0, records, PER_FILE):
        images, keys = [], []
        for i in range(start, min(start + PER_FILE, records)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": f"{i:07d}.png"})
            keys.append(f"{i:07d}")
        pq.write_table(pa.table({"image": images, "key": keys}, schema=schema), root / f"part-{start // PER_FILE:05d}.parquet")


def write_samples(folder: Path, count: int, seed: int = 1) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"s{i:04d}.png")


def _policy(work: Path) -> Path:
    import yaml

    policy = {"version": 1, "name": "scale-out", "dataset": {"format": "parquet", "root": str(work / "data"), "resolution": 8},
              "rules": [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.1}},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5, "key_file": str(work / "noise.key")}, "output": str(work / "prepared")}
    path = work / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints {"seconds", "peak_mib", ...} as JSON."""
    import resource

    from sfbd_guard.executor import ExecutorSpec

    executor = ExecutorSpec("ray", cpus=args.workers) if args.executor == "ray" else ExecutorSpec()
    work = Path(args.work)
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.child == "prepare":
        from sfbd_guard.curation.prepare import prepare
        from sfbd_guard.policy.model import load_policy

        out = work / f"prepared-{args.executor}"
        result = prepare(load_policy(_policy(work)), out=out, workers=args.workers, executor=executor, overwrite=True)
        extra["records"] = sum(result.counts.values())
    else:
        from sfbd_guard.auditing.config import resolve_audit_config
        from sfbd_guard.auditing.service import run_audit

        overrides: dict[str, Any] = {"calibration.holdout": "none", "report.thumbnails": False}
        if args.shard_size:
            overrides.update({"search.shard_size": args.shard_size, "cache.enabled": True,
                              "cache.dir": str(work / f"cache-{args.shard_size}")})
        result = run_audit(samples=work / "samples", data=work / "prepared-local", report=work / f"report-{args.executor}",
                           config=resolve_audit_config(None, overrides), executor=executor)
        extra.update(index=result.summary.index.kind, cache=result.summary.index.cache,
                     references=result.summary.references)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))


def run_child(work: Path, what: str, executor: str, workers: int, shard_size: int = 0) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", what, "--work", str(work), "--executor", executor,
               "--workers", str(workers), "--shard-size", str(shard_size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(what, executor, f"shard_size={shard_size}" if shard_size else "", result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/scale-out")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", choices=("prepare", "audit"))
    parser.add_argument("--executor", default="local")
    parser.add_argument("--shard-size", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    try:
        if not (work / "data").is_dir():
            from sfbd_guard.keys.secret import create_key_file

            work.mkdir(parents=True, exist_ok=True)
            create_key_file(work / "noise.key")
            write_data(work / "data", args.records)
            write_samples(work / "samples", args.samples)
        out: dict[str, Any] = {"records": args.records, "samples": args.samples, "workers": args.workers}
        for what in ("prepare", "audit"):
            local = run_child(work, what, "local", args.workers)
            remote = run_child(work, what, "ray", args.workers)
            out[what] = {"local": local, "ray": remote, "ray_over_local_throughput": local["seconds"] / remote["seconds"]}
        protected = out["audit"]["local"]["references"]
        memory: dict[str, Any] = {}
        for shards in (1, 8):
            size = -(-protected // shards)
            memory[f"{shards}_shards"] = {"build": run_child(work, "audit", "local", args.workers, size),
                                          "cached": run_child(work, "audit", "local", args.workers, size)}
        out["audit_memory"] = memory
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
