"""Does a model trained by each method remember its images? `guard membership` on the quality benchmark's sets.

For each budget and method (clean-only, noisy-direct, ambient, sfbd, online-sfbd), trained as quality.py trains
them (the digits pipeline's network and schedule shape, the same prepared data: a held-out fifth, 10 % of the rest
clean, the others protected at sigma 0.6), the membership test of the final EMA weights against the held-out fifth:
AUC and TPR at 1 % FPR of clean-vs-holdout (the test's power: those images were trained on as they are) and
protected-vs-holdout, each with its bootstrap 95 % interval, and for the protected group the same under the
clean-only run of the same budget (the control) with the paired interval of the difference.

    python benchmarks/membership.py --set digits --out bench-membership-digits --budget-kimg 100 200 --json r.json

Runs are reused (and resumed) from --out, as quality.py does; a run trained there by quality.py for the same set and
budget is reused too (give both the same --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from quality import SETS, parse_overrides, pipeline_for, write_policies  # benchmarks/ is on sys.path when this script runs

from sfbd_guard.auditing.config import AuditConfig, MembershipSpec
from sfbd_guard.auditing.model_audit import run_membership
from sfbd_guard.contracts.base import dump
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import train
from sfbd_guard.policy.model import load_policy

METHODS = ("clean-only", "noisy-direct", "ambient", "sfbd", "online-sfbd", "all-clean")
# all-clean: clean-only on every non-held-out record as a clean image (quality.py's upper bound): it trained on the
# protected group's originals, so its protected AUC is the test's power on that group (a positive control)


def train_or_resume(method: str, data: Path, run: Path, budget: float, out: Path,
                    overrides: dict[str, Any] | None = None) -> float:
    started = time.perf_counter()
    if (run / "config.resolved.yaml").exists():
        train(load_pipeline(run / "config.resolved.yaml"), resume=True)
    else:
        train(load_pipeline(pipeline_for(method, data, run, budget, out, overrides or {})), resume=False)
    return round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--set", choices=SETS, default="digits")
    parser.add_argument("--out", type=Path, default=None, help="working folder (reused: finished runs are kept)")
    parser.add_argument("--budget-kimg", type=float, nargs="*", default=[100.0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--max-images", type=int, default=512, help="membership.max_images")
    parser.add_argument("--set-key", nargs="*", default=[], metavar="KEY=VALUE",
                        help="pipeline keys changed for the tested methods, not the clean-only control (a lever: "
                             "schedule.rounds=1, privacy.epsilon=10)")
    parser.add_argument("--tag", default="", help="suffix of the tested runs' folders and result keys (levers side by "
                                                  "side against one control)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set_key)
    suffix = f"-{args.tag}" if args.tag else ""
    out: Path = args.out or Path(f"bench-membership-{args.set}")
    out.mkdir(parents=True, exist_ok=True)
    mixed, clean = write_policies(args.set, out, args.sigma)
    data, everything = out / "prepared-mixed", out / "prepared-clean"
    if not (data / "card.json").exists():
        data = prepare(load_policy(mixed)).output
    if "all-clean" in args.methods and not (everything / "card.json").exists():
        everything = prepare(load_policy(clean)).output
    config = AuditConfig(membership=MembershipSpec(max_images=args.max_images))
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results.update(set=args.set, sigma=args.sigma, membership=dump(config.membership))
    for budget in args.budget_kimg:
        entry = results.setdefault("budgets", {}).setdefault(f"{budget:g}", {})
        control = out / f"run-clean-only-{budget:g}"
        methods = ["clean-only", *[m for m in args.methods if m != "clean-only"]]
        for method in methods:
            name = method if method == "clean-only" else method + suffix  # the control is never changed by a lever
            run = out / f"run-{name}-{budget:g}"
            if method == "all-clean":  # its groups are the mixed data's: the same images as every other run's test
                seconds = train_or_resume("upper-bound", everything, run, budget, out)
            else:
                seconds = train_or_resume(method, data, run, budget, out, None if method == "clean-only" else overrides)
            started = time.perf_counter()
            summary = run_membership(run=run, report=out / f"membership-{name}-{budget:g}", config=config, data=data,
                                     control=None if method in ("clean-only", "all-clean") else control,
                                     other_data=method == "all-clean").summary
            row: dict[str, Any] = {"train_seconds": seconds, "membership_seconds": round(time.perf_counter() - started, 1),
                                   "verdict": summary.verdict}
            for group in summary.groups:
                row[group.group] = {"images": group.images, "holdout": group.holdout_images, **dump(group.model),
                                    "control": dump(group.control) if group.control else None,
                                    "difference_ci95": group.difference_ci95}
            if method != "clean-only" and overrides:
                row["overrides"] = overrides
            entry[name] = row
            print(args.set, budget, name, json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    for budget, entry in results.get("budgets", {}).items():
        print(f"\n{args.set} at {budget} kimg: AUC against the holdout (95 % interval); protected under the clean-only "
              "control; paired interval of the difference")
        print(f"{'method':<14}{'clean':>22}{'protected':>22}{'control':>22}{'difference':>20}")
        for method, row in entry.items():
            def span(result: dict[str, Any] | None) -> str:
                return f"{result['auc']:.3f} ({result['auc_ci95'][0]:.3f}–{result['auc_ci95'][1]:.3f})" if result else "–"

            diff = row["protected"]["difference_ci95"]
            print(f"{method:<14}{span(row.get('clean')):>22}{span(row['protected']):>22}"
                  f"{span(row['protected']['control']):>22}{(f'{diff[0]:.3f}–{diff[1]:.3f}' if diff else '–'):>20}")


if __name__ == "__main__":
    main()
