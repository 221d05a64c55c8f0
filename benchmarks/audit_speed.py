"""How fast the audit embeds and searches.

1. Embeddings per second per embedder on 64 px uint8 images (the prepared resolution of the CelebA
   setting): `pixel` (32×32), a tiny random open_clip ViT (64 px), and ViT-B-32 with random weights at
   224 px (the speed of real ViT-B-32 weights; weights do not change the cost). With flip on, the
   audit embeds every query twice.
2. Exact top-k search of Q queries against N unit references (default 10k × 100k) at the CLIP (512)
   and pixel (3072) dimensions: the audit's FAISS path (`faiss.knn`, batched) versus a numpy brute
   force (GEMM + argpartition, batched), and a check that both return the same neighbours.

    python benchmarks/audit_speed.py [--queries 10000 --references 100000 --dims 512 3072] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sfbd_guard.auditing.config import SearchSpec
from sfbd_guard.auditing.index import InnerProductIndex
from sfbd_guard.embedding.embed import Embedder, PixelEmbedder


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def numpy_topk(queries: np.ndarray, references: np.ndarray, k: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: similarities by matrix product, top-k by argpartition then a sort of the k."""
    rows, sims = [], []
    for start in range(0, len(queries), batch):
        block = queries[start : start + batch] @ references.T
        part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(block, part, 1)
        order = np.argsort(-values, axis=1)
        rows.append(np.take_along_axis(part, order, 1))
        sims.append(np.take_along_axis(values, order, 1))
    return np.concatenate(rows), np.concatenate(sims)


def search_row(queries: int, references: int, dim: int, k: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    refs, qs = unit_vectors(rng, references, dim), unit_vectors(rng, queries, dim)
    start = time.perf_counter()
    found = InnerProductIndex(refs, SearchSpec()).search(qs, k)
    faiss_s = time.perf_counter() - start
    start = time.perf_counter()
    rows, sims = numpy_topk(qs, refs, k)
    numpy_s = time.perf_counter() - start
    same_rows = float(np.mean(found.rows == rows))
    return {"dim": dim, "faiss_s": round(faiss_s, 2), "numpy_s": round(numpy_s, 2), "same_neighbours": same_rows,
            "max_sim_diff": float(np.abs(found.scores - sims).max())}


def tiny_clip(folder: Path) -> Embedder:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from sfbd_guard.embedding.clip import ClipEmbedder

    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": 64}}))
    torch.manual_seed(0)
    save_file(open_clip.create_model(f"local-dir:{folder}").state_dict(), str(folder / "open_clip_model.safetensors"))
    return ClipEmbedder(weights=str(folder), model="", quick_gelu=False)


def vit_b_32(folder: Path) -> Embedder:
    """ViT-B-32 with random weights, saved as a file and loaded the way real weights are."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from sfbd_guard.embedding.clip import ClipEmbedder

    torch.manual_seed(0)
    save_file(open_clip.create_model("ViT-B-32").state_dict(), str(folder / "vit-b-32-random.safetensors"))
    return ClipEmbedder(weights=str(folder / "vit-b-32-random.safetensors"), model="ViT-B-32", quick_gelu=False)


def embed_rate(embedder: Embedder, count: int, batch: int) -> float:
    images = np.random.default_rng(0).integers(0, 256, (count, 3, 64, 64), dtype=np.uint8)
    embedder.embed(images[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, count, batch):
        embedder.embed(images[i : i + batch])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000, help="query vectors")
    parser.add_argument("--references", type=int, default=100_000, help="reference vectors")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 3072], help="vector dimensions")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, object] = {"embed_per_s": {}, "search": []}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        makers = {"pixel (32x32)": (lambda: PixelEmbedder(size=32, channels=3), 5000),
                  "clip tiny random ViT (64 px)": (lambda: tiny_clip(tmp), 512),
                  "clip ViT-B-32 random weights (224 px)": (lambda: vit_b_32(tmp), 64)}
        for label, (make, count) in makers.items():
            rate = embed_rate(make(), count, batch=64)
            results["embed_per_s"][label] = round(rate, 1)  # type: ignore[index]
            print(f"| {label} | {rate:,.1f} images/s |", flush=True)
    for dim in args.dims:
        row = search_row(args.queries, args.references, dim, args.k, seed=dim)
        results["search"].append(row)  # type: ignore[union-attr]
        print(f"| {args.queries} x {args.references} x {dim} | faiss {row['faiss_s']} s | numpy {row['numpy_s']} s | "
              f"same neighbours {row['same_neighbours']:.4f} | max |sim diff| {row['max_sim_diff']:.1e} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
