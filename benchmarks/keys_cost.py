"""What the key hierarchy and the release register cost `guard prepare`, per protected image.

1. Noise derivation: the per-image ChaCha20 key. Before: HMAC-SHA256(secret, context ‖ id). Now: the noise subkey
   (HKDF, once per prepare, per decoding block here to be pessimistic) and HMAC-SHA256(subkey, context ‖ pixel
   sha256 ‖ id); the pixel sha256 was already computed for the manifest, so it is timed apart. Set next to the
   cost of drawing the image's noise itself (keyed_normals + noised_copies) at the given resolution.
2. The release register at N records: the register digests (HMAC per image), the lookup of N new releases in a
   register of N earlier ones (all the same images; a tenth under another sigma, so they are re-releases), exact
   only and with the near search (64-float embeddings, FAISS range search at 0.99 with the mirror variant), and the
   locked atomic append.
3. The trainer's manifest (keyed digests, opaque excluded records, allow-listed metadata) written from the full
   manifest of N records.

    PYTHONPATH=. python benchmarks/keys_cost.py --records 100000 --resolution 64 [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from sfbd_guard.curation import register
from sfbd_guard.curation.noise import keyed_normals, noised_copies, record_key
from sfbd_guard.hashing import pixel_sha256
from sfbd_guard.keys.secret import NoiseKey


def best_of(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def old_record_key(secret: bytes, record_id: str, sigma: float, shape: tuple[int, ...]) -> bytes:
    """The derivation before issue 23 (curation/noise.py v1), for comparison."""
    context = b"sfbd_guard/noise/v1\x00" + struct.pack("<d", sigma) + struct.pack(f"<{len(shape)}I", *shape)
    return hmac.new(secret, context + b"\x00" + record_id.encode(), hashlib.sha256).digest()


def noise_costs(count: int, resolution: int) -> dict[str, float]:
    """Microseconds per image of each step (best of 3 over `count` images)."""
    shape = (3, resolution, resolution)
    pixels = np.random.default_rng(0).integers(0, 256, (count, *shape), dtype=np.uint8)
    ids = [f"{i:06d}.jpg" for i in range(count)]
    key = NoiseKey(bytes(range(32)), "key_file")
    shas = [pixel_sha256(p) for p in pixels]
    subkey = key.noise_subkey  # as decode.py: derived once per part
    block = 64  # prepare's CHUNK_RECORDS: the subkey is derived once per block of a worker at most
    per = 1e6 / count
    return {
        "old_record_key_us": per * best_of(7, lambda: [old_record_key(key.secret, r, 0.5, shape) for r in ids]),
        "hkdf_subkey_per_block_us": per * best_of(3, lambda: [key.noise_subkey for _ in range(0, count, block)]),
        "new_record_key_us": per * best_of(7, lambda: [record_key(subkey, r, sigma=0.5, shape=shape, pixel_sha256=s)
                                                       for r, s in zip(ids, shas, strict=True)]),
        "pixel_sha256_us (already paid for the manifest)": per * best_of(3, lambda: [pixel_sha256(p) for p in pixels]),
        "noise_draw_us (keyed_normals + noised_copies)": per * best_of(3, lambda: noised_copies(
            pixels, sigma=0.5, keys=[record_key(subkey, r, sigma=0.5, shape=shape, pixel_sha256=s)
                                     for r, s in zip(ids, shas, strict=True)])),
        "keyed_normals_only_us": per * best_of(3, lambda: [keyed_normals(b"k" * 32, int(np.prod(shape)))
                                                           for _ in range(count)]),
    }


def unit_rows(values: np.ndarray) -> np.ndarray:
    return np.asarray(values / np.linalg.norm(values, axis=1, keepdims=True), np.float32)


def register_costs(records: int) -> dict[str, float]:
    """Seconds and microseconds per image of the register's steps at `records` images."""
    key = NoiseKey(bytes(range(32)), "key_file")
    rng = np.random.default_rng(1)
    shas = [rng.bytes(32).hex() for _ in range(records)]
    released = pa.table({"record_id": [f"{i:07d}.jpg" for i in range(records)], "sha256": shas})
    start = time.perf_counter()
    vectors = unit_rows(rng.standard_normal((records, 64)))  # stand-ins for dedup's pixel embedding (8×8)
    from sfbd_guard.symmetry import group

    near = register.Near("pixel:8:64:flip,rotate,invert:{}", 0.99, group(["flip", "rotate", "invert"]), 8)  # defaults
    earlier = register.entries(key.register_subkey, released, key_id=key.key_id, sigma=0.5, resolution=64,
                               event_id="a" * 32, embedder=near.embedder, vectors=vectors)
    entries_s = time.perf_counter() - start
    sigmas = np.where(np.arange(records) % 10 == 0, 0.6, 0.5)  # a tenth re-released at another sigma
    new = earlier.set_column(2, "sigma", pa.array(sigmas)).set_column(5, "event_id", pa.array(["b" * 32] * records))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / register.REGISTER_NAME
        with register.locked(path):
            register.append(path, earlier)
        lookup_s = best_of(3, lambda: register.find_rereleases(register.read(path), new))
        near_s = best_of(3, lambda: register.find_rereleases(register.read(path), new, near))
        unseen = register.entries(key.register_subkey, released.set_column(1, "sha256", pa.array(
            [rng.bytes(32).hex() for _ in range(records)])), key_id=key.key_id, sigma=0.5, resolution=64,
            event_id="c" * 32, embedder=near.embedder, vectors=unit_rows(rng.standard_normal((records, 64))))
        start = time.perf_counter()
        register.find_rereleases(register.read(path), unseen, near)
        unseen_s = time.perf_counter() - start
        found = register.find_rereleases(register.read(path), new, near)
        start = time.perf_counter()
        with register.locked(path):
            register.append(path, new)
        append_s = time.perf_counter() - start
        size = path.stat().st_size
    assert found is not None and found.images == (records + 9) // 10
    per = 1e6 / records
    return {"records": records, "entries_s": entries_s, "entries_us_per_image": entries_s * per,
            "read_and_lookup_s": lookup_s, "lookup_us_per_image": lookup_s * per,
            "read_and_lookup_with_near_s (the same images again)": near_s, "lookup_with_near_us_per_image": near_s * per,
            "near_search_of_N_unseen_images_s": unseen_s, "near_search_us_per_unseen_image": unseen_s * per,
            "append_s (register of 2N rows written)": append_s, "append_us_per_image": append_s * per,
            "register_bytes_after": size, "rereleases_found": found.images}


def manifest_costs(records: int) -> dict[str, float]:
    """The trainer's manifest (curation/disclosure.py) written from a full manifest of `records` rows, a tenth
    excluded, with two metadata columns of which one is allow-listed."""
    import pyarrow.parquet as pq

    from sfbd_guard.curation.disclosure import write_trainer_manifest
    from sfbd_guard.prepared.manifest import MANIFEST_FIELDS, manifest_table

    rng = np.random.default_rng(2)
    partition = np.where(np.arange(records) % 10 == 0, "excluded", np.where(np.arange(records) % 10 == 1, "clean",
                                                                             "protected"))
    columns: dict[str, list[object]] = {f.name: [None] * records for f in MANIFEST_FIELDS}
    columns["record_id"] = [f"{i:07d}.jpg" for i in range(records)]
    columns["partition"] = partition.tolist()
    columns["rule"] = ["r"] * records
    columns["sha256"] = [rng.bytes(32).hex() for _ in range(records)]
    metadata = pa.table({"record_id": columns["record_id"], "license": ["CC0-1.0"] * records,
                         "caption": [f"caption {i}" for i in range(records)]})
    key = NoiseKey(bytes(range(32)), "key_file")
    with tempfile.TemporaryDirectory() as folder:
        full, out = Path(folder) / "full.parquet", Path(folder) / "manifest.parquet"
        with pq.ParquetWriter(str(full), manifest_table({k: v[:1] for k, v in columns.items()},
                                                        metadata.slice(0, 1)).schema) as writer:
            for start in range(0, records, 4096):
                part = {k: v[start:start + 4096] for k, v in columns.items()}
                writer.write_table(manifest_table(part, metadata.slice(start, 4096)))
        seconds = best_of(3, lambda: write_trainer_manifest(full, out, digest_key=key.digest_subkey,
                                                            opaque_key=key.opaque_subkey, allowed=["license"]))
    return {"records": records, "trainer_manifest_s": seconds, "trainer_manifest_us_per_record": seconds * 1e6 / records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--noise-images", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {"noise": noise_costs(args.noise_images, args.resolution), "register": register_costs(args.records),
              "trainer_manifest": manifest_costs(args.records), "resolution": args.resolution}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
