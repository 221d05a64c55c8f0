"""Checkpoints in safetensors (no pickles): net and EMA weights, plus the training state.

A checkpoint is a directory `checkpoints/step-NNNNNNNNN/` holding `net.safetensors`,
`ema.safetensors` and `state.safetensors` (optimizer tensors, generator states, extra tensors such
as a denoised set) with JSON metadata (step, images seen, phase, optimizer hyper-parameters). It is
written to a temporary sibling and renamed, then `checkpoints/latest` is rewritten atomically, so a
crash or kill -9 at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from .. import __version__
from ..errors import InputError
from ..fileio import atomic_write_bytes

LATEST = "latest"


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs."""

    step: int = 0  # optimizer steps taken
    nimg: int = 0  # training images seen (global)
    phase: int = 0  # index of the phase of the method's plan
    round: int = 0  # SFBD round (0 = pretraining)
    info: dict[str, Any] = field(default_factory=dict)  # small JSON-able extras
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # generator states, banks, ...


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, *, net: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainingState, config_json: str, keep: int) -> Path:
    """Write a checkpoint for `state.step` and point `latest` at it; keep the newest `keep`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:09d}"
    staging = root / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    meta = {"tool_version": __version__, "config": config_json, "step": str(state.step)}
    save_file(_weights(net), staging / "net.safetensors", metadata=meta)
    save_file(_weights(ema), staging / "ema.safetensors", metadata=meta)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors = {**opt_tensors, **{f"state.{k}": v.detach().cpu().contiguous() for k, v in state.tensors.items()}}
    info = {"step": state.step, "nimg": state.nimg, "phase": state.phase, "round": state.round, "info": state.info,
            "optimizer": opt_meta}
    save_file(tensors, staging / "state.safetensors", metadata={"state": json.dumps(info), **meta})
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    atomic_write_bytes(root / LATEST, final.name.encode())
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.safetensors").is_file() else None


def load_weights(path: Path, module: torch.nn.Module) -> None:
    """Load a safetensors state dict into `module`; a mismatch is an input error naming the file."""
    try:
        tensors = load_file(path)
        module.load_state_dict(tensors)
    except (OSError, RuntimeError) as err:
        raise InputError(f"{path}: cannot load weights ({str(err).splitlines()[0]})") from None


def load_checkpoint(path: Path, *, net: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> TrainingState:
    load_weights(path / "net.safetensors", net)
    load_weights(path / "ema.safetensors", ema)
    with safe_open(path / "state.safetensors", framework="pt") as handle:
        info = json.loads(handle.metadata()["state"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    _restore_optimizer(optimizer, tensors, info["optimizer"])
    extra = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    return TrainingState(info["step"], info["nimg"], info["phase"], info["round"], info["info"], extra)

