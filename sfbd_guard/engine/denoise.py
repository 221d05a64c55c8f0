"""SFBD's backward step over the protected copies: each noisy y is integrated by the PF-ODE from
its sigma down to 0 with the EMA model (the same sampler as generation, on the truncated grid).

Records are split across ranks (rank r takes rows r, r + W, ...) and gathered back in record order,
so the result does not depend on the number of processes; every row stays tied to its record_id.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..diffusion.sampling import denoise_backward
from ..hashing import sha256_bytes
from ..progress import Tick
from .config import DenoiseSpec
from .data import to_uint8
from .runtime import Runtime, gather_rows, rank_slice


@torch.no_grad()
def denoise_rows(denoiser: torch.nn.Module, noisy: torch.Tensor, rows: torch.Tensor, sigma: float,
                 spec: DenoiseSpec, rt: Runtime, tick: Tick | None = None, quantize: bool = True) -> torch.Tensor:
    """Denoise `noisy[rows]` (this rank's share of `rows`), gathered back in the order of `rows`.

    Returns (len(rows), C, H, W) clipped to [-1, 1]: uint8 pixels when `quantize` (the reference code's
    PNG round trip, rounded), else float16 on the [-1, 1] scale.
    """
    dtype = torch.uint8 if quantize else torch.float16
    mine = rank_slice(len(rows), rt)
    outputs = []
    for start in range(0, len(mine), spec.batch):
        chunk = rows[mine[start : start + spec.batch]]
        y = noisy[chunk].to(rt.device)
        with rt.autocast():
            clean = denoise_backward(denoiser, y, sigma, steps=spec.steps, solver=spec.solver, grid=spec.grid,
                                     rho=spec.rho, sigma_min=spec.sigma_min)
        clean = clean.clamp(-1, 1)
        outputs.append((to_uint8(clean) if quantize else clean.to(dtype)).to(rt.device))
        if tick:
            tick(len(chunk) * rt.world_size)
    local = torch.cat(outputs) if outputs else torch.empty((0, *noisy.shape[1:]), dtype=dtype, device=rt.device)
    wire = torch.int32 if quantize else torch.float32  # types every collective backend gathers
    gathered = gather_rows(local.to(wire) if rt.distributed else local, mine.to(rt.device), len(rows), rt)
    return gathered.to(dtype).cpu()


def record_digest(record_ids: list[str]) -> str:
    return sha256_bytes("\n".join(record_ids).encode())


def save_round(path: Path, denoised: torch.Tensor, record_ids: list[str], round_: int) -> None:
    """The denoised set of one round, rows in record order (a checkpoint of its own, for resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({"denoised": denoised.contiguous()}, tmp,
              metadata={"round": str(round_), "records": str(len(record_ids)), "record_ids_sha256": record_digest(record_ids)})
    tmp.replace(path)


def load_round(path: Path, record_ids: list[str], dtype: torch.dtype) -> torch.Tensor | None:
    """A saved round's denoised set, if it exists, belongs to these records and is kept as `dtype`."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        if handle.metadata().get("record_ids_sha256") != record_digest(record_ids):
            return None
    denoised = load_file(path)["denoised"]
    return denoised if denoised.dtype == dtype else None
