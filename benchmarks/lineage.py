"""Start from a licensed model: SFBD on digits 5–9 from a model pretrained on digits 0–4 (the "similar licensed set").

Runs, each with the digits pipeline's network at the same budget (default 100 kimg):
- base: clean-only on digits 0–4, every record clean (the licensed model);
- (a) sfbd on 5–9 with 0 % clean and `init: base` (schedule.pretrain_kimg 0: the rounds start from its weights);
- (b) sfbd on 5–9 with 10 % clean and no init (the pipeline's own schedule);
- (c) sfbd on 5–9 with 10 % clean and `init: base` (the pipeline's schedule, pretraining from the base's weights);
- clean-only on 5–9's 10 % clean, and all-clean (every non-held-out 5–9 record clean): the references.
Each is scored as quality.py scores (1,000 samples, three draws) against a held-out fifth of digits 5–9: the
Fréchet distance in the features of a small CNN trained on the other 5–9 digits, and the share of the clean-only →
all-clean gap each closes.

    PYTHONPATH=.:benchmarks python benchmarks/lineage.py --out bench-lineage --json lineage.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from quality import REPO, features, index_of, real_floor, score_run, train_scorer  # benchmarks/ is on sys.path

from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import train
from sfbd_guard.policy.model import load_policy

OTHERS = {"name": "other-classes", "action": "exclude", "where": "label < 5"}  # not part of the target set
HELD = {"name": "held-out", "action": "holdout", "sample": {"fraction": 0.2, "seed": 1}}


def policies(folder: Path, sigma: float) -> dict[str, Path]:
    base = {"version": 1, "dataset": {"format": "digits", "resolution": 8}, "noise": {"sigma": sigma}}
    shapes = {
        "base": [{"name": "target-classes", "action": "exclude", "where": "label >= 5"}, {"name": "all", "action": "clean"}],
        "none-clean": [OTHERS, HELD, {"name": "rest", "action": "protect"}],
        "tenth-clean": [OTHERS, HELD, {"name": "licensed", "action": "clean", "sample": {"fraction": 0.1, "seed": 0}},
                        {"name": "rest", "action": "protect"}],
        "all-clean": [OTHERS, HELD, {"name": "all", "action": "clean"}],
    }
    paths = {}
    for name, rules in shapes.items():
        path = folder / f"policy-{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "name": f"digits-{name}", "rules": rules,
                                        "output": str(folder / f"prepared-{name}")}, sort_keys=False))
        paths[name] = path
    return paths


def pipeline(name: str, data: Path, out: Path, folder: Path, budget: float, method: str,
             init: Path | None = None, no_pretraining: bool = False) -> Path:
    config = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())
    config.pop("policy", None)
    config.pop("audit", None)
    config.update(name=name, data=str(data), out=str(out), method=method)
    schedule = config["schedule"]
    schedule["pretrain_kimg"] *= budget / schedule["total_kimg"]  # the same share of pretraining at any budget
    schedule["total_kimg"] = budget
    if method != "sfbd":
        for key in ("pretrain_until", "rounds"):
            schedule.pop(key, None)
    if init is not None:
        config["init"] = {"run": str(init)}
    if no_pretraining:  # the rounds share the budget from the init's weights
        schedule.update(pretrain_kimg=0, pretrain_until="kimg", round_kimg=budget / schedule["rounds"])
        schedule.pop("total_kimg")
    path = folder / f"pipeline-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(path: Path, out: Path) -> float:
    started = time.perf_counter()
    resume = (out / "config.resolved.yaml").exists()
    train(load_pipeline(out / "config.resolved.yaml") if resume else load_pipeline(path), resume=resume)
    return round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-lineage"))
    parser.add_argument("--budget-kimg", type=float, default=100.0)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    prepared = {}
    for name, path in policies(out, args.sigma).items():
        target = out / f"prepared-{name}"
        prepared[name] = target if (target / "card.json").exists() else prepare(load_policy(path)).output

    import image_sets
    from sklearn.datasets import load_digits

    from sfbd_guard.keys.owner import read_lineage

    images = image_sets.digits().astype(np.float32) / 127.5 - 1
    labels = load_digits().target
    card = json.loads((prepared["all-clean"] / "card.json").read_text())
    rows = read_lineage(card["fingerprint"], ["record_id", "rule"], why="the benchmark").to_pylist()
    held = [index_of(r["record_id"]) for r in rows if r["rule"] == "held-out"]
    rest = [index_of(r["record_id"]) for r in rows if r["rule"] == "all"]
    scorer = train_scorer(images[rest], labels[rest] - 5, 5)
    real = features(scorer, images[held])
    results: dict[str, Any] = {"budget_kimg": args.budget_kimg, "sigma": args.sigma, "held_out": len(held),
                               "real": real_floor(scorer, images[rest], real, images[held], min(args.samples, len(rest))),
                               "runs": {}}
    base = out / "run-base"
    plan = [
        ("base", prepared["base"], "clean-only", None, False),
        ("a-init-0pct-clean", prepared["none-clean"], "sfbd", base, True),
        ("b-10pct-clean", prepared["tenth-clean"], "sfbd", None, False),
        ("c-init-10pct-clean", prepared["tenth-clean"], "sfbd", base, False),
        ("clean-only", prepared["tenth-clean"], "clean-only", None, False),
        ("all-clean", prepared["all-clean"], "clean-only", None, False),
    ]
    for name, data, method, init, no_pretraining in plan:
        target = out / f"run-{name}"
        seconds = run(pipeline(name, data, target, out, args.budget_kimg, method, init, no_pretraining), target)
        if name == "base":
            continue
        row = score_run(target, scorer, real, images[held], (1, 8, 8), args.samples, out / f"samples-{name}.png")
        row["train_seconds"] = seconds
        results["runs"][name] = row
        print(name, {k: v for k, v in row.items() if k != "fd_draws"}, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    runs = results["runs"]
    low, high = runs["clean-only"]["fd"], runs["all-clean"]["fd"]
    for row in runs.values():
        row["gap_share"] = (low - row["fd"]) / (low - high) if low != high else float("nan")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'run':<22}{'FD':>8}{'± std':>8}{'share':>8}")
    for name, row in runs.items():
        print(f"{name:<22}{row['fd']:>8.2f}{row['fd_std']:>8.2f}{row['gap_share']:>8.2f}")
    _ = torch  # quality's scorer is a torch module


if __name__ == "__main__":
    main()
