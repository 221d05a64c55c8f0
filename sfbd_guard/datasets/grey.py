"""`dataset.channels: 1`: any 3-channel reader's images as one grey channel (ITU-R 601-2 luma, as PIL's "L").

Grey scans stored as RGB files (or as grey files that the decoders turn into RGB) would otherwise cost three
channels of noise and of network input for one channel of content, with independent noise per channel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from .base import DatasetReader, ListingReport, Loaded, Part


def luma(pixels: np.ndarray) -> np.ndarray:
    """uint8 (3, H, W) → uint8 (1, H, W), L = (19595 R + 38470 G + 7471 B + 2^15) >> 16: PIL's "L" conversion
    exactly (a grey image stored as RGB keeps its values). Anything not (3, H, W) is returned as it is (the caller's
    shape check names it)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        return pixels
    rgb = pixels.astype(np.uint32)
    grey: np.ndarray = (19595 * rgb[0] + 38470 * rgb[1] + 7471 * rgb[2] + 0x8000) >> 16
    return grey.astype(np.uint8)[None]


class GreyReader(DatasetReader):
    """Another reader's records, each converted by `luma`; everything else (listing, parts, errors) is its own."""

    channels = 1
    color = "grey (ITU-R 601-2 luma of the decoded RGB)"

    def __init__(self, inner: DatasetReader) -> None:
        if inner.channels != 3:
            raise ValueError(f"GreyReader converts 3-channel readers, not {inner.channels}-channel {inner.format!r}")
        self.inner = inner
        self.spec = inner.spec
        self.format, self.splits, self.listed = inner.format, inner.splits, inner.listed

    def metadata(self) -> pa.Table:
        return self.inner.metadata()

    def load(self, record_id: str) -> np.ndarray:
        return luma(self.inner.load(record_id))

    def parts(self) -> list[Part]:
        return self.inner.parts()

    def part_metadata(self, part: Part) -> pa.Table:
        return self.inner.part_metadata(part)

    def read_part(self, part: Part, record_ids: Sequence[str]) -> Iterator[Loaded]:
        return self._grey(self.inner.read_part(part, record_ids))

    def load_many(self, record_ids: Sequence[str]) -> Iterator[Loaded]:
        return self._grey(self.inner.load_many(record_ids))

    def listing_report(self) -> ListingReport | None:
        return self.inner.listing_report()

    def require_file(self, relative: str) -> Path:
        return self.inner.require_file(relative)

    def read_file(self, path: Path) -> bytes:
        return self.inner.read_file(path)

    def require_root(self) -> None:
        self.inner.require_root()

    def layout_hint(self) -> str:
        return self.inner.layout_hint()

    @staticmethod
    def _grey(loaded: Iterator[Loaded]) -> Iterator[Loaded]:
        for record_id, pixels in loaded:
            yield record_id, pixels if not isinstance(pixels, np.ndarray) else luma(pixels)
