"""Where `make demo`'s time goes: `guard run pipelines/digits.yaml` in this process, each stage timed, and the
training stage cut into its parts (optimizer steps, SFBD's denoising, snapshot grids, checkpoints, validation).

Run it on an idle machine, in a scratch folder (it writes prepared/, runs/ and guard-ledger/ there):

    cd $(mktemp -d) && XDG_CONFIG_HOME=$PWD/config PYTHONPATH=/path/to/repo python /path/to/repo/benchmarks/demo_stages.py \\
        --pipeline /path/to/repo/pipelines/digits.yaml --json stages.json [--set-key KEY=VALUE ...]

`--set-key` changes pipeline keys (e.g. `snapshot_every=100000`) to measure one lever at a time; the pipeline
is copied next to its policy and audit config first. Peak RSS and RssAnon are read from /proc at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def timed(totals: dict[str, float], counts: dict[str, int], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - started
            counts[name] += 1

    return wrapper


def memory() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile", "VmRSS"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--set-key", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    from sfbd_guard import stages as run_module
    from sfbd_guard.config import set_dotted
    from sfbd_guard.engine import sfbd, trainer
    from sfbd_guard.engine.validation import Validator

    pipeline = args.pipeline.resolve()
    if args.set_key:  # a copy beside the original, so its relative paths still resolve
        data = yaml.safe_load(pipeline.read_text())
        for pair in args.set_key:
            key, value = pair.split("=", 1)
            set_dotted(data, key, yaml.safe_load(value))
        copy = pipeline.parent / f".bench-{pipeline.name}"
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        pipeline = copy
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    trainer.Trainer.train_step = timed(totals, counts, "optimizer steps", trainer.Trainer.train_step)  # type: ignore[method-assign]
    trainer.Trainer.snapshot = timed(totals, counts, "snapshot grids", trainer.Trainer.snapshot)  # type: ignore[method-assign]
    trainer.Trainer.checkpoint = timed(totals, counts, "checkpoints", trainer.Trainer.checkpoint)  # type: ignore[method-assign]
    Validator.measure = timed(totals, counts, "validation", Validator.measure)  # type: ignore[method-assign]
    sfbd.SFBDSources._denoise = timed(totals, counts, "denoising", sfbd.SFBDSources._denoise)  # type: ignore[method-assign]
    stages: dict[str, float] = defaultdict(float)
    for stage in run_module.STAGES:  # guard run's stages (stages.py): each one's work, timed
        stage.run = timed(stages, defaultdict(int), stage.name, stage.run)  # type: ignore[method-assign]
    from sfbd_guard.cli import main as guard

    imported = time.perf_counter() - started
    try:
        guard(["run", str(pipeline)])
    except SystemExit as exit_:
        if exit_.code:
            raise
    finally:
        if pipeline.name.startswith(".bench-"):
            pipeline.unlink()
    total = time.perf_counter() - started
    result = {"total_s": round(total, 1), "imports_s": round(imported, 2),
              "stages_s": {k: round(v, 1) for k, v in stages.items()},
              "training_parts_s": {k: round(v, 1) for k, v in totals.items()}, "training_part_calls": dict(counts),
              "memory_bytes": memory(), "set_keys": args.set_key}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
