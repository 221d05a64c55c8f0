"""Does `guard audit` find planted copies of protected originals, and only those?

Builds a synthetic CelebA-layout dataset (178×218 JPEGs), prepares it at 64 px (10% of identities
clean, the rest protected), and fills a sample folder with novel images (the same generator, another
seed, through the same CelebA crop and resize) plus planted copies of protected originals, one
transform each: exact, horizontal flip, 90% centre crop resized back, JPEG quality 70, Gaussian noise
std 0.02 (on [0, 1]), brightness ±10%. The audit calibrates on the dataset's valid/test splits (the
policy uses train). Reported per embedder: recall per transform (verdict copy, and copy or suspect),
top-1 identification, precision of copy, and false flags among the novel images; the pixel embedder
also without a holdout, i.e. with the documented default thresholds.

The `clip` rows use a tiny randomly initialised open_clip model saved to a local directory: a smoke
test of the CLIP path, not a measure of CLIP's accuracy.

    python benchmarks/audit_recall.py --count 5000 --novel 2000 --per-transform 100 [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from fixtures.synthetic import write_celeba
from sfbd_guard.auditing import AuditConfig, run_audit
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.policy.model import load_policy

RESOLUTION = 64
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _pil(chw: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)))


def _chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def crop90(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = round(RESOLUTION * 0.9)
    start = (RESOLUTION - side) // 2
    box = (start, start, start + side, start + side)
    return _chw(_pil(x).resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC, box=box))


def jpeg70(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(x).save(buffer, format="JPEG", quality=70)
    return _chw(Image.open(buffer))


def noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = x / 255.0 + rng.normal(0, 0.02, x.shape)
    return np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8)


def brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = 1.1 if rng.random() < 0.5 else 0.9
    return np.clip(np.rint(x * factor), 0, 255).astype(np.uint8)


TRANSFORMS: dict[str, Transform] = {
    "exact": lambda x, rng: x, "flip": lambda x, rng: np.ascontiguousarray(x[..., ::-1]), "crop90": crop90,
    "jpeg70": jpeg70, "noise0.02": noise, "brightness10": brightness,
}


def make_dataset(tmp: Path, count: int) -> Path:
    """Synthetic CelebA + policy (train split, 10% of identities clean, rest protected) + prepared dir."""
    import yaml

    root = write_celeba(tmp / "celeba", count, identities=max(1, count // 20))
    policy = {"version": 1, "name": "audit-bench", "output": str(tmp / "prepared"),
              "dataset": {"format": "celeba", "root": str(root), "split": "train", "resolution": RESOLUTION},
              "rules": [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.1, "seed": 0, "by": "identity"}},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 1.3824, "seed": 0}}
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    prepare(load_policy(path), workers=2)
    return tmp / "prepared"


def make_samples(tmp: Path, prepared: Path, novel: int, per_transform: int, seed: int) -> dict[str, tuple[str, str | None]]:
    """The sample folder; returns {file name: (kind, source record id or None)}."""
    card = json.loads((prepared / "card.json").read_text())
    manifest = pq.read_table(prepared / "manifest.parquet", columns=["record_id", "partition"]).to_pylist()
    protected = [r["record_id"] for r in manifest if r["partition"] == "protected"]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(protected), size=len(TRANSFORMS) * per_transform, replace=False)
    reader = open_reader(SourceSpec("celeba", prepared / card["root"], "train", RESOLUTION))
    out, truth = tmp / "samples", {}
    out.mkdir()
    for t, (name, transform) in enumerate(TRANSFORMS.items()):
        for j in chosen[t * per_transform : (t + 1) * per_transform]:
            record = protected[int(j)]
            image = transform(reader.load(record), rng)
            file = f"{name}-{record.removesuffix('.jpg')}.{'jpg' if name == 'jpeg70' else 'png'}"
            _pil(image).save(out / file, quality=70) if name == "jpeg70" else _pil(image).save(out / file)
            truth[file] = (name, record)
    novel_root = write_celeba(tmp / "novel", novel, seed=seed + 1000)
    novel_reader = open_reader(SourceSpec("celeba", novel_root, "all", RESOLUTION))
    for i, record in enumerate(novel_reader.metadata().column("record_id").to_pylist()):
        _pil(novel_reader.load(record)).save(out / f"novel-{i:05d}.png")
        truth[f"novel-{i:05d}.png"] = ("novel", None)
    return truth


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised open_clip model (ViT, width 64, 2 layers, patch 8, 64 px) as a local directory."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": 64}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


def evaluate(report: Path, truth: dict[str, tuple[str, str | None]]) -> dict[str, object]:
    rows = pq.read_table(report / "samples.parquet").to_pylist()
    per: dict[str, dict[str, int]] = {}
    for row in rows:
        kind, source = truth[row["sample"]]
        stats = per.setdefault(kind, {"n": 0, "copy": 0, "flagged": 0, "top1": 0, "min_s1": 1.0, "max_s1": -1.0})
        stats["min_s1"] = min(stats["min_s1"], row["s1"])
        stats["max_s1"] = max(stats["max_s1"], row["s1"])
        stats["n"] += 1
        stats["copy"] += row["verdict"] == "copy"
        stats["flagged"] += row["verdict"] in ("copy", "suspect")
        stats["top1"] += source is not None and row["top1_record_id"] == source
    planted_copy = sum(v["copy"] for k, v in per.items() if k != "novel")
    novel_copy = per["novel"]["copy"]
    precision = planted_copy / (planted_copy + novel_copy) if planted_copy + novel_copy else 1.0
    return {"per_transform": per, "precision_copy": precision,
            "summary": json.loads((report / "summary.json").read_text())}


def run(tmp: Path, prepared: Path, truth: dict[str, tuple[str, str | None]], config: AuditConfig,
        label: str) -> dict[str, object]:
    started = time.perf_counter()
    run_audit(samples=tmp / "samples", data=prepared, report=tmp / f"report-{label}", config=config)
    result = evaluate(tmp / f"report-{label}", truth)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def table(label: str, result: dict[str, object]) -> str:
    per = result["per_transform"]  # type: ignore[index]
    th = result["summary"]["thresholds"]  # type: ignore[index]
    lines = [f"### {label}: copy s1 >= {th['copy']:.4f}, suspect s1 >= {th['suspect']:.4f} or ratio <= {th['ratio']:.3f} "
             f"({th['method']}, m = {th['holdout'].get('count')}); {result['seconds']} s",
             "| images | n | recall (copy) | recall (copy or suspect) | top-1 = source | min s1 |",
             "|---|---|---|---|---|---|"]
    for kind, s in per.items():  # type: ignore[union-attr]
        if kind == "novel":
            continue
        n = s["n"]
        lines.append(f"| {kind} | {n} | {s['copy'] / n:.3f} | {s['flagged'] / n:.3f} | {s['top1'] / n:.3f} | {s['min_s1']:.4f} |")
    novel = per["novel"]  # type: ignore[index]
    lines.append(f"| novel (false flags) | {novel['n']} | {novel['copy']} copy | {novel['flagged']} flagged | - "
                 f"| max {novel['max_s1']:.4f} |")
    lines.append(f"\nprecision (copy verdict): {result['precision_copy']:.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="synthetic CelebA images (80% train, 20% holdout)")
    parser.add_argument("--novel", type=int, default=2000, help="novel sample images")
    parser.add_argument("--per-transform", type=int, default=100, help="planted copies per transform")
    parser.add_argument("--seed", type=int, default=0, help="seeds the planted records and the noise")
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP smoke test")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        prepared = make_dataset(tmp, args.count)
        truth = make_samples(tmp, prepared, args.novel, args.per_transform, args.seed)
        base = {"cache": {"dir": str(tmp / "cache")}}
        results = {"pixel": run(tmp, prepared, truth, AuditConfig.model_validate(base), "pixel")}
        print(table("pixel embedder", results["pixel"]), flush=True)
        uncalibrated = AuditConfig.model_validate({**base, "calibration": {"holdout": "none"}})
        results["pixel-default"] = run(tmp, prepared, truth, uncalibrated, "pixel-default")
        print("\n" + table("pixel embedder, no holdout (default thresholds)", results["pixel-default"]), flush=True)
        if not args.no_clip:
            clip = {**base, "embedder": {"kind": "clip", "clip_weights": str(tiny_clip(tmp / "clip"))}}
            results["clip"] = run(tmp, prepared, truth, AuditConfig.model_validate(clip), "clip")
            print("\n" + table("clip embedder (random weights: smoke test only)", results["clip"]))
    if args.json:
        args.json.write_text(json.dumps({k: {**v, "summary": None} for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
