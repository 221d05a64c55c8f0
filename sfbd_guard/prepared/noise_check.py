"""Statistical check that the protected arrays of a prepared directory really are noisy copies.

A protected array row must be y = x/127.5 - 1 + σε with ε ~ N(0, I) drawn independently per pixel. A
forger who replaces the rows with the originals (x/127.5 - 1), or with originals plus a little noise,
and re-hashes the card defeats every sha256 check; this module looks at the pixels themselves.

Estimator (per image, over all channels): the finest orthonormal Haar detail coefficients
(LH, HL, HH of every 2×2 block: (a+b-c-d)/2, (a-b+c-d)/2, (a-b-c+d)/2), n = 3·C·⌊H/2⌋·⌊W/2⌋ values.
For pure white noise of level σ they are i.i.d. N(0, σ²); image content s adds to them (c = s + σz).
σ̂ = (lower median of |c|) / 0.6745 is Donoho's MAD noise estimator.

Why the thresholds are safe for honest data, whatever the image: |s + σz| is stochastically increasing
in |s|, and an order statistic of independent variables is increasing in each of them, so for every
honest image P(σ̂ < τσ) ≤ P(σ̂ < τσ | s = 0) = P(Bin(n, 2Φ(0.6745τ) - 1) ≥ ⌈n/2⌉). Content can only make
σ̂ larger. We bound that binomial tail with the Chernoff bound exp(-n·KL(k/n ‖ p)) and choose τ(n) so that
the bound is `ALPHA_IMAGE` (1e-9): the false-failure rate is at most 1e-9 per honest image, exactly, for
any content (float16 rounding is covered by adding one float16 ulp to every |c|). The same argument
bounds the pooled test of the whole partition: the share of coefficients with |c| < 0.6745σ is, for honest
data, stochastically below Bin(M, 1/2)/M; the partition fails when the share is so high that the Chernoff
bound is below `ALPHA_POOL` (1e-9). With M in the tens of thousands this test is tight (fails above ~51%).

A second, independent test: the distance of (y+1)·127.5 from the uint8 grid. An original stored as
float16 lies within 0.032 of an integer in every pixel; a noisy copy lies there in ~10% of pixels.
An image fails when at least `GRID_SHARE` (1/2) of its pixels lie within `GRID_DELTA` (0.05) of the grid.

What it cannot catch (documented limitation): content that is indistinguishable from noise. Per image the
test has power when most Haar coefficients of the original are near zero (flat regions); on 8×8 digits
(n = 48) τ is 0.22, so one original plus noise of σ/10 fails, but one original plus noise of σ/3 passes
the per-image test (the pooled test catches it when many rows are forged that way). An attacker who adds
noise at the full σ only to the finest scale (keeping a low-pass original) is not detected. Noise at full
σ everywhere is not an attack: that is a valid noisy copy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

ALPHA_IMAGE = 1e-9  # bound on the false-failure probability of one honest image
ALPHA_POOL = 1e-9  # bound on the false-failure probability of an honest partition (pooled test)
GRID_DELTA = 0.05  # a pixel is "on the uint8 grid" when (y+1)*127.5 is this close to an integer
GRID_SHARE = 0.5  # an image fails when this share of its pixels (or more) is on the grid
MAD = 0.6744897501960817  # Φ⁻¹(3/4): median |N(0, 1)|
CHUNK = 2048  # images per block: the float16 ulp margin is taken per block (results depend on it: keep it)
PART = 128  # images per part of a block whose per-image statistics are computed at once (bounds memory only)
_NORMAL = NormalDist()


@dataclass(frozen=True)
class NoiseStats:
    passed: bool
    images: int
    coefficients: int  # n per image
    tau: float  # per-image threshold on σ̂/σ
    min_ratio: float  # smallest σ̂/σ over the images
    median_ratio: float  # median σ̂/σ
    pooled_share: float  # share of coefficients with |c| < 0.6745σ (pure noise: ≤ 0.5)
    pooled_limit: float  # fail above this share
    max_grid_share: float  # largest share of on-grid pixels of one image
    failures: int  # images failing either per-image test
    first_failure: str | None  # "record_id (σ̂/σ = …, … on grid)"

    def detail(self, sigma: float) -> str:
        """What was checked and found, in words a reviewer can follow, with the numbers."""
        rule = (f"checked: the noise each image carries, estimated from its finest detail (σ̂, Haar MAD: median absolute "
                f"deviation over n={self.coefficients} coefficients), must be ≥ {self.tau:.3f}σ; at most "
                f"{self.pooled_limit:.1%} of all coefficients may be below 0.6745σ; under {GRID_SHARE:.0%} of an image's "
                f"pixels may lie within {GRID_DELTA} of a whole uint8 value (an original's pixels all do); an honest "
                f"noisy image fails by chance with probability ≤ {ALPHA_IMAGE:g}")
        if self.images == 0:
            return "no protected records"
        if not self.passed:
            where = (f"{self.failures} of {self.images} image(s) fail, first {self.first_failure}" if self.failures else
                     f"the partition: {self.pooled_share:.1%} of coefficients below 0.6745σ")
            return f"protected arrays are not noisy copies at sigma {sigma}: {where} [{rule}]"
        return (f"the noise in each of the {self.images} protected images has the policy's strength (σ = {sigma}): "
                f"estimated σ̂/σ from {self.min_ratio:.3f} (median {self.median_ratio:.3f}), where honest noise gives "
                f"≥ {self.tau:.3f} per image (less: noise removed or weakened); no image has {GRID_SHARE:.0%} of its pixels "
                f"within {GRID_DELTA} of a whole uint8 value, as a stored original would (all of them); "
                f"{self.pooled_share:.1%} of all coefficients below 0.6745σ (limit {self.pooled_limit:.1%}). σ̂: Haar MAD, the "
                f"median absolute deviation of the n={self.coefficients} finest detail coefficients of an image; an honest noisy "
                f"image fails by chance with probability ≤ {ALPHA_IMAGE:g}")


def _kl(q: float, p: float) -> float:
    """KL divergence between Bernoulli(q) and Bernoulli(p)."""
    total = 0.0
    if q > 0:
        total += q * math.log(q / p)
    if q < 1:
        total += (1 - q) * math.log((1 - q) / (1 - p))
    return total


def _largest_p(n: int, share: float, alpha: float) -> float:
    """The largest p < share with exp(-n·KL(share ‖ p)) ≤ alpha (bisection; KL falls as p rises to share)."""
    low, high, target = 1e-12, share, math.log(1 / alpha) / n
    if _kl(share, low) < target:
        return 0.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _kl(share, mid) >= target else (low, mid)
    return low


def image_threshold(n: int, alpha: float = ALPHA_IMAGE) -> float:
    """τ(n): an honest image has σ̂ < τσ with probability ≤ alpha (n coefficients, lower median)."""
    k = math.ceil(n / 2)
    p = _largest_p(n, k / n, alpha)
    return _NORMAL.inv_cdf((1 + p) / 2) / MAD if p > 0 else 0.0


def pooled_limit(total: int, alpha: float = ALPHA_POOL) -> float:
    """The share s > 1/2 above which P(Bin(total, 1/2) ≥ s·total) ≤ alpha (Chernoff)."""
    low, high, target = 0.5, 1.0, math.log(1 / alpha) / total
    if _kl(high, 0.5) < target:
        return 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if _kl(mid, 0.5) >= target else (mid, high)
    return high


def haar_details(y: np.ndarray) -> np.ndarray:
    """(N, C, H, W) → (N, n): the finest orthonormal Haar detail coefficients of each image."""
    h, w = y.shape[2] // 2 * 2, y.shape[3] // 2 * 2
    y = y[:, :, :h, :w].astype(np.float32)
    a, b, c, d = y[:, :, 0::2, 0::2], y[:, :, 0::2, 1::2], y[:, :, 1::2, 0::2], y[:, :, 1::2, 1::2]
    bands = ((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2)
    return np.concatenate([band.reshape(len(y), -1) for band in bands], axis=1)


def _blocks(pixels: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The images `CHUNK` at a time, whatever blocks they come in: the same blocks for an array and for its shards
    (the float16 ulp margin is taken per block, so equal blocks give identical statistics)."""
    if isinstance(pixels, np.ndarray):
        for start in range(0, len(pixels), CHUNK):
            yield np.asarray(pixels[start:start + CHUNK])
        return
    pending: list[np.ndarray] = []
    held = 0
    for part in pixels:
        while len(part):
            taken = part[: CHUNK - held]
            pending.append(np.asarray(taken))
            held += len(taken)
            part = part[len(taken):]
            if held == CHUNK:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, held = [], 0
    if held:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def check_protected(pixels: np.ndarray | Iterable[np.ndarray], sigma: float, record_ids: Sequence[str],
                    shape: tuple[int, int, int] | None = None) -> NoiseStats:
    """Test every protected image for noise consistent with `sigma`.

    `pixels`: one (N, C, H, W) float16 array, or its rows in consecutive blocks (e.g. shard by shard, so a
    partition larger than memory is tested in bounded memory); `record_ids` names the N rows in order.
    `shape` (C, H, W) is needed only for blocks that may hold no image at all.
    """
    if isinstance(pixels, np.ndarray):
        shape = (pixels.shape[1], pixels.shape[2], pixels.shape[3])
    else:
        blocks = iter(pixels)
        first = next(blocks, None)
        if first is not None:
            shape = (first.shape[1], first.shape[2], first.shape[3])
            pixels = itertools.chain([first], blocks)
        else:
            pixels = []
    c, h, w = shape if shape is not None else (0, 0, 0)
    count = len(pixels) if isinstance(pixels, np.ndarray) else len(record_ids)
    n = 3 * c * (h // 2) * (w // 2)
    tau = image_threshold(n) if n else 0.0
    limit = pooled_limit(max(1, n * count))
    if count == 0 or n == 0:
        return NoiseStats(count == 0, count, n, tau, 0.0, 0.0, 0.0, limit, 0.0, 0, None)
    k = math.ceil(n / 2) - 1
    ratios = np.empty(count)
    grid = np.empty(count)
    below = 0
    start = 0
    for block in _blocks(pixels):
        if start + len(block) > count:
            raise ValueError(f"more images than the {count} record ids")
        # every |c| is raised by one float16 ulp at the block's largest |y|: rounding cannot fail an honest image
        ulp = float(np.spacing(np.abs(block).max().astype(np.float16)))
        for at in range(0, len(block), PART):  # image by image statistics, in parts: bounded temporaries
            part = block[at:at + PART]
            coefficients = np.abs(haar_details(part)) + ulp
            ratios[start:start + len(part)] = np.partition(coefficients, k, axis=1)[:, k] / (MAD * sigma)
            below += int((coefficients < MAD * sigma).sum())
            levels = (part.astype(np.float64) + 1) * 127.5
            grid[start:start + len(part)] = (np.abs(levels - np.round(levels)) < GRID_DELTA).reshape(len(part), -1).mean(axis=1)
            start += len(part)
    if start != count:
        raise ValueError(f"{start} images for {count} record ids")
    failing = np.flatnonzero((ratios < tau) | (grid >= GRID_SHARE))
    share = below / (n * count)
    first_failure = None
    if len(failing):
        i = int(failing[0])
        first_failure = (f"{record_ids[i]} (σ̂ = {ratios[i] * sigma:.4f}, σ̂/σ = {ratios[i]:.3f}, "
                         f"{grid[i]:.0%} of pixels on the uint8 grid)")
    passed = not len(failing) and share <= limit
    return NoiseStats(passed, count, n, tau, float(ratios.min()), float(np.median(ratios)), share, limit,
                      float(grid.max()), len(failing), first_failure)
