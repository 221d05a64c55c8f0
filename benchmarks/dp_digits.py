"""Quality and speed of SFBD with differential privacy (DP-SGD, Opacus) on scikit-learn's digits.

The setting, scorer and metrics are those of `quality.py --set digits` (imported): a held-out fifth of the
digits is the reference; of the rest 10% is clean and 90% protected at sigma 0.6. Variants: `sfbd`
without DP, and `sfbd` with privacy.epsilon 10 and 1 (rdp or prv accountant, delta 1/(10 N),
max_grad_norm 1, the SFBD rounds private, clean pretraining not), all at the same compute budget;
`--private-lrs` adds each epsilon with those learning rates for the private steps (privacy.lr).
Each draws `--samples` samples three times, scored by FD (mean ± std over the draws) and k-NN
precision / recall against the held-out digits.

Speed: (a) the median seconds per optimizer step of the private rounds against the same rounds
without DP, from the runs' metrics; (b) an interleaved micro-benchmark on the digits model
(model_channels 32, 8 px, batch 64): one non-private step, then one DP step (Poisson batch with the
same expected size, per-sample clipping, noise), repeated, medians with quartiles.

    PYTHONPATH=. python benchmarks/dp_digits.py --out bench-dp [--budget-kimg 100] [--json results.json]
    PYTHONPATH=. python benchmarks/dp_digits.py --out bench-dp --speed-only [--micro-steps 30]   # (b) only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import train
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared


def variant_pipeline(name: str, epsilon: float | None, data: Path, out: Path, budget: float, folder: Path,
                     accountant: str, private_lr: float | None = None) -> Path:
    """The quality benchmark's sfbd pipeline, with a privacy section for the private variants."""
    # DP-SGD's accounting needs the schedule in advance: every variant pretrains 40 % of the budget, then 3 rounds
    fixed = {"schedule.pretrain_until": "kimg", "schedule.pretrain_kimg": 0.4 * budget}
    base = quality.pipeline_for("sfbd", data, out, budget, folder, fixed)
    pipeline = yaml.safe_load(base.read_text())
    if epsilon is not None:
        pipeline["privacy"] = {"epsilon": epsilon, "accountant": accountant, "max_grad_norm": 1.0}
        if private_lr is not None:
            pipeline["privacy"]["lr"] = private_lr
    path = folder / f"pipeline-{name}.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def round_step_seconds(run: Path) -> list[float]:
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    return [row["seconds_per_kimg"] * 64 / 1000 for row in rows if row["phase"].startswith("round-")]


def quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def micro_benchmark(data: Path, steps: int, physical_batch: int) -> dict[str, object]:
    """Interleaved per-step timing of the digits model: non-private vs DP-SGD (same expected batch).

    The DP step is `PrivatePhase.step`'s: Poisson batch, `ClippedGradients` (sum of per-sample
    gradients clipped to 1), Opacus' DPOptimizerFastGradientClipping (noise, expected-batch scaling).
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from sfbd_guard.diffusion.ambient import AmbientLoss
    from sfbd_guard.diffusion.optim import make_adam
    from sfbd_guard.engine.clipping import ClippedGradients
    from sfbd_guard.engine.data import clean_images
    from sfbd_guard.engine.trainer import build_net

    config = load_pipeline(quality.REPO / "pipelines" / "digits.yaml", {"data": str(data)})
    prepared = open_prepared(data)
    images = clean_images(prepared)
    torch.manual_seed(0)
    nets = [build_net(config, prepared.image_shape).train() for _ in range(2)]
    plain_opt, dp_adam = (make_adam(net.parameters(), lr=1e-4) for net in nets)
    clipper = ClippedGradients(nets[1], max_grad_norm=1.0)
    dp_opt = DPOptimizerFastGradientClipping(dp_adam, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=64)
    loss, generator = AmbientLoss(), torch.Generator().manual_seed(0)
    batch_rate = 64 / len(images)

    def plain_step() -> None:
        rows = torch.randint(len(images), (64,), generator=generator)
        loss(nets[0], images[rows], torch.zeros(64), generator=generator).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def dp_step() -> None:
        rows = torch.nonzero(torch.rand(len(images), generator=generator) < batch_rate).flatten()
        chunks = rows.split(physical_batch)
        for k, chunk in enumerate(chunks):
            with clipper.recording():
                losses = loss(nets[1], images[chunk], torch.zeros(len(chunk)), generator=generator)
            clipper.backward(losses)
            if k < len(chunks) - 1:
                dp_opt.signal_skip_step(True)
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for step in range(steps + 3):
        for name, fn in (("plain", plain_step), ("dp", dp_step)):
            started = time.perf_counter()
            fn()
            if step >= 3:  # warm-up
                times[name].append(time.perf_counter() - started)
    ratios = [d / p for d, p in zip(times["dp"], times["plain"], strict=True)]
    return {"plain_s": quartiles(times["plain"]), "dp_s": quartiles(times["dp"]), "ratio": quartiles(ratios),
            "threads": torch.get_num_threads(), "physical_batch": physical_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-dp"), help="working folder (finished runs are kept)")
    parser.add_argument("--budget-kimg", type=float, default=None, help="training budget (default: the digits pipeline's)")
    parser.add_argument("--sigma", type=float, default=0.6, help="noise level of the protected copies")
    parser.add_argument("--samples", type=int, default=1000, help="samples per variant")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[10.0, 1.0], help="private variants")
    parser.add_argument("--accountant", choices=["rdp", "prv"], default="prv")
    parser.add_argument("--private-lrs", type=float, nargs="*", default=[],
                        help="also run each epsilon with these learning rates for the private steps (privacy.lr)")
    parser.add_argument("--micro-steps", type=int, default=30, help="interleaved steps of the micro-benchmark (0: skip)")
    parser.add_argument("--physical-batch", type=int, default=64,
                        help="samples per forward/backward of a DP step in the micro-benchmark (privacy.physical_batch)")
    parser.add_argument("--skip-runs", "--speed-only", action="store_true",
                        help="only the micro-benchmark (speed), none of the long quality runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mixed_policy, _ = quality.write_policies("digits", args.out, args.sigma)
    output = args.out / "prepared-mixed"
    prepared = output if (output / "card.json").exists() else prepare(load_policy(mixed_policy)).output
    data = open_prepared(prepared)
    results: dict[str, object] = {"setting": {"sigma": args.sigma, "clean": len(data.clean.record_ids),
                                              "protected": len(data.protected.record_ids), "samples": args.samples}}
    if args.micro_steps:
        results["micro"] = micro_benchmark(prepared, args.micro_steps, args.physical_batch)
        print("micro", json.dumps(results["micro"]), flush=True)
    if args.skip_runs:
        finish(results, args.json)
        return
    split = quality.split_images("digits", prepared)
    held, rest = split["held"], split["rest"]
    shape = data.image_shape
    scorer = quality.train_scorer(rest, split["rest_labels"], split["classes"])
    real = quality.features(scorer, held)
    base = yaml.safe_load((quality.REPO / "pipelines" / "digits.yaml").read_text())["schedule"]
    budget = args.budget_kimg or base.get("total_kimg") or base["pretrain_kimg"] + base["rounds"] * base["round_kimg"]
    results["setting"].update(budget_kimg=budget, held_out=len(held), accountant=args.accountant,  # type: ignore[union-attr]
                              real=quality.real_floor(scorer, rest, real, held, min(args.samples, len(rest))))
    variants = [("sfbd", None, None)] + [(f"sfbd-dp-eps{eps:g}" + (f"-lr{lr:g}" if lr else ""), eps, lr)
                                         for eps in args.epsilons for lr in [None, *args.private_lrs]]
    rows = {}
    for name, epsilon, private_lr in variants:
        run = args.out / f"run-{name}"
        started = time.perf_counter()
        if (run / "config.resolved.yaml").exists():  # an earlier, possibly interrupted, run: continue it
            outcome = train(load_pipeline(run / "config.resolved.yaml"), resume=True)
        else:
            path = variant_pipeline(name, epsilon, prepared, run, budget, args.out, args.accountant, private_lr)
            outcome = train(load_pipeline(path), resume=False)
        seconds = time.perf_counter() - started
        row = {**quality.score_run(run, scorer, real, held, shape, args.samples, args.out / f"samples-{name}.png"),
               "train_seconds": round(seconds, 1), "round_step_s": quartiles(round_step_seconds(run))}
        if outcome.privacy:
            row["privacy"] = {k: v for k, v in outcome.privacy.items() if k != "history"}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    plain = rows["sfbd"]["round_step_s"]["median"]
    for row in rows.values():
        row["round_step_ratio"] = row["round_step_s"]["median"] / plain
    results["variants"] = rows
    finish(results, args.json)


def finish(results: dict[str, object], path: Path | None) -> None:
    print(json.dumps(results, indent=2))
    if path:
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
