"""Real layouts at real size: `guard prepare` time and peak memory at 20k and 200k records, per input format.

The same synthetic 64 px records (smooth colour fields with shapes, JPEG, distinct per record, with a url,
a caption, a licence and an opt-out flag) are written three ways: WebDataset shards as img2dataset writes
them (KEY.jpg + KEY.json + KEY.txt, 10,000 records per tar), Parquet files with the Hugging Face image
struct ({bytes, path}, 10,000 rows per file) and an image folder (10,000 files per subfolder, with
metadata.jsonl). Each is prepared by a whole `guard prepare` command (process start, imports, reading,
decoding, noising, writing) under one policy (licence cc0 → clean, opted out → excluded, rest → protected)
with `--workers` processes, and measured:

- wall time, records per second;
- peak RSS (VmHWM) of the `guard prepare` process itself, and the largest peak of its worker processes.

The issue's goal: peak RSS at 200k ≤ 1.3× the peak at 20k (memory does not grow with the dataset).

Training memory (`--train`): `benchmarks/scale_train.py` measures `guard train`'s anonymous memory and step
time at 1k, 10k and 100k protected 32 px records; this script runs it and folds its numbers in.

Run it on an otherwise idle machine. Data is cached under `--work` (default: a folder in /tmp) between runs.

Example:
    PYTHONPATH=. python benchmarks/scale_data.py --sizes 20000 200000 --json benchmarks/results/scale_data.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from scale_train import _status  # noqa: E402 (a sibling script)
from scale_train import measure as measure_train  # noqa: E402

PER_FILE = 10_000
SIZE = 64
FORMATS = ("webdataset", "parquet", "imagefolder")


def _records(count: int, seed: int = 0) -> Any:
    """(key, jpeg bytes, metadata) for `count` records, generated one at a time."""
    from fixtures.synthetic import random_image

    rng = np.random.default_rng(seed)
    for i in range(count):
        buffer = io.BytesIO()
        random_image(rng, SIZE, SIZE).convert("RGB").save(buffer, "JPEG", quality=90)
        licence = ("cc0", "cc-by-nc", "all-rights-reserved")[int(rng.integers(0, 3))]
        meta = {"key": f"{i:09d}", "url": f"https://example.org/img/{i}.jpg", "caption": f"synthetic image {i}",
                "license": licence, "opt_out": bool(rng.random() < 0.05), "width": SIZE, "height": SIZE}
        yield meta["key"], buffer.getvalue(), meta


def write_webdataset(root: Path, count: int) -> None:
    root.mkdir(parents=True)
    records = _records(count)
    for shard in range(0, count, PER_FILE):
        with tarfile.open(root / f"{shard // PER_FILE:05d}.tar", "w") as tar:
            for _ in range(min(PER_FILE, count - shard)):
                key, data, meta = next(records)
                for suffix, payload in ((".jpg", data), (".json", json.dumps({**meta, "status": "success"}).encode()),
                                        (".txt", meta["caption"].encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))


def write_parquet(root: Path, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    rows: list[dict[str, Any]] = []

    def flush(index: int) -> None:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, root / f"train-{index:05d}.parquet", row_group_size=1000)
        rows.clear()

    for i, (key, data, meta) in enumerate(_records(count)):
        rows.append({"image": {"bytes": data, "path": f"{key}.jpg"}, **meta})
        if len(rows) == PER_FILE:
            flush(i // PER_FILE)
    if rows:
        flush(count // PER_FILE)


def write_imagefolder(root: Path, count: int) -> None:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as listing:
        for i, (key, data, meta) in enumerate(_records(count)):
            name = f"{i // PER_FILE:05d}/{key}.jpg"
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_bytes(data)
            listing.write(json.dumps({"file_name": name, **meta}) + "\n")


WRITERS = {"webdataset": write_webdataset, "parquet": write_parquet, "imagefolder": write_imagefolder}


def dataset(work: Path, fmt: str, count: int) -> Path:
    root = work / f"{fmt}-{count}"
    if not (root / ".complete").exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        WRITERS[fmt](root, count)
        (root / ".complete").write_text("")
        print(f"  wrote {fmt} {count:,} in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def policy(work: Path, fmt: str, root: Path) -> Path:
    folder = work / f"policy-{fmt}"
    folder.mkdir(exist_ok=True)
    path = folder / "policy.yaml"
    path.write_text(json.dumps({
        "version": 1, "name": f"scale-{fmt}",
        "dataset": {"format": fmt, "root": str(root), "resolution": SIZE},
        "rules": [{"name": "opted-out", "action": "exclude", "where": "opt_out"},
                  {"name": "cc0", "action": "clean", "where": "license = 'cc0'"},
                  {"name": "rest", "action": "protect"}],
        "noise": {"sigma": 0.5}, "output": str(work / "prepared"),
    }))
    return path


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _status(int(entry.name)).get("PPid") == pid:
            found.append(int(entry.name))
    return found


def measure(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `guard ARGS`; wall time, its own peak RSS (from wait4) and its workers' largest peak (polled)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "sfbd_guard.cli", *args], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: dict[int, int] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for child in _children(process.pid):
                workers[child] = max(workers.get(child, 0), _status(child).get("VmHWM", 0))
            time.sleep(0.5)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    thread.join()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode:
        raise SystemExit(f"guard {' '.join(args)} failed:\n{stderr}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(max(workers.values(), default=0) / 1024, 1)}


def run_prepare(work: Path, sizes: list[int], formats: list[str], workers: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GUARD_LEDGER": str(work / "ledger")}
    key = work / "noise.key"
    if not key.exists():
        subprocess.run([sys.executable, "-m", "sfbd_guard.cli", "keygen", str(key)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    results = []
    for fmt in formats:
        for count in sizes:
            root = dataset(work, fmt, count)
            out = work / f"prepared-{fmt}-{count}"
            args = ["prepare", "--policy", str(policy(work, fmt, root)), "--out", str(out), "--overwrite",
                    "--workers", str(workers), "--noise-key", str(key)]
            row = {"format": fmt, "records": count, "workers": workers, **measure(args, env)}
            row["records_per_s"] = round(count / row["seconds"], 1)
            card = json.loads((out / "card.json").read_text())
            row["counts"] = card["counts"]
            print(f"  prepare {fmt:11s} {count:>8,}: {row['seconds']:7.1f} s  {row['records_per_s']:7.0f} rec/s  "
                  f"peak RSS {row['peak_rss_mb']:6.1f} MB (workers {row['worker_peak_rss_mb']:.1f} MB)", flush=True)
            results.append(row)
    return results


def ratios(rows: list[dict[str, Any]], small: int, large: int) -> dict[str, float]:
    """Peak RSS at `large` over `small`, per format."""
    out = {}
    for fmt in {r["format"] for r in rows}:
        by = {r["records"]: r for r in rows if r["format"] == fmt}
        if small in by and large in by:
            out[fmt] = round(by[large]["peak_rss_mb"] / by[small]["peak_rss_mb"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="also run benchmarks/scale_train.py's measure()")
    parser.add_argument("--no-prepare", action="store_true", help="only the training measurement")
    parser.add_argument("--train-methods", nargs="+", default=["sfbd", "online-sfbd"],
                        choices=["sfbd", "online-sfbd", "ambient"])
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "guard-scale-data")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine_cpus": os.cpu_count(), "image_size": SIZE}
    report["prepare"] = [] if args.no_prepare else run_prepare(args.work, sorted(args.sizes), args.formats, args.workers)
    if len(args.sizes) >= 2 and report["prepare"]:
        report["peak_rss_ratio"] = ratios(report["prepare"], min(args.sizes), max(args.sizes))
        print(f"peak RSS {max(args.sizes):,} / {min(args.sizes):,}: {report['peak_rss_ratio']}")
    if args.train:
        report["train"] = []
        for count in sorted(args.train_sizes):
            row = measure_train(count, args.work / f"train-{count}", tuple(args.train_methods))
            print(f"  train {count:>8,}: " + ", ".join(
                f"{m} RssAnon {row[m]['peak_rss_anon_mb']:.0f} MB, step {row[m]['median_step_seconds']:.3f} s"
                for m in args.train_methods), flush=True)
            report["train"].append(row)
        first, last = report["train"][0], report["train"][-1]
        report["train_rss_anon_growth_mb"] = {
            m: round(last[m]["peak_rss_anon_mb"] - first[m]["peak_rss_anon_mb"], 1) for m in args.train_methods}
        print(f"RssAnon growth {last['records']:,} over {first['records']:,}: {report['train_rss_anon_growth_mb']}")
        if args.json:  # after each stage: a long run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
