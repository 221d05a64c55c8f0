"""Where the engine runs: device, precision, and the torchrun / DDP process group.

Nothing here hard-codes a device: `auto` picks CUDA when it is available, else the CPU. Under
`torchrun` (WORLD_SIZE > 1) the process group uses NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: str = "fp32"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16 autocast when asked, on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX: oneDNN runs the
        convolutions in bf16, about 1.5× the fp32 speed on one core; benchmarks/README.md); a no-op otherwise."""
        if self.precision == "bf16" and (self.device.type == "cuda" or (self.device.type == "cpu" and cpu_has_bf16())):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@functools.cache  # a property of the machine, asked on every training step
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check); without it bf16 would be emulated, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` → cuda:<local_rank> if CUDA is available, else cpu; `cuda` → cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but CUDA is not available here", hint="use --device cpu or auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


def fix_malloc_thresholds(threshold: int = 1 << 20) -> bool:
    """Keep glibc from holding freed memory: fix its mmap and trim thresholds (default: dynamic).

    With the dynamic threshold, every large tensor freed (the denoiser's activations, batch after batch) raises
    the mmap threshold, later large blocks come from the heap, and the heap fragments: a process's anonymous
    memory then grows with the number of batches denoised (measured: +60 MB from 900 to 9000 records), though
    it holds nothing more. Fixed, blocks of `threshold` bytes or more are mapped and returned on free. Returns
    whether the C library took the setting (not glibc: nothing to do)."""

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold, threshold))


@contextlib.contextmanager
def start_runtime(device: str, precision: str) -> Iterator[Runtime]:
    """Set up (and tear down) the process group when launched by torchrun; yield the Runtime."""
    fix_malloc_thresholds()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    started = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        started = True
    try:
        yield Runtime(resolved, rank, world_size, precision)
    finally:
        if started:
            dist.destroy_process_group()


def gather_rows(local: torch.Tensor, local_index: torch.Tensor, total: int, runtime: Runtime) -> torch.Tensor:
    """Put each rank's rows back in record order: row `local_index[i]` of the result is `local[i]`.

    Ranks hold strided slices (rank r has rows r, r + W, ...), so the slices differ in length by at
    most one; they are padded to the same length for all_gather, and the padding is dropped.
    """
    if not runtime.distributed:
        out = local.new_empty((total, *local.shape[1:]))
        out[local_index] = local
        return out
    per_rank = -(-total // runtime.world_size)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    index = torch.full((per_rank,), -1, dtype=torch.long, device=local.device)
    index[: len(local_index)] = local_index
    rows = [torch.empty_like(padded) for _ in range(runtime.world_size)]
    indices = [torch.empty_like(index) for _ in range(runtime.world_size)]
    dist.all_gather(rows, padded)
    dist.all_gather(indices, index)
    all_rows, all_index = torch.cat(rows), torch.cat(indices)
    keep = all_index >= 0
    out = local.new_empty((total, *local.shape[1:]))
    out[all_index[keep]] = all_rows[keep]
    return out


def rank_slice(total: int, runtime: Runtime) -> torch.Tensor:
    """The record rows this rank handles in a batch-inference pass over `total` records."""
    return torch.arange(runtime.rank, total, runtime.world_size)
