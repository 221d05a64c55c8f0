"""A prepared directory as a Hugging Face `datasets.Dataset` (docs/byo-trainer.md).

Built from a `PreparedDataset` (so after the same checks as `guard train`: fingerprints, provenance, noise
statistics) by `Dataset.from_generator`, which streams its rows a block at a time into Arrow files and maps them:
memory does not grow with the dataset. Its columns are the torch dataset's items, typed: `image` Array3D float32
(C, H, W) on the [-1, 1] scale, `sigma` float32 (0 for clean), `partition` ClassLabel (clean, protected) and
`record` string (the manifest's keyed digest). It holds clean images and noisy copies only, like the directory.

`datasets` writes those Arrow files to a cache folder: `cache_dir` when given (never inside the prepared
directory, which is what the owner hands on), else a new temporary folder, which the caller removes when done
(`dataset.cache_files` names it). In a given `cache_dir` a second call on the same directory (same fingerprint and
partition) reuses the files the first one wrote.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..version import __version__
from .layout import CLEAN, PROTECTED
from .torch_dataset import PartitionName, PathLike, PreparedDataset

BLOCK = 256  # rows read from the shards at a time


def _examples(source: PreparedDataset) -> Iterator[dict[str, Any]]:
    for start in range(0, len(source), BLOCK):
        for item in source.__getitems__(list(range(start, min(start + BLOCK, len(source))))):
            yield {"image": item["image"].numpy(), "sigma": float(item["sigma"]), "partition": item["partition"],
                   "record": item["record"]}


def features(image_shape: tuple[int, int, int]) -> Any:
    """The dataset's `datasets.Features`."""
    import datasets  # type: ignore[import-untyped]

    return datasets.Features({
        "image": datasets.Array3D(shape=image_shape, dtype="float32"),
        "sigma": datasets.Value("float32"),
        "partition": datasets.ClassLabel(names=[CLEAN, PROTECTED]),
        "record": datasets.Value("string"),
    })


def to_hf_dataset(root: PathLike, partition: PartitionName = "all", *, cache_dir: PathLike | None = None,
                  ledger: PathLike | None = None, verify_key: PathLike | None = None,
                  allow_unrecorded: bool = False) -> Any:
    """The rows of the prepared directory `root` as a `datasets.Dataset` (checked as `PreparedDataset` checks them:
    `ledger`, `verify_key` and `allow_unrecorded` are guard train's options); its Arrow files go to `cache_dir`, or to
    a new temporary folder."""
    import datasets

    source = PreparedDataset(root, partition, ledger=ledger, verify_key=verify_key, allow_unrecorded=allow_unrecorded)
    if cache_dir is not None and Path(cache_dir).resolve().is_relative_to(source.data.root):
        raise InputError(f"cache_dir {cache_dir}: inside the prepared directory {source.data.root}",
                         hint="the prepared directory holds only what guard prepare wrote; choose a folder outside it")
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="sfbd-guard-hf-"))
    return datasets.Dataset.from_generator(
        partial(_examples, source), features=features(source.image_shape), cache_dir=str(folder),
        fingerprint=f"sfbd-guard-{__version__}-{source.fingerprint[:32]}-{partition}")
