"""Quality of SFBD, online SFBD and the baselines on scikit-learn's digits, at the same compute budget.

Setting: a held-out fifth of the digits is excluded (it is the reference the samples are scored
against); of the rest, 10% is clean and the other 90% protected at sigma 0.6. Methods: clean-only,
noisy-direct, ambient, sfbd, online-sfbd, and clean-only on all non-held-out digits clean (the
upper bound). Each draws 1000 samples, three times with different seeds, scored against the held-out
digits by

- FD: the Fréchet distance between Gaussian fits of the penultimate-layer features of a small CNN
  classifier trained on the non-held-out real digits (an "Inception distance" for digits), mean and
  standard deviation over the three draws;
- precision / recall: k-NN precision and recall (Kynkäänniemi et al. 2019, k = 3) in that space.

With 359 reference digits in a 128-d space FD has a large finite-sample floor, so the benchmark also
scores 1000 real non-held-out digits the same way (three disjoint-as-possible draws): the FD of a
perfect generator of the training distribution at this sample size.

    python benchmarks/quality_digits.py --out bench-quality [--budget-kimg 100] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import linalg

from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.generate import generate
from sfbd_guard.engine.images import save_grid
from sfbd_guard.engine.service import load_ema_net, train
from sfbd_guard.policy import load_policy
from sfbd_guard.prepared import open_prepared

REPO = Path(__file__).resolve().parents[1]
METHODS = ("clean-only", "noisy-direct", "ambient", "sfbd", "online-sfbd", "upper-bound")


def write_policies(folder: Path, sigma: float) -> tuple[Path, Path]:
    """The product's digits policy (held-out fifth, 10% clean, the rest protected), and the same with
    everything but the held-out fifth clean (the upper bound)."""
    base = yaml.safe_load((REPO / "policies" / "digits.yaml").read_text())
    base["noise"]["sigma"] = sigma
    held_out = [rule for rule in base["rules"] if rule["name"] == "held-out"]
    mixed = {**base, "name": "digits-bench", "output": str(folder / "prepared-mixed")}
    clean = {**base, "name": "digits-bench-clean", "output": str(folder / "prepared-clean"),
             "rules": [*held_out, {"name": "all", "action": "clean"}]}
    paths = folder / "policy-mixed.yaml", folder / "policy-clean.yaml"
    for path, policy in zip(paths, (mixed, clean), strict=True):
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return paths


def held_out_and_train_digits(prepared_mixed: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real digits as [-1, 1] images with labels: the held-out fifth, and the rest (to train the scorer)."""
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from sfbd_guard.datasets import SourceSpec, open_reader

    card = json.loads((prepared_mixed / "card.json").read_text())
    manifest = pq.read_table(prepared_mixed / "manifest.parquet").to_pylist()
    reader = open_reader(SourceSpec("digits", None, "all", card["resolution"]))
    labels = load_digits().target
    images = {r["record_id"]: reader.load(r["record_id"]).astype(np.float32) / 127.5 - 1 for r in manifest}
    held = [r["record_id"] for r in manifest if r["rule"] == "held-out"]
    rest = [r["record_id"] for r in manifest if r["rule"] != "held-out"]

    def label(ids: list[str]) -> np.ndarray:
        return np.array([labels[int(i.split("-")[1])] for i in ids])

    return (np.stack([images[i] for i in held]), label(held), np.stack([images[i] for i in rest]), label(rest))


class Scorer(torch.nn.Module):
    """A small CNN digit classifier; its 128-d penultimate layer is the feature space of the metrics."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_scorer(images: np.ndarray, labels: np.ndarray, resolution: int, epochs: int = 40) -> Scorer:
    torch.manual_seed(0)
    model = Scorer(resolution)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def features(model: Scorer, images: np.ndarray | torch.Tensor) -> np.ndarray:
    return model.body(torch.as_tensor(images, dtype=torch.float32)).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    offset = np.eye(len(cov_a)) * 1e-6  # keeps the product's square root well defined (as in the FID code)
    root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: a sample is 'inside' a set if within the k-NN radius of one of its points."""
    def radii(points: np.ndarray) -> np.ndarray:
        d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    def inside(queries: np.ndarray, points: np.ndarray, r: np.ndarray) -> float:
        d = np.sqrt(((queries[:, None] - points[None]) ** 2).sum(-1))
        return float((d <= r[None]).any(axis=1).mean())

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def pipeline_for(method: str, data: Path, out: Path, budget: float, folder: Path) -> Path:
    pipeline = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())
    pipeline.update(data=str(data), out=str(out), method="clean-only" if method == "upper-bound" else method)
    pipeline.pop("policy", None)
    schedule = pipeline["schedule"]
    default_budget = schedule["pretrain_kimg"] + schedule["rounds"] * schedule["round_kimg"]
    schedule["pretrain_kimg"] *= budget / default_budget  # the same share of pretraining at any budget
    if method in ("sfbd",):
        schedule["round_kimg"] = (budget - schedule["pretrain_kimg"]) / schedule["rounds"]
        schedule.pop("total_kimg", None)
    else:
        schedule["total_kimg"] = budget
    path = folder / f"pipeline-{method}.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def sample_run(run: Path, count: int, shape: tuple[int, int, int], seed: int = 12345) -> torch.Tensor:
    net, _, _ = load_ema_net(run, device="cpu")
    return torch.cat([b for _, b in generate(net, seed=seed, count=count, shape=shape, steps=18, batch=250,
                                             device=torch.device("cpu"))])


SAMPLE_SEEDS = (12345, 1, 2)


def scores(draws: list[np.ndarray], real: np.ndarray) -> dict[str, object]:
    """FD (mean, std and each draw) and mean k-NN precision / recall of feature draws against the reference."""
    fds = [frechet_distance(fake, real) for fake in draws]
    precision, recall = np.mean([knn_precision_recall(real, fake) for fake in draws], axis=0)
    return {"fd": float(np.mean(fds)), "fd_std": float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0,
            "fd_draws": fds, "precision": float(precision), "recall": float(recall)}


def score_run(run: Path, scorer: Scorer, real: np.ndarray, shape: tuple[int, int, int], count: int,
              grid: Path | None = None) -> dict[str, object]:
    """Draw `count` samples per seed of SAMPLE_SEEDS from a run's EMA network and score them."""
    draws = []
    for seed in SAMPLE_SEEDS:
        samples = sample_run(run, count, shape, seed)
        if grid is not None and seed == SAMPLE_SEEDS[0]:
            save_grid(samples[:100], grid, scale=4)
        draws.append(features(scorer, samples.numpy()))
    return scores(draws, real)


def real_floor(scorer: Scorer, rest: np.ndarray, real: np.ndarray, count: int) -> dict[str, object]:
    """The scores of `count` real non-held-out digits (one draw per seed): what a perfect generator gets."""
    draws = []
    for seed in SAMPLE_SEEDS:
        rows = np.random.default_rng(seed).permutation(len(rest))[:count]
        draws.append(features(scorer, rest[rows]))
    return scores(draws, real)


def print_table(results: dict) -> None:
    """The table of benchmarks/README.md: FD mean ± std, the ratios the goals name, precision and recall."""
    methods = results["methods"]
    baselines = [methods[m]["fd"] for m in ("clean-only", "noisy-direct") if m in methods]
    better, upper = min(baselines, default=float("nan")), methods.get("upper-bound", {}).get("fd", float("nan"))
    print(f"{'method':<14}{'FD':>8}{'± std':>8}{'/better':>9}{'/upper':>8}{'prec':>7}{'recall':>8}")
    for name, row in [*methods.items(), ("real digits", results["real"])]:
        print(f"{name:<14}{row['fd']:>8.1f}{row['fd_std']:>8.1f}{row['fd'] / better:>9.2f}{row['fd'] / upper:>8.2f}"
              f"{row['precision']:>7.3f}{row['recall']:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-quality"), help="working folder (reused: finished runs are kept)")
    parser.add_argument("--budget-kimg", type=float, default=None,
                        help="training budget per method (default: the digits pipeline's)")
    parser.add_argument("--sigma", type=float, default=0.6, help="noise level of the protected copies")
    parser.add_argument("--samples", type=int, default=1000, help="samples per method")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="which methods to run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mixed_policy, clean_policy = write_policies(args.out, args.sigma)
    prepared = {}
    for name, policy in (("mixed", mixed_policy), ("clean", clean_policy)):
        output = args.out / f"prepared-{name}"
        prepared[name] = output if (output / "card.json").exists() else prepare(load_policy(policy)).output
    data = open_prepared(prepared["mixed"])
    shape = data.image_shape
    held, held_labels, rest, rest_labels = held_out_and_train_digits(prepared["mixed"])
    scorer = train_scorer(rest, rest_labels, shape[1])
    accuracy = float((scorer(torch.from_numpy(held)).argmax(1).numpy() == held_labels).mean())
    real = features(scorer, held)
    base = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())["schedule"]
    budget = args.budget_kimg or (base.get("total_kimg") or base["pretrain_kimg"] + base["rounds"] * base["round_kimg"])
    results = {"setting": {"sigma": args.sigma, "budget_kimg": budget, "samples": args.samples, "held_out": len(held),
                           "clean": len(data.clean.record_ids), "protected": len(data.protected.record_ids),
                           "scorer_accuracy_on_held_out": accuracy}, "methods": {}}
    results["real"] = real_floor(scorer, rest, real, min(args.samples, len(rest)))
    print("real digits", results["real"], flush=True)
    for method in args.methods:
        run = args.out / f"run-{method}"
        source = prepared["clean"] if method == "upper-bound" else prepared["mixed"]
        started = time.perf_counter()
        if (run / "config.resolved.yaml").exists():  # an earlier, possibly interrupted, run: continue it
            train(load_pipeline(run / "config.resolved.yaml"), resume=True)
        else:
            train(load_pipeline(pipeline_for(method, source, run, budget, args.out)), resume=False)
        seconds = round(time.perf_counter() - started, 1)
        results["methods"][method] = {**score_run(run, scorer, real, shape, args.samples, args.out / f"samples-{method}.png"),
                                      "seconds": seconds}
        print(method, results["methods"][method], flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
