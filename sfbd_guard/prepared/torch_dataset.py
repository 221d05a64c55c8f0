"""A prepared directory as a `torch.utils.data.Dataset`, for a training loop of one's own (docs/byo-trainer.md).

The constructor runs the checks `guard train` runs before it trains (engine/service.py `check_trusted`): the
directory verified against its card (`open_prepared`: every array file and the manifest against their sha256),
its provenance (the ledger's prepare event, or the owner's signature with `verify_key`; refused without either
unless `allow_unrecorded`) and the noise statistics of its protected arrays (`require_noisy`). A failed check
raises the trainer's own VerificationError, word for word.

Items are dicts: `image` (float32 C×H×W on the model's [-1, 1] scale: clean x/127.5 - 1, a noisy copy as stored,
x/127.5 - 1 + σε, not clipped), `sigma` (float32: 0 for clean, the copy's σ), `partition` (clean | protected) and
`record` (the manifest's keyed digest of the record: it joins to manifest.parquet and confirms nothing without the
owner's digest key; never a file name, never an excluded record). The pixels stay in the memory-mapped shards
(`mapped.MappedRows`) and are converted an item (or a batch, `__getitems__`) at a time, so memory does not grow
with the dataset; DataLoader workers forked from the process share the mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError, VerificationError
from ..ledger import ledger_dir
from .layout import CLEAN, MANIFEST, PROTECTED
from .mapped import MappedRows
from .reader import Partition, PreparedData, Provenance, open_prepared, require_noisy, require_provenance

PartitionName = Literal["clean", "protected", "all"]
PathLike = str | os.PathLike[str]


def to_model_range(stored: np.ndarray) -> np.ndarray:
    """Stored pixels → float32 on the [-1, 1] scale, as the trainer gathers them (engine/data.py `from_stored`):
    uint8 x → x/127.5 - 1; float16 (the noisy copies) → float32 as they are."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return stored.astype(np.float32)


@dataclass(frozen=True)
class _Part:
    name: str
    rows: Partition
    digests: Any  # the manifest's keyed digests of the partition's rows, in its order (an Arrow array)


def _digests(data: PreparedData, names: tuple[str, ...]) -> dict[str, Any]:
    """Each partition's keyed digests, read next to the record ids the verified reader returned (they must line up)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = data.root / MANIFEST
    if "digest" not in pq.read_schema(path).names:
        raise VerificationError(f"{path}: no keyed digest column (made by an earlier guard prepare)",
                                hint="re-run guard prepare with this version")
    table = pq.read_table(path, columns=["record_id", "partition", "digest"], use_threads=False)
    found = {}
    for name in names:
        rows = table.filter(pc.equal(table.column("partition"), pa.scalar(name)))
        expected = getattr(data, name).record_ids
        if rows.num_rows != len(expected) or not rows.column("record_id").equals(pa.chunked_array([expected], pa.string())):
            raise VerificationError(f"{path}: changed while it was read", hint="open the prepared directory again")
        found[name] = rows.column("digest").combine_chunks()
    return found


class PreparedDataset(Dataset[dict[str, Any]]):
    """The rows of a verified prepared directory: `partition` clean, protected (the noisy copies) or all (clean, then
    protected). `ledger` (default: the one `guard` uses, $GUARD_LEDGER or ./guard-ledger), `verify_key` and
    `allow_unrecorded` are `guard train`'s --ledger, --verify-key and --allow-unrecorded."""

    def __init__(self, root: PathLike, partition: PartitionName = "clean", *, ledger: PathLike | None = None,
                 verify_key: PathLike | None = None, allow_unrecorded: bool = False) -> None:
        if partition not in get_args(PartitionName):
            raise InputError(f"partition {partition!r}: expected one of {', '.join(get_args(PartitionName))}")
        data = open_prepared(Path(root))
        self.provenance: Provenance = require_provenance(
            data, ledger_dir(Path(ledger) if ledger is not None else None),
            Path(verify_key) if verify_key is not None else None, allow_unrecorded=allow_unrecorded)
        self.noise_check = require_noisy(data)
        self.data = data
        self.partition: PartitionName = partition
        names = (CLEAN, PROTECTED) if partition == "all" else (partition,)
        digests = _digests(data, names)
        self._parts = [_Part(name, getattr(data, name), digests[name]) for name in names]
        self._starts = np.cumsum([0] + [len(part.rows) for part in self._parts])

    @property
    def sigma(self) -> float:
        """The noise level σ of the directory's noisy copies (card.json)."""
        return float(self.data.card.sigma)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data.image_shape

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[_Part, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        index %= len(self)
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._parts[k], index - int(self._starts[k])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Several items at once (a DataLoader batch): each shard's rows gathered in one read."""
        located = [self._locate(int(i)) for i in indices]
        items: list[dict[str, Any]] = [{} for _ in located]
        for part in self._parts:
            mine = [k for k, (owner, _) in enumerate(located) if owner is part]
            if not mine:
                continue
            rows = np.array([located[k][1] for k in mine], dtype=np.int64)
            images = torch.from_numpy(to_model_range(part.rows.pixels.take(rows)))
            for image, k, row in zip(images, mine, rows.tolist(), strict=True):
                items[k] = {"image": image, "sigma": torch.tensor(part.rows.sigmas[row], dtype=torch.float32),
                            "partition": part.name, "record": str(part.digests[row].as_py())}
        return items

    def noisy_copies(self) -> tuple[MappedRows, list[str]]:
        """The noisy copies as stored (float16, memory-mapped) and their records' keyed digests, in order (what
        `byo.denoise_round` denoises); refused when this dataset holds the clean partition only."""
        part = next((p for p in self._parts if p.name == PROTECTED), None)
        if part is None:
            raise InputError("this dataset holds the clean partition only: open it with partition 'protected' or 'all'")
        return part.rows.pixels, [str(d) for d in part.digests.to_pylist()]
