"""CIFAR-10, python version as distributed: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from .base import DatasetReader
from .transforms import resize_square, to_chw

FOLDER = "cifar-10-batches-py"
CLASSES = 10
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR batches are pickles; this unpickler builds only plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_batch(path: Path, data: bytes) -> dict[str, Any]:
    try:
        raw = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, RecursionError, UnicodeDecodeError, OverflowError) as err:
        raise InputError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a CIFAR-10 python batch (no dict inside)")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in raw.items()}


class Cifar10Reader(DatasetReader):
    format = "cifar10"
    splits = ("train", "test", "all")

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._images: dict[str, np.ndarray] = {}

    def layout_hint(self) -> str:
        return f"expected {FOLDER}/ with data_batch_1..5, test_batch and batches.meta under the root"

    def _splits(self) -> list[str]:
        return ["train", "test"] if self.spec.split == "all" else [self.spec.split]

    def _batch(self, name: str) -> tuple[Path, dict[str, Any]]:
        path = self.require_file(f"{FOLDER}/{name}")
        return path, _read_batch(path, self.read_file(path))

    def _split_arrays(self, split: str) -> tuple[np.ndarray, list[int]]:
        images, labels = [], []
        for name in BATCHES[split]:
            path, batch = self._batch(name)
            data, batch_labels = _checked_batch(path, batch)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(batch_labels)
        return np.concatenate(images), labels

    def metadata(self) -> pa.Table:
        self.require_root()
        meta_path, meta = self._batch("batches.meta")
        label_names = _label_names(meta_path, meta)
        tables = []
        for split in self._splits():
            images, labels = self._split_arrays(split)
            self._images[split] = images
            count = len(images)
            tables.append(pa.table({
                "record_id": pa.array([f"{split}-{i:05d}" for i in range(count)], pa.string()),
                "index": pa.array(range(count), pa.int64()),
                "label": pa.array(labels, pa.int64()),
                "label_name": pa.array([label_names[v] for v in labels], pa.string()),
                "split": pa.array([split] * count, pa.string()),
            }))
        return pa.concat_tables(tables).sort_by("record_id")

    def load(self, record_id: str) -> np.ndarray:
        split, _, index = record_id.partition("-")
        if split not in self._images:
            self._images[split] = self._split_arrays(split)[0]
        images = self._images[split]
        if not index.isdigit() or int(index) >= len(images):
            raise ImageDecodeError(f"no record {record_id} in the {split} batches")
        chw = images[int(index)]
        if self.spec.resolution == 32:
            return np.ascontiguousarray(chw)
        from PIL import Image

        return to_chw(resize_square(Image.fromarray(chw.transpose(1, 2, 0)), self.spec.resolution))


def _checked_batch(path: Path, batch: dict[str, Any]) -> tuple[np.ndarray, list[int]]:
    """The batch's `data` (uint8 N×3072) and `labels` (N ints in 0..9), checked before any use."""
    data = batch.get("data")
    if not isinstance(data, np.ndarray):
        raise InputError(f"{path}: 'data' must be a uint8 array [N, 3072], got {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(f"{path}: 'data' must be a uint8 array [N, 3072], got {data.dtype} {list(data.shape)}")
    labels = batch.get("labels")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{path}: 'labels' must be {len(data)} integers in 0..{CLASSES - 1}, got {labels.dtype} {list(labels.shape)}"
            )
        labels = labels.tolist()
    if not isinstance(labels, list):
        raise InputError(
            f"{path}: 'labels' must be a list of {len(data)} integers in 0..{CLASSES - 1}, got {type(labels).__name__}"
        )
    if len(labels) != len(data):
        raise InputError(f"{path}: {len(labels)} labels for {len(data)} images")
    for index, value in enumerate(labels):
        if isinstance(value, np.integer):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < CLASSES:
            raise InputError(f"{path}: label {value!r} of image {index} is not an integer in 0..{CLASSES - 1}")
    return data, [int(v) for v in labels]


def _label_names(path: Path, meta: dict[str, Any]) -> list[str]:
    names = meta.get("label_names", [])
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise InputError(f"{path}: 'label_names' must be a list of strings")
    if len(names) < CLASSES:  # a label without a name would be a null label_name, which no rule on it matches
        raise InputError(f"{path}: 'label_names' names {len(names)} classes, not {CLASSES}")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise InputError(f"{path}: 'label_names' are not UTF-8") from None
