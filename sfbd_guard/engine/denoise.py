"""SFBD's backward step over the protected copies: each noisy y is integrated by the PF-ODE from
its sigma down to 0 with the EMA model (the same sampler as generation, on the truncated grid), or
with `denoise.solver: sde` a posterior sample is drawn by the reverse SDE.

Records are split across ranks (rank r takes rows r, r + W, ...) and gathered back in record order,
so the result does not depend on the number of processes; every row stays tied to its record_id.
A whole set is denoised window by window and streamed to disk (`into`), never held in memory.

Round sets (`rounds/round-XX/`): the denoised set of one SFBD round as .npy shards of `ROUND_SHARD_ROWS`
rows in record order (uint8 pixels, or float16 on the [-1, 1] scale when sfbd.quantize is false), with
`round.json` naming the round, the records (sha256 of their ids), the dtype, the image shape and every
shard's sha256. The folder is written under a temporary name by rank 0 and renamed when complete; every
rank then memory-maps the same shards.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion.sampling import denoise_backward
from ..hashing import new_sha256, sha256_file
from ..prepared.mapped import MappedRows
from ..progress import Tick
from ..rundir import RunPaths
from .config import DenoiseSpec
from .data import ImageSet, TensorImages, to_uint8
from .runtime import Runtime, gather_rows, rank_slice

ROUND_SHARD_ROWS = 16384  # rows per shard of a round set
_SHARD_NAME = re.compile(r"part-[0-9]{5}\.npy")
Sink = Callable[[int, torch.Tensor], None]  # (position of the block's first row in `rows`, gathered block)


@torch.no_grad()
def denoise_rows(denoiser: torch.nn.Module, noisy: ImageSet | torch.Tensor, rows: torch.Tensor, sigma: float,
                 spec: DenoiseSpec, runtime: Runtime, tick: Tick | None = None, quantize: bool = True,
                 into: Sink | None = None, noise_seed: int = 0) -> torch.Tensor | None:
    """Denoise `noisy[rows]` (this rank's share of `rows`), gathered back in the order of `rows`.

    Rows are taken in windows of `spec.batch` per rank; every rank receives each gathered window (B, C, H, W),
    clipped to [-1, 1]: uint8 pixels when `quantize` (the reference code's PNG round trip, rounded), else
    float16 on the [-1, 1] scale. Without `into` the windows are returned as one tensor (len(rows), C, H, W);
    with `into` each is handed to `into(start, window)` as soon as it is made and None is returned.
    The sde solver's noise for row r is drawn from a generator of (`noise_seed`, r) alone.
    """
    images: ImageSet = TensorImages(noisy) if isinstance(noisy, torch.Tensor) else noisy
    dtype = torch.uint8 if quantize else torch.float16
    wire = torch.int32 if quantize else torch.float32  # types every collective backend gathers
    window = spec.batch * runtime.world_size  # rank r's share of window k is its k-th batch of rows r, r + W, ...
    kept: list[torch.Tensor] = []
    for start in range(0, len(rows), window):
        part = rows[start : start + window]
        mine = rank_slice(len(part), runtime)
        local = torch.empty((0, *images.image_shape), dtype=dtype, device=runtime.device)
        if len(mine):
            y = images.gather(part[mine]).to(runtime.device)
            with runtime.autocast():
                clean = denoise_backward(denoiser, y, sigma, steps=spec.steps, solver=spec.solver, grid=spec.grid,
                                         rho=spec.rho, sigma_min=spec.sigma_min, seeds=(noise_seed, part[mine]))
            clean = clean.clamp(-1, 1)
            local = (to_uint8(clean) if quantize else clean.to(dtype)).to(runtime.device)
            if tick:
                tick(len(mine) * runtime.world_size)
        gathered = gather_rows(local.to(wire) if runtime.distributed else local, mine.to(runtime.device), len(part), runtime)
        block = gathered.to(dtype).cpu()
        if into is None:
            kept.append(block)
        else:
            into(start, block)
    if into is not None:
        return None
    return torch.cat(kept) if kept else torch.empty((0, *images.image_shape), dtype=dtype)


def record_digest(record_ids: Sequence[str]) -> str:
    """sha256 of the record ids joined by newlines (computed without joining them)."""
    digest = new_sha256()
    for i, record in enumerate(record_ids):
        digest.update((b"\n" if i else b"") + record.encode())
    return digest.hexdigest()


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return np.dtype(np.uint8) if dtype == torch.uint8 else np.dtype(np.float16)


class ShardWriter:
    """Writes `count` rows, in any order of whole blocks, into .npy shards of `shard_rows` rows (memory-mapped
    output files: the rows go to the page cache, not to the process's anonymous memory)."""

    def __init__(self, folder: Path, count: int, image_shape: tuple[int, int, int], dtype: np.dtype[Any],
                 shard_rows: int, name: Callable[[int], str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.count, self.shard_rows = folder, count, max(1, shard_rows)
        sizes = [min(self.shard_rows, count - s) for s in range(0, count, self.shard_rows)] or [0]
        self.names = [name(k) for k in range(len(sizes))]
        self.arrays = [np.lib.format.open_memmap(folder / n, mode="w+", dtype=dtype, shape=(size, *image_shape))
                       for n, size in zip(self.names, sizes, strict=True)]

    def put(self, start: int, block: torch.Tensor) -> None:
        values = block.numpy()
        done = 0
        while done < len(values):
            k, offset = divmod(start + done, self.shard_rows)
            take = min(len(values) - done, self.shard_rows - offset)
            self.arrays[k][offset : offset + take] = values[done : done + take]
            done += take

    def close(self) -> dict[str, str]:
        """Flush and close the shards; their sha256 by name."""
        for array in self.arrays:
            array.flush()
        self.arrays = []
        return {n: sha256_file(self.folder / n) for n in self.names}


class RoundSetError(Exception):
    """A round set on disk that cannot be used (missing, foreign, changed or truncated), and why."""


def round_dir(run_dir: Path, round_: int) -> Path:
    return RunPaths(run_dir).round_set(round_)


def write_round(path: Path, count: int, image_shape: tuple[int, int, int], dtype: torch.dtype,
                record_ids: Sequence[str], round_: int, fill: Callable[[Sink], None]) -> dict[str, str]:
    """Write round `round_`'s set into the folder `path` (replaced whole when complete): `fill(sink)` hands every
    row to `sink`. Returns the shards' sha256 by name."""
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    writer = ShardWriter(staging, count, image_shape, numpy_dtype(dtype), ROUND_SHARD_ROWS, lambda k: f"part-{k:05d}.npy")
    fill(writer.put)
    shards = writer.close()
    meta = {"round": round_, "records": count, "record_ids_sha256": record_digest(record_ids),
            "dtype": str(numpy_dtype(dtype)), "image_shape": list(image_shape), "shards": shards}
    (staging / "round.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return shards


def open_round(path: Path, record_ids: Sequence[str], dtype: torch.dtype,
               image_shape: tuple[int, int, int]) -> tuple[MappedRows, dict[str, str]]:
    """Round set `path` memory-mapped, checked against its round.json (records, dtype, shape, every shard's
    sha256); also the shards' sha256 by name. Raises RoundSetError saying what is wrong."""
    meta_path = path / "round.json"
    if not path.is_dir() or path.is_symlink() or not meta_path.is_file() or meta_path.is_symlink():
        raise RoundSetError(f"{meta_path}: missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RoundSetError(f"{meta_path}: unreadable ({err})") from None
    expected = {"records": len(record_ids), "record_ids_sha256": record_digest(record_ids),
                "dtype": str(numpy_dtype(dtype)), "image_shape": list(image_shape)}
    wrong = [key for key, value in expected.items() if not isinstance(meta, dict) or meta.get(key) != value]
    if wrong:
        raise RoundSetError(f"{meta_path}: {wrong[0]} is not this run's ({expected[wrong[0]]!r})")
    shards = meta.get("shards")
    count = -(-len(record_ids) // ROUND_SHARD_ROWS) or 1
    names = [f"part-{k:05d}.npy" for k in range(count)]
    if not isinstance(shards, dict) or sorted(shards) != names or not all(isinstance(v, str) for v in shards.values()):
        raise RoundSetError(f"{meta_path}: shards should be {names[0]}… ({count} of them) with their sha256")
    arrays = []
    for name in names:
        file = path / name
        if not _SHARD_NAME.fullmatch(name) or file.is_symlink() or not file.is_file():
            raise RoundSetError(f"{file}: missing")
        if sha256_file(file) != shards[name]:
            raise RoundSetError(f"{file}: does not match the sha256 recorded when the round set was written")
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.dtype != numpy_dtype(dtype) or array.shape[1:] != image_shape:
            raise RoundSetError(f"{file}: holds {array.dtype} {array.shape[1:]}, expected {numpy_dtype(dtype)} {image_shape}")
        arrays.append(array)
    rows = MappedRows.contiguous(arrays, image_shape, numpy_dtype(dtype))
    if len(rows) != len(record_ids):
        raise RoundSetError(f"{path}: {len(rows)} rows for {len(record_ids)} records")
    return rows, dict(shards)
