"""CIFAR-10, python version as distributed: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ImageDecodeError, InputError
from .base import DatasetReader
from .transforms import resize_square, to_chw

FOLDER = "cifar-10-batches-py"
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


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = _ArraysOnly(handle, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise InputError(f"{path}: not a CIFAR-10 python batch ({err})") from None
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

    def _split_arrays(self, split: str) -> tuple[np.ndarray, list[int]]:
        images, labels = [], []
        for name in BATCHES[split]:
            batch = _read_batch(self.require_file(f"{FOLDER}/{name}"))
            data = np.asarray(batch.get("data"))
            if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
                raise InputError(f"{self.root / FOLDER / name}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in batch.get("labels", []))
        return np.concatenate(images), labels

    def metadata(self) -> pa.Table:
        self.require_root()
        meta = _read_batch(self.require_file(f"{FOLDER}/batches.meta"))
        label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
        tables = []
        for split in self._splits():
            images, labels = self._split_arrays(split)
            self._images[split] = images
            count = len(images)
            tables.append(pa.table({
                "record_id": pa.array([f"{split}-{i:05d}" for i in range(count)], pa.string()),
                "index": pa.array(range(count), pa.int64()),
                "label": pa.array(labels, pa.int64()),
                "label_name": pa.array([label_names[v] if v < len(label_names) else None for v in labels], pa.string()),
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
