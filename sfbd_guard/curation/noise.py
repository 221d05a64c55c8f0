"""The fixed Gaussian noise of protected records: y = x/127.5 - 1 + sigma * eps, not clipped.

A record's noise depends only on (noise.seed, record_id), never on its position, the split, the file
order or the number of workers, so the same policy and data give byte-identical rows.
"""

from __future__ import annotations

import hashlib

import numpy as np


def noise_seed(seed: int, record_id: str) -> int:
    """64-bit seed of a record's noise generator: the first 8 bytes of sha256(f'{seed}:{record_id}')."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little")


def noised_copies(pixels: np.ndarray, *, sigma: float, seeds: list[int]) -> np.ndarray:
    """uint8 (N, C, H, W) pixels → float16 x/127.5 - 1 + sigma * eps; row i's eps ~ N(0, I) from PCG64(seeds[i]).

    Row i's noise is what `Generator(PCG64(seeds[i])).standard_normal((C, H, W), dtype=float32)` draws.
    Record by record, in one reused float32 buffer (whole-block arithmetic is slower: it leaves the CPU caches).
    """
    noisy = np.empty(pixels.shape, dtype=np.float16)
    row = np.empty(pixels.shape[1:], dtype=np.float32)
    for out, x, seed in zip(noisy, pixels, seeds, strict=True):
        np.random.Generator(np.random.PCG64(seed)).standard_normal(dtype=np.float32, out=row)
        row *= np.float32(sigma)
        row += x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        out[...] = row  # rounded to float16
    return noisy


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hex sha256 of a record's transformed uint8 pixels, (C, H, W) in C order."""
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
