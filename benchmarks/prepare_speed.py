"""How fast `guard prepare` runs, next to the time PIL alone takes to decode the same JPEGs.

Generates N synthetic CelebA-layout JPEGs (178×218), prepares them at 64 px with the CelebA policy
setting (10% of identities clean, the rest protected at sigma 1.3824) with 1 and 2 workers, and
times single-process PIL decoding of the same files (the floor). The `guard prepare` times are of
the whole command (process start, imports, metadata, rules, decoding, noising, writing).

    python benchmarks/prepare_speed.py --count 5000 [--json out.json]
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

import yaml
from PIL import Image

from fixtures.synthetic import write_celeba


def decode_floor(folder: Path) -> float:
    """Seconds for one process to fully decode every JPEG with PIL (best of 3)."""
    files = sorted(folder.glob("*.jpg"))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for path in files:
            with Image.open(path) as image:
                image.load()
        best = min(best, time.perf_counter() - start)
    return best


def prepare_seconds(policy: Path, out: Path, workers: int, ledger: Path) -> float:
    """Wall-clock seconds of `guard prepare` as a user runs it (best of 2)."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sfbd_guard.cli", "prepare", "--policy", str(policy), "--out", str(out),
                        "--workers", str(workers), "--overwrite", "--ledger", str(ledger)],
                       check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="number of synthetic CelebA JPEGs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = write_celeba(tmp / "celeba", args.count, identities=max(1, args.count // 20))
        policy = tmp / "celeba.yaml"
        policy.write_text(yaml.safe_dump({
            "version": 1, "name": "bench", "dataset": {"format": "celeba", "root": str(root), "split": "all", "resolution": 64},
            "rules": [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.1, "by": "identity"}},
                      {"name": "rest", "action": "protect"}],
            "noise": {"sigma": 1.3824}, "output": str(tmp / "out")}))
        floor = decode_floor(root / "img_align_celeba")
        one = prepare_seconds(policy, tmp / "out", 1, tmp / "ledger")
        two = prepare_seconds(policy, tmp / "out", 2, tmp / "ledger")
    results = {
        "images": args.count, "cpus": os.cpu_count(),
        "pil_decode_floor_s": round(floor, 3), "pil_decode_img_per_s": round(args.count / floor, 1),
        "prepare_1_worker_s": round(one, 3), "prepare_1_worker_img_per_s": round(args.count / one, 1),
        "prepare_2_workers_s": round(two, 3), "prepare_2_workers_img_per_s": round(args.count / two, 1),
        "ratio_2_workers_to_floor": round(two / floor, 3), "target_ratio": 1.5,
    }
    print(f"{'measure':<34}{'seconds':>10}{'img/s':>10}")
    print(f"{'PIL decode, 1 process (floor)':<34}{floor:>10.2f}{args.count / floor:>10.0f}")
    print(f"{'guard prepare, 1 worker':<34}{one:>10.2f}{args.count / one:>10.0f}")
    print(f"{'guard prepare, 2 workers':<34}{two:>10.2f}{args.count / two:>10.0f}")
    print(f"2 workers / floor = {two / floor:.2f} (target <= 1.5)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
