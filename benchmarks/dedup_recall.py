"""Dedup recall: planted copies of protected and opted-out images in the clean-licensed part.

Distinct images: tiles of scikit-image's photos (each photo cut into non-overlapping squares, each tile
once, as the photo has it), the LFW subset (100 faces, 100 non-face patches), scikit-learn's digits upscaled ×4 (32 px), then
synthetic smooth colour fields (fixtures.synthetic.random_image) up to `--records`. A third
are protected (proprietary), a tenth opted out, the rest CC0 (clean). Copies of protected and opted-out
real images are planted as CC0 records: exact, JPEG quality 60, resized ±20 %, centre crop 85 %,
mirrored, brightness ±10 %, small noise (σ = 5/255), and the exact reversible transforms dedup sees
through (symmetry.py): vertical flip, rotations by 90/180/270°, transpose, colour inversion (255 - x),
inversion + rotation by 90°, inversion + mirror.

Reported: per transform, the share of planted copies merged with their source by `guard prepare`
(recall) at the threshold in use; the share of distinct images wrongly merged with another distinct
image, per source (photo tiles, LFW faces, LFW non-face patches, digits, synthetic); a sweep of both over thresholds (from the
embeddings, computed as prepare computes them, on the transformed pixels; with and without the pixel embedder's
second look at twice the size, dedup.Fine, and for the former mirror-only search); and the wall time of prepare
without dedup, with dedup, and (`--baseline-src DIR`: another checkout, e.g. the main branch before the
transforms) with that checkout's dedup, the three runs interleaved, each in a fresh process, best of
`--rounds`, so that a machine shared with other jobs slows all three alike.

    PYTHONPATH=. python benchmarks/dedup_recall.py --records 2000 [--workers 2] [--baseline-src ../main]
        [--json benchmarks/results/dedup_recall.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

TRANSFORMS = ("exact", "jpeg60", "resize", "crop85", "mirror", "brightness", "noise",
              "vflip", "rot90", "rot180", "rot270", "transpose", "invert", "invert_rot90", "invert_mirror")
SOURCES = ("photo", "face", "patch", "digit", "synthetic")
RESOLUTION = 32
TILE = 96
THRESHOLDS = (0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.9925, 0.995)


def real_images() -> list[tuple[str, Image.Image]]:
    """Distinct real images: photo tiles (each once, in the photo's orientation), LFW faces, digits ×4."""
    import skimage.data as data
    from sklearn.datasets import load_digits

    # Left out, because their tiles are copies of one another, not distinct images: `cat` (the same photo as
    # `chelsea`), `colorwheel` (rotation-symmetric: its tiles are rotations of one another) and `retina`
    # (featureless gradients once at 32 px).
    photos = ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "horse",
              "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text"]
    images: list[tuple[str, Image.Image]] = []
    for name in photos:
        array = getattr(data, name)()
        photo = Image.fromarray(array).convert("RGB")
        for top in range(0, photo.height - TILE + 1, TILE):
            for left in range(0, photo.width - TILE + 1, TILE):
                tile = photo.crop((left, top, left + TILE, top + TILE))
                if np.asarray(tile.convert("L")).std() < 8:  # flat tiles (sky, background) are not distinct images
                    continue
                images.append((f"photo-{name}-{top}-{left}", tile))
    for i, face in enumerate(data.lfw_subset()):  # 100 faces, then 100 non-face patches (edges, flat, gradients)
        upscaled = Image.fromarray((face * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC)
        images.append((f"{'face' if i < 100 else 'patch'}-{i}", upscaled))
    for i, digit in enumerate(load_digits().images):
        pixels = (digit * 255 / 16).round().astype(np.uint8)
        images.append((f"digit-{i}", Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST)))
    return images


def transformed(image: Image.Image, transform: str, rng: np.random.Generator, i: int) -> tuple[Image.Image, str]:
    """A copy of `image` (and the file suffix to save it with)."""
    image = image.convert("RGB")
    if transform == "jpeg60":
        return image, ".jpg"
    if transform == "resize":
        f = 0.8 if i % 2 else 1.2
        return image.resize((max(1, round(image.width * f)), max(1, round(image.height * f))), Image.Resampling.BICUBIC), ".png"
    if transform == "crop85":
        w, h = round(image.width * 0.85), round(image.height * 0.85)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image.crop((left, top, left + w, top + h)), ".png"
    if transform == "mirror":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ".png"
    if transform == "brightness":
        return ImageEnhance.Brightness(image).enhance(1.1 if i % 2 else 0.9), ".png"
    if transform == "noise":
        noisy = np.asarray(image, np.float32) + rng.normal(0, 5, (image.height, image.width, 3))
        return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)), ".png"
    exact = {"vflip": [Image.Transpose.FLIP_TOP_BOTTOM], "rot90": [Image.Transpose.ROTATE_90],
             "rot180": [Image.Transpose.ROTATE_180], "rot270": [Image.Transpose.ROTATE_270],
             "transpose": [Image.Transpose.TRANSPOSE], "invert": [], "invert_rot90": [Image.Transpose.ROTATE_90],
             "invert_mirror": [Image.Transpose.FLIP_LEFT_RIGHT]}
    if transform in exact:
        for step in exact[transform]:
            image = image.transpose(step)
        return (ImageOps.invert(image) if transform.startswith("invert") else image), ".png"
    return image, ".png"


def key(threshold: float) -> str:
    """A threshold as a results key: 0.990, 0.9925."""
    return f"{threshold:.3f}" if round(threshold, 3) == threshold else f"{threshold:.4f}"


def source_of(role: str) -> str:
    """photo | face | patch (LFW's non-face patches) | digit | synthetic, from a distinct image's role."""
    return role.removeprefix("distinct:").split("-")[0]


def build(root: Path, records: int, per_transform: int, seed: int) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The image folder: rows (file_name, license, opt_out, role) and {planted copy: its source}."""
    from fixtures.synthetic import random_image

    rng = np.random.default_rng(seed)
    real = real_images()
    planted_total = per_transform * len(TRANSFORMS)
    distinct = max(0, records - planted_total)
    order = rng.permutation(len(real))[:distinct]
    chosen = [real[i] for i in sorted(order.tolist())]
    for k in range(distinct - len(chosen)):
        chosen.append((f"synthetic-{k}", random_image(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)))))
    rows: list[dict[str, str]] = []
    sources: list[tuple[str, Image.Image]] = []
    for index, (name, image) in enumerate(chosen):
        file_name = f"d{index:06d}.png"
        image.convert("RGB").save(root / file_name)
        draw = rng.random()
        kind = "optout" if draw < 0.1 else "protected" if draw < 0.43 else "clean"
        rows.append({"file_name": file_name, "license": "proprietary" if kind == "protected" else "CC0-1.0",
                     "opt_out": str(kind == "optout").lower(), "role": f"distinct:{name}"})
        if kind != "clean" and not name.startswith("synthetic"):
            sources.append((file_name, image))
    planted: dict[str, str] = {}
    for t, transform in enumerate(TRANSFORMS):
        picks = rng.choice(len(sources), size=min(per_transform, len(sources)), replace=False)
        for i, pick in enumerate(sorted(picks.tolist())):
            source_name, image = sources[pick]
            copy, suffix = transformed(image, transform, rng, i)
            file_name = f"p{t}-{i:05d}{suffix}"
            copy.save(root / file_name, **({"quality": 60} if suffix == ".jpg" else {}))
            rows.append({"file_name": file_name, "license": "CC0-1.0", "opt_out": "false", "role": f"copy:{transform}"})
            planted[file_name] = source_name
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "license", "opt_out", "role"])
        writer.writeheader()
        writer.writerows(rows)
    return rows, planted


def policy(root: Path, out: Path, key: Path, dedup: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "name": "dedup-recall",
            "dataset": {"format": "imagefolder", "root": str(root), "resolution": RESOLUTION},
            "rules": [{"name": "optouts", "action": "exclude", "where": "opt_out = true"},
                      {"name": "cc0", "action": "clean", "where": "license = 'CC0-1.0'"},
                      {"name": "rest", "action": "protect"}],
            "noise": {"sigma": 0.5, "key_file": str(key)}, "output": str(out), "dedup": dedup}


def write_policy(tmp: Path, name: str, root: Path, key: Path, dedup: dict[str, Any]) -> Path:
    import yaml

    from sfbd_guard.fileio import atomic_write_bytes

    path = tmp / f"{name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(policy(root, tmp / name, key, dedup)).encode())
    return path


TIMED = ("import os, sys, time; from pathlib import Path; from sfbd_guard.curation.prepare import prepare; "
         "from sfbd_guard.policy.model import load_policy; loaded = load_policy(Path(sys.argv[1])); "
         "cpu = lambda: sum(os.times()[:4]); start, used = time.perf_counter(), cpu(); "
         "prepare(loaded, workers=int(sys.argv[2]), overwrite=True); "
         "print(time.perf_counter() - start, cpu() - used)")


def timed_prepare(policy_path: Path, workers: int, source: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the worker processes included) of `prepare` in a fresh process
    running the code of `source` (a checkout's root)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", TIMED, str(policy_path), str(workers)], env=env, check=True,
                          capture_output=True, text=True)
    wall, cpu = done.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def sweep(root: Path, rows: list[dict[str, str]], planted: dict[str, str], embedding: Any, spec: Any) -> dict[str, Any]:
    """Recall and wrong merges over THRESHOLDS, from the embeddings of the transformed pixels (as prepare computes
    them), each pair compared at its best variant (symmetry.py) as prepare's near search does, and (pixel) kept only
    if its finer embedding also reaches the fine threshold (dedup.Fine; at each threshold t: the policy's
    fine_threshold, or t - FINE_MARGIN). Also without the finer look, and with the former mirror-only search."""
    import faiss

    from sfbd_guard.curation.dedup import near_pairs
    from sfbd_guard.datasets import SourceSpec, open_reader
    from sfbd_guard.policy.model import FINE_MARGIN
    from sfbd_guard.symmetry import best_similarity, grid_variants, group

    reader = open_reader(SourceSpec("imagefolder", root, "all", RESOLUTION))
    names = [r["file_name"] for r in rows]
    stored = np.zeros((len(names), embedding.dim), np.float32)
    index_of = {n: i for i, n in enumerate(names)}
    embed = embedding.embedder()
    size, variants = embedding.size, embedding.search_variants
    for part in reader.parts():
        ids = [str(v) for v in reader.part_metadata(part).column("record_id").to_pylist()] if not reader.listed else None
        wanted = ids or names[part.start:part.stop]
        loaded = [(record_id, pixels) for record_id, pixels in reader.read_part(part, wanted) if isinstance(pixels, np.ndarray)]
        if loaded:
            stored[[index_of[r] for r, _ in loaded]] = embed(np.stack([p for _, p in loaded]))
    searched = embedding.dim - embedding.fine_size ** 2
    vectors, fine = stored[:, :searched], stored[:, searched:]

    def fine_threshold(t: float) -> float:
        if not embedding.fine_size:
            return -2.0
        return spec.fine_threshold if spec.fine_threshold is not None else t - FINE_MARGIN

    def best(a: np.ndarray, b: np.ndarray, which: np.ndarray, side: int) -> np.ndarray:
        if len(variants) > 1:
            return best_similarity(which[a], which[b], side, variants)
        return np.einsum("ij,ij->i", which[a], which[b])

    distinct = np.array([r["role"].startswith("distinct") for r in rows])
    dv = np.ascontiguousarray(vectors[distinct])
    index = faiss.IndexFlatIP(dv.shape[1])
    index.add(dv)

    def nearest_other(searched_variants: tuple[Any, ...]) -> np.ndarray:
        """Per distinct image, its best similarity to another distinct image over the variants searched (no fine)."""
        nearest = np.full(len(dv), -1.0, np.float32)
        for moved in grid_variants(dv, size, searched_variants) if len(searched_variants) > 1 else [dv]:
            scores, found = index.search(moved, 3)
            for column in range(3):
                other = (found[:, column] != np.arange(len(dv))) & (found[:, column] >= 0)
                nearest = np.where(other, np.maximum(nearest, scores[:, column]), nearest)
        return nearest

    without_fine = nearest_other(variants)
    mirror_only = nearest_other(group(("flip",))) if embedding.kind == "pixel" else without_fine  # the former search
    # every pair of distinct images at or above the lowest threshold (the exact banded search), with both similarities
    pairs = near_pairs(dv, min(THRESHOLDS), variants=variants, size=size)
    pair_a = np.concatenate([a for a, _ in pairs]) if pairs else np.zeros(0, np.int64)
    pair_b = np.concatenate([b for _, b in pairs]) if pairs else np.zeros(0, np.int64)
    rows_distinct = np.flatnonzero(distinct)
    pair_coarse = best(rows_distinct[pair_a], rows_distinct[pair_b], vectors, size)
    pair_fine = (best(rows_distinct[pair_a], rows_distinct[pair_b], fine, embedding.fine_size)
                 if embedding.fine_size else np.ones(len(pair_a), np.float32))

    def merged_with_fine(t: float) -> np.ndarray:
        keep = (pair_coarse >= np.float32(t)) & (pair_fine >= np.float32(fine_threshold(t)))
        hit = np.zeros(len(dv), bool)
        hit[pair_a[keep]] = True
        hit[pair_b[keep]] = True
        return hit

    copy_pairs: dict[str, list[tuple[int, int]]] = {t: [] for t in TRANSFORMS}
    for r in rows:
        if r["role"].startswith("copy:"):
            copy_pairs[r["role"][5:]].append((index_of[r["file_name"]], index_of[planted[r["file_name"]]]))
    copy_sim: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for transform, found_pairs in copy_pairs.items():
        a, b = np.array([x for x, _ in found_pairs], np.int64), np.array([y for _, y in found_pairs], np.int64)
        copy_sim[transform] = (best(a, b, vectors, size),
                               best(a, b, fine, embedding.fine_size) if embedding.fine_size else np.ones(len(a), np.float32))
    table = {}
    for t in THRESHOLDS:
        table[key(t)] = {
            "recall": {k: float(np.mean((c >= np.float32(t)) & (f >= np.float32(fine_threshold(t))))) if len(c) else None
                       for k, (c, f) in copy_sim.items()},
            "recall_without_fine": {k: float(np.mean(c >= np.float32(t))) if len(c) else None for k, (c, _) in copy_sim.items()},
            "fine_threshold": round(fine_threshold(t), 6) if embedding.fine_size else None,
            "wrongly_merged": float(np.mean(merged_with_fine(t))),
            "wrongly_merged_without_fine": float(np.mean(without_fine >= t))}
    sources = np.array([source_of(r["role"]) for r in rows if r["role"].startswith("distinct")])
    by_source = {t: merged_with_fine(t) for t in THRESHOLDS}
    near_threshold = (pair_coarse >= np.float32(min(THRESHOLDS)))
    return {"thresholds": table,
            "min_copy_similarity": {k: float(c.min()) if len(c) else None for k, (c, _) in copy_sim.items()},
            "min_copy_fine_similarity": {k: float(f.min()) if len(f) else None for k, (_, f) in copy_sim.items()},
            "largest_copy_drop_to_fine": {k: float((c - f)[c >= 0.97].max()) if (c >= 0.97).any() else None
                                          for k, (c, f) in copy_sim.items()},
            "fine": {"size": embedding.fine_size, "threshold": spec.fine_threshold,
                     "margin": FINE_MARGIN} if embedding.fine_size else None,
            "distinct_pairs_searched": int(near_threshold.sum()),
            "wrongly_merged_by_source": {
                source: {key(t): float(np.mean(by_source[t][sources == source])) for t in THRESHOLDS}
                for source in SOURCES if (sources == source).any()},
            "wrongly_merged_by_source_without_fine": {
                source: {key(t): float(np.mean(without_fine[sources == source] >= t)) for t in THRESHOLDS}
                for source in SOURCES if (sources == source).any()},
            "wrongly_merged_by_source_mirror_only": {
                source: {key(t): float(np.mean(mirror_only[sources == source] >= t)) for t in THRESHOLDS}
                for source in SOURCES if (sources == source).any()},
            "distinct_by_source": {source: int((sources == source).sum()) for source in SOURCES}}


def measured(output: Path, planted: dict[str, str], rows: list[dict[str, str]]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    manifest = {r["record_id"]: r for r in pq.read_table(output / "manifest.parquet").to_pylist()}
    role = {r["file_name"]: r["role"] for r in rows}
    recall: dict[str, list[bool]] = {t: [] for t in TRANSFORMS}
    for copy, source in planted.items():
        cluster = manifest[copy]["dup_cluster"]
        recall[role[copy][5:]].append(cluster is not None and cluster == manifest[source]["dup_cluster"])
    distinct = [r for r in manifest.values() if role[r["record_id"]].startswith("distinct")]
    by_cluster: dict[str, int] = {}
    for r in distinct:
        if r["dup_cluster"]:
            by_cluster[r["dup_cluster"]] = by_cluster.get(r["dup_cluster"], 0) + 1
    wrong = [r for r in distinct if r["dup_cluster"] and by_cluster[r["dup_cluster"]] > 1]
    leaked = sum(1 for copy, source in planted.items() if manifest[copy]["partition"] == "clean")
    by_source: dict[str, dict[str, Any]] = {}
    for source in SOURCES:
        total = sum(1 for r in distinct if source_of(role[r["record_id"]]) == source)
        merged = sum(1 for r in wrong if source_of(role[r["record_id"]]) == source)
        if total:
            by_source[source] = {"distinct": total, "wrongly_merged": merged, "share": merged / total}
    return {"recall": {t: float(np.mean(v)) if v else None for t, v in recall.items()},
            "planted": {t: len(v) for t, v in recall.items()},
            "wrongly_merged": len(wrong) / max(1, len(distinct)), "distinct": len(distinct),
            "wrongly_merged_by_source": by_source, "copies_left_clean": leaked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--per-transform", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=None, help="default: the policy's default")
    parser.add_argument("--size", type=int, default=None, help="embedding side; default: the policy's default")
    parser.add_argument("--fine-threshold", type=float, default=None,
                        help="pixel: the finer look's threshold (dedup.Fine); default: threshold - FINE_MARGIN; -1: off")
    parser.add_argument("--embedder", choices=("pixel", "clip"), default="pixel")
    parser.add_argument("--clip-weights", type=Path, help="local open_clip weights (file or directory) for --embedder clip")
    parser.add_argument("--clip-model", default="ViT-B-32", help="architecture of a --clip-weights file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transforms", default="flip,rotate,invert", help="the dedup transforms (comma-separated; '' = none)")
    parser.add_argument("--baseline-src", type=Path, help="a checkout whose dedup (defaults) is timed alongside, e.g. main")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    parser.add_argument("--json", type=Path, help="write the results here (full runs only)")
    args = parser.parse_args()
    from sfbd_guard.curation.dedup import embedding_for
    from sfbd_guard.keys.secret import create_key_file
    from sfbd_guard.policy.model import DedupSpec

    options = {"threshold": args.threshold, "size": args.size, "embedder": args.embedder, "clip_model": args.clip_model,
               "clip_weights": str(args.clip_weights.resolve()) if args.clip_weights else None}
    old_options = {k: v for k, v in options.items() if v is not None}  # what an older checkout's policy accepts too
    spec = DedupSpec(**old_options, transforms=[t for t in args.transforms.split(",") if t],
                     fine_threshold=args.fine_threshold)
    embedding = embedding_for(spec, RESOLUTION, Path.cwd())
    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        root = tmp / "images"
        root.mkdir()
        started = time.perf_counter()
        rows, planted = build(root, args.records, args.per_transform, args.seed)
        built = time.perf_counter() - started
        key = tmp / "noise.key"
        create_key_file(key)
        runs = {"without_dedup": (write_policy(tmp, "plain", root, key, {"enabled": False}), here),
                "with_dedup": (write_policy(tmp, "dedup", root, key, spec.model_dump()), here)}
        if args.baseline_src:
            runs["with_baseline_dedup"] = (write_policy(tmp, "baseline", root, key, old_options), args.baseline_src.resolve())
        timed_prepare(runs["without_dedup"][0], args.workers, here)  # warm-up: file cache
        measured_runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):  # interleaved, best of
            for run_name, (path, source) in runs.items():
                measured_runs[run_name].append(timed_prepare(path, args.workers, source))
        output = tmp / "dedup"
        from sfbd_guard.prepared.reader import open_prepared

        card = open_prepared(output).card
        timing: dict[str, Any] = {}
        for clock, column in (("wall", 0), ("cpu", 1)):  # cpu: little changed by other jobs on a shared machine
            best = {run_name: min(v[column] for v in values) for run_name, values in measured_runs.items()}
            entry: dict[str, Any] = {run_name: round(value, 2) for run_name, value in best.items()}
            entry["all_rounds"] = {run_name: [round(v[column], 2) for v in values]
                                   for run_name, values in measured_runs.items()}
            entry["extra_ratio"] = round(best["with_dedup"] / best["without_dedup"] - 1, 3)
            entry["dedup_seconds"] = round(best["with_dedup"] - best["without_dedup"], 2)
            if "with_baseline_dedup" in best:
                baseline_cost = best["with_baseline_dedup"] - best["without_dedup"]
                entry["baseline_dedup_seconds"] = round(baseline_cost, 2)
                entry["dedup_cost_vs_baseline"] = round(entry["dedup_seconds"] / baseline_cost, 3) if baseline_cost > 0 else None
            timing[clock] = entry
        result = {"records": len(rows), "per_transform": args.per_transform, "workers": args.workers,
                  "resolution": RESOLUTION, "dedup": card.dedup, "build_seconds": round(built, 2),
                  "prepare_seconds": timing, "measured": measured(output, planted, rows),
                  "sweep": sweep(root, rows, planted, embedding, spec)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
