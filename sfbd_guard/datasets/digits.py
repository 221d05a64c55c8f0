"""scikit-learn's bundled 8×8 handwritten digits (1797 real images, no download): the embedded default."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from .base import DatasetReader, SourceSpec
from .transforms import resize_square, to_chw

COUNT = 1797


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits dataset needs scikit-learn", hint="pip install scikit-learn") from None
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0–16 → 0–255
    return pixels, bunch.target.astype(np.int64)


class DigitsReader(DatasetReader):
    format = "digits"
    channels = 1
    color = "grayscale, stored with C=1"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._pixels: np.ndarray | None = None

    def _images(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = _digits()[0]
        return self._pixels

    def metadata(self) -> pa.Table:
        pixels, labels = _digits()
        self._pixels = pixels
        return pa.table({
            "record_id": pa.array([f"digits-{i:04d}" for i in range(len(labels))], pa.string()),
            "index": pa.array(range(len(labels)), pa.int64()),
            "label": pa.array(labels, pa.int64()),
        })

    def load(self, record_id: str) -> np.ndarray:
        from PIL import Image

        index = record_id.removeprefix("digits-")
        images = self._images()
        if not index.isdigit() or int(index) >= len(images):
            raise ImageDecodeError(f"no digit {record_id}")
        image = Image.fromarray(images[int(index)])
        return to_chw(resize_square(image, self.spec.resolution))
