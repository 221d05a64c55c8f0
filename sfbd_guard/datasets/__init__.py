"""Dataset readers for the supported on-disk layouts, by format name."""

from __future__ import annotations

from .base import PART_RECORDS, RESERVED_COLUMNS, DatasetReader, Loaded, Part, SourceSpec, listing_parts
from .celeba import CelebAReader
from .cifar10 import Cifar10Reader
from .digits import DigitsReader
from .grey import GreyReader
from .imagefolder import ImageFolderReader
from .parquet import ParquetReader
from .webdataset import WebDatasetReader

READERS: dict[str, type[DatasetReader]] = {
    "celeba": CelebAReader,
    "cifar10": Cifar10Reader,
    "imagefolder": ImageFolderReader,
    "digits": DigitsReader,
    "webdataset": WebDatasetReader,
    "parquet": ParquetReader,
}


def open_reader(spec: SourceSpec) -> DatasetReader:
    """The reader for `spec.format` (validated by the policy schema); grey when `spec.channels` is 1."""
    reader = READERS[spec.format](spec)
    if spec.channels == 1 and reader.channels == 3:
        return GreyReader(reader)
    return reader


__all__ = ["PART_RECORDS", "READERS", "RESERVED_COLUMNS", "DatasetReader", "Loaded", "Part", "SourceSpec", "listing_parts",
           "open_reader"]
